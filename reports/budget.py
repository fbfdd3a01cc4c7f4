"""The two arms' tuning budgets, from a run's ``trials.jsonl``: what each arm was allowed to try, what it found by
each trial, and whether it was still improving when its budget ran out.

Every figure here is a val score (test takes part in no choice); ``anytime`` is each (backbone, arm, split seed)'s
best val so far against trials and against cumulative seconds, ``budget`` summarises it per (backbone, arm), and
``at_equal_trials`` sets the arms side by side after the same number of trials.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from study.results import TrialRow

TRIAL_COLUMNS = ["arm", "backbone", "split_seed", "number", "state", "val_mean_per_class", "val_log_loss", "seconds",
                 "best_epoch", "at_edge", "params", "study"]
# "Still rising": the best val so far improved during the last third of the trials.
RISING_TAIL = 1 / 3


def trials_table(trials: list[TrialRow]) -> pd.DataFrame:
    """One line per trial (trials.csv), in the order each study ran them."""
    records = [{"arm": t.arm, "backbone": t.backbone, "split_seed": t.split_seed, "number": t.number, "state": t.state,
                "val_mean_per_class": t.val_mean_per_class, "val_log_loss": t.val_log_loss, "seconds": t.seconds,
                "best_epoch": t.best_epoch, "at_edge": ",".join(t.at_edge),
                "params": "; ".join(f"{k}={v}" for k, v in sorted(t.params.items())), "study": t.study}
               for t in trials]
    return pd.DataFrame.from_records(records, columns=TRIAL_COLUMNS).sort_values(
        ["backbone", "arm", "split_seed", "number"], kind="stable").reset_index(drop=True)


def anytime(trials: pd.DataFrame) -> pd.DataFrame:
    """Per (backbone, arm, split seed) and trial: the best val of the completed trials so far, and the seconds
    spent so far (pruned trials cost time and count as trials, but a pruned val chooses nothing)."""
    if trials.empty:
        return pd.DataFrame(columns=["backbone", "arm", "split_seed", "trials", "best_val", "seconds"])
    parts = []
    for (backbone, arm, seed), part in trials.groupby(["backbone", "arm", "split_seed"], sort=True):
        part = part.sort_values("number")
        val = part.val_mean_per_class.where(part.state == "COMPLETE").astype(float)
        parts.append(pd.DataFrame({"backbone": backbone, "arm": arm, "split_seed": seed,
                                   "trials": np.arange(1, len(part) + 1), "best_val": val.cummax().to_numpy(),
                                   "seconds": part.seconds.cumsum().to_numpy()}))
    return pd.concat(parts, ignore_index=True)


def _rising(curve: pd.DataFrame) -> bool:
    """Whether the best val so far went up during the last third of the trials."""
    best = curve.sort_values("trials").best_val.ffill().to_numpy()
    tail = max(1, int(np.ceil(len(best) * RISING_TAIL)))
    before = best[-tail - 1] if len(best) > tail else -np.inf
    return bool(best[-1] > before) if not np.isnan(best[-1]) else False


def budget(trials: pd.DataFrame, chosen: pd.DataFrame) -> pd.DataFrame:
    """Per (backbone, arm): trials per split seed, pruned trials, seconds per seed, the best val (mean over seeds),
    on how many seeds the search was still rising at the end, and the chosen trials' parameters at an edge of
    their range (``chosen``: the results table's chosen rows, whose ``chosen_trial`` names the trial)."""
    curves = anytime(trials)
    records = []
    for (backbone, arm), part in trials.groupby(["backbone", "arm"], sort=True):
        seeds = sorted(part.split_seed.unique())
        per_seed = part.groupby("split_seed")
        mine = chosen[(chosen.backbone == backbone) & (chosen.arm == arm)]
        edges = sorted({e for s, n in zip(mine.split_seed, mine.chosen_trial) if pd.notna(n)
                        for cell in part[(part.split_seed == s) & (part.number == n)].at_edge for e in cell.split(",")
                        if e})
        rising = sum(_rising(curves[(curves.backbone == backbone) & (curves.arm == arm) & (curves.split_seed == s)])
                     for s in seeds)
        records.append({"backbone": backbone, "arm": arm, "split_seeds": len(seeds),
                        "trials": "/".join(str(n) for n in sorted(set(per_seed.size()))),
                        "pruned": int((part.state == "PRUNED").sum()),
                        "seconds_per_seed": float(per_seed.seconds.sum().mean()),
                        "best_val": float(part.val_mean_per_class.where(part.state == "COMPLETE")
                                          .groupby(part.split_seed).max().mean()),
                        "rising_seeds": rising, "chosen_at_edge": ", ".join(edges)})
    return pd.DataFrame.from_records(records, columns=["backbone", "arm", "split_seeds", "trials", "pruned",
                                                       "seconds_per_seed", "best_val", "rising_seeds",
                                                       "chosen_at_edge"])


def at_equal_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """Per backbone and trial count n (a quarter, half and all of the smaller budget): each arm's best val after n
    trials, mean over split seeds, and the lead (head minus fine-tune)."""
    curves = anytime(trials)
    records = []
    for backbone, part in curves.groupby("backbone", sort=True):
        arms = {arm: p for arm, p in part.groupby("arm")}
        if set(arms) != {"head", "finetune"}:
            continue
        n_max = min(int(p.groupby("split_seed").trials.max().min()) for p in arms.values())
        for n in sorted({max(1, n_max // 4), max(1, n_max // 2), n_max}):
            best = {arm: float(p[p.trials == n].best_val.mean()) for arm, p in arms.items()}
            records.append({"backbone": backbone, "trials": n, "head": best["head"], "finetune": best["finetune"],
                            "lead": best["head"] - best["finetune"]})
    return pd.DataFrame.from_records(records, columns=["backbone", "trials", "head", "finetune", "lead"])
