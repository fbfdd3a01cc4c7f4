"""Every table the report shows, computed once from a run's rows (``Tables.from_rows``): rendering and plotting
only format them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from reports.budget import anytime, at_equal_trials, budget, trials_table
from reports.collect import (
    BackboneVerdict,
    best_overall,
    chosen_per_seed,
    compared_feature_sets,
    crossover,
    feature_set_effects,
    fewshot_arms,
    fewshot_gaps,
    fewshot_table,
    main_results,
    paired_gaps,
    per_class_table,
    results_table,
    rows_of,
    summary_table,
    val_best_per_arm,
    val_ties,
    verdicts,
)
from study.results import ResultRow, TrialRow


@dataclass(frozen=True, eq=False)  # eq=False: frames have no single truth value to compare by
class Headline:
    best: pd.Series             # the summary row of the val-best variant over every backbone and arm
    first: pd.Series            # its results row at its first split seed
    other: pd.Series | None     # the other arm's val-best variant (a summary row)


@dataclass(frozen=True, eq=False)
class ChosenModel:
    """The headline's variant at its first split seed: the model the error analysis and its figures describe."""
    row: ResultRow
    class_names: list[str]
    per_class: pd.DataFrame     # its per-class test accuracy (per_class_table rows), worst first
    confused: pd.DataFrame      # true, predicted, images, class_images: off-diagonal confusions, most first

    @classmethod
    def of(cls, row: ResultRow, per_class: pd.DataFrame) -> ChosenModel:
        cm = np.asarray(row.metrics.confusion)
        off = cm.copy()
        np.fill_diagonal(off, 0)
        names = list(row.class_names) or [str(i) for i in range(len(row.metrics.confusion))]
        pairs = sorted(((int(off[i, j]), i, j) for i, j in zip(*np.nonzero(off))), reverse=True)
        confused = pd.DataFrame.from_records(
            [(names[i], names[j], n, int(cm[i].sum())) for n, i, j in pairs],
            columns=["true", "predicted", "images", "class_images"])
        worst_first = per_class[per_class.row == row.index].dropna(subset=["accuracy"]).sort_values("accuracy")
        return cls(row=row, class_names=names, per_class=worst_first, confused=confused)


@dataclass(frozen=True, eq=False)
class Tables:
    """What the report shows of one run: every table and every choice (on val), made once by ``from_rows``."""
    rows: list[ResultRow]               # study.results.read_results: index i is line i of results.jsonl
    results: pd.DataFrame               # collect.results_table: one line per row (results.csv)
    per_class: pd.DataFrame             # collect.per_class_table (per_class.csv)
    main: pd.DataFrame                  # the head and fine-tune lines of ``results``
    variants: pd.DataFrame              # collect.summary_table: over split seeds, ``chosen`` per (backbone, arm)
    val_best_per_arm: pd.DataFrame      # each arm's val-best variant, best first (the cost figure's rings)
    chosen_per_seed: pd.DataFrame       # per (backbone, arm, split seed) the val-chosen line of ``results``
    val_ties: pd.DataFrame
    verdicts: list[BackboneVerdict]     # head vs fine-tune per backbone, with McNemar per seed
    feature_sets: list[str]             # the heads' feature sets besides clean, in column order
    feature_set_effects: pd.DataFrame
    fewshot: pd.DataFrame               # collect.fewshot_table: per variant and k
    fewshot_arms: pd.DataFrame          # collect.fewshot_arms: per arm and k
    paired_gaps: dict[int, tuple[float, int]]
    fewshot_gaps: dict[int, float]      # per k both arms measured: fine-tune minus head
    crossover: int | None               # the first k where the fine-tune arm is ahead
    headline: Headline | None
    chosen: ChosenModel | None
    training_curves: list[ResultRow]    # the fine-tunes that recorded a per-epoch curve
    trials: pd.DataFrame                # budget.trials_table: every tuner trial (trials.csv)
    anytime: pd.DataFrame               # budget.anytime: best val so far per trial and seconds
    budget: pd.DataFrame                # budget.budget: per (backbone, arm)
    at_equal_trials: pd.DataFrame       # budget.at_equal_trials: the arms after the same number of trials

    @classmethod
    def from_rows(cls, rows: list[ResultRow], *, labels_by_id: dict[str, int],
                  trials: list[TrialRow] = ()) -> Tables:
        """``labels_by_id`` (the manifest's test labels) scores the McNemar tests of the verdicts; ``trials`` are
        the run's tuner trials (trials.jsonl)."""
        results = results_table(rows)
        trial_lines = trials_table(list(trials))
        per_class = per_class_table(rows)
        variants = summary_table(results)
        chosen = chosen_per_seed(results)
        arms = fewshot_arms(results, rows)
        paired = paired_gaps(results, rows)
        headline = _headline(results, variants)
        return cls(
            rows=rows, results=results, per_class=per_class, main=main_results(results), variants=variants,
            val_best_per_arm=val_best_per_arm(variants), chosen_per_seed=chosen, val_ties=val_ties(variants),
            verdicts=verdicts(chosen, rows, labels_by_id=labels_by_id),
            feature_sets=compared_feature_sets(results), feature_set_effects=feature_set_effects(results),
            fewshot=fewshot_table(results, rows), fewshot_arms=arms, paired_gaps=paired,
            fewshot_gaps=fewshot_gaps(arms, paired), crossover=crossover(arms, paired), headline=headline,
            chosen=None if headline is None else ChosenModel.of(rows[int(headline.first.row)], per_class),
            training_curves=[r for r in rows if r.kind == "finetune" and r.selection is not None and r.selection.curve],
            trials=trial_lines, anytime=anytime(trial_lines), budget=budget(trial_lines, chosen),
            at_equal_trials=at_equal_trials(trial_lines),
        )


def _headline(results: pd.DataFrame, variants: pd.DataFrame) -> Headline | None:
    best = best_overall(variants)
    if best is None:
        return None
    other = best_overall(variants, arm="finetune" if best.arm == "head" else "head")
    return Headline(best=best, first=rows_of(results, best).iloc[0], other=other)
