"""Every table the report shows, computed once from a run's rows (``Tables.from_rows``): rendering and plotting
only format them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from reports.budget import anytime, at_equal_trials, budget, trials_table
from reports.collect import (
    BackboneVerdict,
    chosen_per_seed,
    compared_feature_sets,
    crossovers,
    feature_set_effects,
    fewshot_pairs,
    fewshot_table,
    main_results,
    per_class_table,
    results_table,
    verdicts,
)
from reports.decision import (
    Card,
    Comparison,
    Unit,
    arm_choices,
    declared,
    make_card,
    row_interval,
    units_of,
    units_table,
)
from reports.limits import Limits
from study.results import ResultRow, TrialRow

N_BOOT = 1000  # bootstrap resamples of every interval the report computes (report.bootstrap)


@dataclass(frozen=True, eq=False)
class ChosenModel:
    """The decision's unit at its first split seed (the model the error analysis describes), beside the other
    arm's choice at the same seed (the same test images), when there is one."""
    row: ResultRow
    class_names: list[str]
    per_class: pd.DataFrame     # its per-class test accuracy (per_class_table rows), worst first
    confused: pd.DataFrame      # true, predicted, images, class_images: off-diagonal confusions, most first
    other: ResultRow | None = None

    @classmethod
    def of(cls, row: ResultRow, per_class: pd.DataFrame, *, other: ResultRow | None = None) -> ChosenModel:
        cm = np.asarray(row.metrics.confusion)
        off = cm.copy()
        np.fill_diagonal(off, 0)
        names = list(row.class_names) or [str(i) for i in range(len(row.metrics.confusion))]
        pairs = sorted(((int(off[i, j]), i, j) for i, j in zip(*np.nonzero(off))), reverse=True)
        confused = pd.DataFrame.from_records(
            [(names[i], names[j], n, int(cm[i].sum())) for n, i, j in pairs],
            columns=["true", "predicted", "images", "class_images"])
        worst_first = per_class[per_class.row == row.index].dropna(subset=["accuracy"]).sort_values("accuracy",
                                                                                                    kind="stable")
        return cls(row=row, class_names=names, per_class=worst_first, confused=confused, other=other)


@dataclass(frozen=True, eq=False)  # eq=False: frames have no single truth value to compare by
class Tables:
    """What the report shows of one run: every table and every choice (on val), made once by ``from_rows``."""
    rows: list[ResultRow]               # study.results.read_results: index i is line i of results.jsonl
    results: pd.DataFrame               # collect.results_table: one line per row (results.csv)
    per_class: pd.DataFrame             # collect.per_class_table (per_class.csv)
    main: pd.DataFrame                  # the head and fine-tune lines of ``results``
    chosen_per_seed: pd.DataFrame       # per (backbone, arm, split seed) the val-chosen line of ``results``
    units: list[Unit]                   # per (backbone, arm): its chosen row at each split seed
    variants: pd.DataFrame              # decision.units_table: one line per unit (summary.csv)
    card: Card | None                   # the decision, on val, and its test figures
    arm_choices: dict[str, Unit]        # each arm's unit by the same rule (the figures ring them)
    comparisons: list[Comparison]       # the declared paired comparisons, Holm-adjusted together
    verdicts: list[BackboneVerdict]     # head vs fine-tune per backbone, per seed and over seeds
    feature_sets: list[str]             # the heads' feature sets besides clean, in column order
    feature_set_effects: pd.DataFrame
    fewshot: pd.DataFrame               # collect.fewshot_table: per variant and k
    fewshot_pairs: pd.DataFrame         # collect.fewshot_pairs: per backbone and k, fine-tune minus head
    crossovers: dict[str, int | None]   # per backbone, the first k the fine-tune is ahead beyond its interval
    chosen: ChosenModel | None
    training_curves: list[ResultRow]    # the fine-tunes that recorded a per-epoch curve
    trials: pd.DataFrame                # budget.trials_table: every tuner trial (trials.csv)
    anytime: pd.DataFrame               # budget.anytime: best val so far per trial and seconds
    budget: pd.DataFrame                # budget.budget: per (backbone, arm)
    at_equal_trials: pd.DataFrame       # budget.at_equal_trials: the arms after the same number of trials
    limits: Limits                      # what the Limitations section and the per-source table read
    n_boot: int = N_BOOT

    @classmethod
    def from_rows(cls, rows: list[ResultRow], *, labels_by_id: dict[str, int], trials: list[TrialRow] = (),
                  sources_by_id: dict[str, str] | None = None, n_boot: int = N_BOOT) -> Tables:
        """``labels_by_id`` (the manifest's labels) scores every paired statistic, ``sources_by_id`` (its sources)
        the per-source table; ``trials`` are the run's tuner trials (trials.jsonl)."""
        boot = {"n_boot": n_boot}
        intervals = {r.index: row_interval(r, labels_by_id, **boot) for r in rows
                     if r.kind != "fewshot"} if labels_by_id else {}
        results = results_table(rows, intervals)
        trial_lines = trials_table(list(trials))
        per_class = per_class_table(rows)
        chosen = chosen_per_seed(results)
        units = units_of(chosen, rows)
        card = make_card(units, labels_by_id, **boot) if labels_by_id else None
        comparisons = declared(units, card, labels_by_id, **boot) if labels_by_id else []
        pairs = fewshot_pairs(rows, labels_by_id, **boot)
        choices = arm_choices(units, labels_by_id, **boot) if labels_by_id else {}
        return cls(
            rows=rows, results=results, per_class=per_class, main=main_results(results), chosen_per_seed=chosen,
            units=units, variants=units_table(units, card, labels_by_id, **boot), card=card, arm_choices=choices,
            comparisons=comparisons, verdicts=verdicts(chosen, rows, comparisons, labels_by_id=labels_by_id),
            feature_sets=compared_feature_sets(results), feature_set_effects=feature_set_effects(results),
            fewshot=fewshot_table(results, rows), fewshot_pairs=pairs, crossovers=crossovers(pairs),
            chosen=_chosen_model(card, choices, per_class),
            training_curves=[r for r in rows if r.kind == "finetune" and r.selection is not None and r.selection.curve],
            trials=trial_lines, anytime=anytime(trial_lines), budget=budget(trial_lines, chosen),
            at_equal_trials=at_equal_trials(trial_lines), n_boot=n_boot,
            limits=Limits.of(rows, units, card=card, labels_by_id=labels_by_id, sources_by_id=sources_by_id or {}),
        )


def _chosen_model(card: Card | None, choices: dict[str, Unit], per_class: pd.DataFrame) -> ChosenModel | None:
    if card is None:
        return None
    unit = card.chosen
    other = next((u for arm, u in choices.items() if arm != unit.arm), None)
    row = unit.first
    other_row = None if other is None else other.rows.get(row.split_seed)
    return ChosenModel.of(row, per_class, other=other_row)
