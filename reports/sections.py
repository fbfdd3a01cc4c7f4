"""The report's decision card, its Limitations section and the per-source table: what a reader acts on first and
what they must know before trusting it. Every number comes from ``reports.tables.Tables`` (and the run's
``provenance.json``, config and dataset summary)."""
from __future__ import annotations

from pathlib import Path

from reports.decision import Card, holm_of
from reports.fmt import count, kind_name, md_table, p_text, pct, pts_ci, seconds, unit_name
from study.commands import export_command, predict_command
from study.protocol import RULE
from study.results import TEST_BACKBONES, fused_parts

TIMING = "- **Timing conditions**: "  # the line reports.stage.record_end rewrites once the run has ended


def section_card(inp) -> list[str]:
    """The decision card: one sentence (what to use, its test accuracy and costs, the runner-up and the paired
    difference), then how it was chosen and the commands that use it."""
    t = inp.tables
    card = t.card
    if card is None:
        why = "no head or fine-tuning result in this run" if t.main.empty else \
            "no manifest beside the run, so no result could be scored against its labels"
        return ["## Decision", "", f"No decision: {why}.", ""]
    return ["## Decision", "", card_sentence(card, t.comparisons), "", *card_reasons(card),
            *predict_lines(card, inp.run_dir), ""]


def card_sentence(card: Card, comparisons: list) -> str:
    u, est = card.chosen, card.accuracy
    seeds = len(u.rows)
    over = f"mean over {seeds} split seeds, " if seeds > 1 else ""
    text = (f"**Use {unit_name(u)}** ({u.methods(code=True)}): {pct(est.value)}% test mean per-class accuracy "
            f"[{pct(est.lo)}, {pct(est.hi)}] ({over}95% class-stratified bootstrap interval), {seconds(u.cost_s)} s to "
            f"train including its features, {1000 * u.infer_s:.2f} ms per image to predict on top of the frozen "
            "backbone's forward pass")
    runner, head = card.runner_up, card.headline
    if runner is None or head is None:
        return text + "; it was the only candidate."
    declared = holm_of(comparisons, u, runner)
    holm = "" if declared is None or declared.p_holm is None else f", Holm-adjusted p = {p_text(declared.p_holm)}"
    return (text + f"; runner-up {unit_name(runner)} ({runner.methods(code=True)}) at "
            f"{pct(float(sum(r.metrics.mean_per_class for r in runner.rows.values()) / len(runner.rows)))}%: the "
            f"choice minus the runner-up {pts_ci(head.diff.value, head.diff.lo, head.diff.hi)} pts on test{holm}.")


def card_reasons(card: Card) -> list[str]:
    d, units = card.decision, card.candidates
    u, best = card.chosen, card.val_best
    out = [f"- **Rule** (declared before test is read; `study.protocol.decide`): {RULE}."]
    over = f"mean over {d.n_seeds} split seeds" if d.n_seeds > 1 else "one split seed"
    runner = card.runner_up
    out.append(f"- **On val** ({over}): {unit_name(u)} {pct(u.val_score)}%"
               + ("" if runner is None or runner is best else f", the runner-up {pct(runner.val_score)}%")
               + ("" if best is u else f"; the val-best, {unit_name(best)}, {pct(best.val_score)}%, was ahead by "
                  f"{_noise(d, d.chosen)} pts on val — within val noise, so the cheaper one is used ("
                  f"{seconds(u.cost_s)} s against {seconds(best.cost_s)} s to train)") + ".")
    others = [i for i in d.noise if i != d.chosen]
    if others:
        out.append("- Val-best minus each other candidate on val (pts, 95% interval; *within noise* when it "
                   "includes 0): " + "; ".join(f"{unit_name(units[i])} {_noise(d, i)}"
                                                + (" (within noise)" if i in d.within else "") for i in others) + ".")
    cv = [x for x in units if x.arm == "head" and any(
        r.selection is not None and "cross-validation" in (r.selection.metric or "") for r in x.rows.values())]
    if cv and any(x.arm == "finetune" for x in units):
        out.append("- **Val scores are not equally optimistic**: a fine-tune's val score is the best its search "
                   "found over trials and epochs on val, while " + ", ".join(unit_name(x) for x in cv)
                   + " chose by cross-validation on train+val, so its val score is that of the trial it chose, not "
                   "a maximum over val: on val the comparison leans toward the fine-tune.")
    if d.saturated:
        tops = [units[i] for i in range(len(units)) if units[i].val_score == best.val_score]
        out.append(f"- **Val saturated**: the best val score is {pct(best.val_score)}% ({len(tops)} of {len(units)} "
                   + ("candidates score it), so val cannot rank the candidates at the top; the choice among them is "
                      "by cost alone — not by val log-loss, which candidates of different families do not share."
                      if len(tops) > 1 else "candidates scores it): val has no room above it, so it cannot show how "
                      "far ahead the val-best would be on a harder val set."))
    if d.ties:
        out.append(f"- **An exact val tie**: {', '.join(unit_name(units[i]) for i in d.ties)} "
                   f"{'has' if len(d.ties) == 1 else 'have'} the chosen one's val score; a tie, settled by cost.")
    if not d.measured:
        out.append("- Some candidates carry no val predictions (rows written before they were recorded): their val "
                   "noise was not measured, so only an exact val tie let a cheaper one in.")
    if d.n_seeds > 1:
        out.append("- **Over split seeds**: each candidate is a (backbone, arm) whose search chose its method on "
                   "each seed's val; val and test figures are means over the seeds, and an interval resamples "
                   "images within class once for all seeds (an image several seeds share keeps one weight), "
                   "because the seeds' splits share most images.")
    if card.left_out:
        out.append("- Not candidates (not on every split seed): "
                   + ", ".join(unit_name(x) for x in card.left_out) + ".")
    return out


def _noise(d, i: int) -> str:
    diff, lo, hi = d.noise.get(i, (None, None, None))
    return "–" if diff is None else pts_ci(diff, lo, hi)


def predict_lines(card: Card, run_dir: Path | None) -> list[str]:
    row = card.chosen.first
    run = str(run_dir) if run_dir is not None else "<run folder>"
    return ["", f"To use it (row {row.index} of `results.jsonl`: `{row.backbone}` `{row.method} ({row.feature_set})`, "
            f"split seed {row.split_seed}, the choice at its first split seed; `--variant chosen` names the same row):",
            "", "```", predict_command(run, row=row.index, images="IMAGES_OR_FOLDERS"),
            export_command(run, row=row.index, dest="exported"), "```"]


def section_per_source(inp) -> list[str]:
    lim = inp.tables.limits
    if lim.per_source.empty:
        return []
    out = ["### Per source", "", "Test mean per-class accuracy of each (backbone, arm) over each source's test images "
           "(the classes present there; mean over split seeds), from each row's per-image correctness grouped by "
           "the manifest's `source`.", ""]
    header = ["backbone", "arm", "chosen method", "decision"] + [
        f"{s} % ({count(lim.source_images.get(s))} test images)" for s in lim.sources]
    body = [[r["backbone"], kind_name(r["arm"]), r["methods"], "**chosen**" if r["chosen"] else ""]
            + [pct(r[s]) for s in lim.sources] for _, r in lim.per_source.iterrows()]
    return out + md_table(header, body)


def section_limitations(inp) -> list[str]:
    t, lim = inp.tables, inp.tables.limits
    out = ["## Limitations", ""]
    out += budget_limits(t)
    out += val_limits(t)
    out += data_limits(inp)
    out += [TIMING + timing_text(inp.provenance),
            "- **Split seeds are not replicates**: the seeds re-split the same images (their test sets share most "
            "images), so the sd over seeds is a split-resampling spread, not the spread of independent studies; "
            "intervals over seeds resample each image once for all seeds instead.",
            "- **What the intervals cover**: test-image sampling for the trained models; not the randomness of "
            "training or of the search (a second run with other seeds could choose other settings)."]
    if lim.per_source.empty:
        out.append("- No per-source breakdown: the manifest's sources were not available to the report.")
    random_nets = sorted({p for b in t.results.get("backbone", []) for p in fused_parts(b)} & set(TEST_BACKBONES))
    if random_nets:
        out.append(f"- **Random networks**: {', '.join(f'`{n}`' for n in random_nets)} are random-initialised test "
                   "networks, not pretrained ones: their rows test the pipeline and say nothing about transfer.")
    return out + [""]


def budget_limits(t) -> list[str]:
    if t.budget.empty:
        return ["- **Budgets**: no tuner trials recorded (trials.jsonl absent): each arm's search budget is unknown."]
    out = []
    for arm, part in t.budget.groupby("arm", sort=False):
        rising = int(part.rising_seeds.sum())
        searches = int(part.split_seeds.sum())
        out.append(f"- **Budget, {kind_name(arm)}**: {'/'.join(sorted(set(part.trials)))} trials per (backbone, split "
                   f"seed), {int(part.pruned.sum())} pruned in all; the best val was still rising at the end on "
                   f"{rising} of {searches} searches" + (" (a larger budget might find more)" if rising else "")
                   + ".")
    edges = [f"{r.backbone} {kind_name(r.arm)}: {r.chosen_at_edge}" for r in t.budget.itertuples() if r.chosen_at_edge]
    out.append("- **Chosen values at an edge of their range**: " + ("; ".join(edges) + " (the space may be too "
                                                                     "narrow there)." if edges else "none."))
    return out


def val_limits(t) -> list[str]:
    lim, out = t.limits, []
    peaks = lim.last_epoch_peaks
    out.append("- **Fine-tunes whose kept epoch was their last**: " + (
        f"{len(peaks)} (rows {', '.join(map(str, peaks.row))}): val was still rising when training stopped, so "
        "more epochs might have helped." if len(peaks) else "none (every kept epoch had a later one that did "
                                                            "not improve val)."))
    sizes = lim.val_sizes
    for (images, classes, low, median, high), part in sizes.groupby(["images", "classes", "min", "median", "max"],
                                                                    sort=False):
        seeds = ", ".join(map(str, part.split_seed))
        out.append(f"- **Val size** (split seed{'s' if len(part) > 1 else ''} {seeds}): {images} images, "
                   f"{low}–{high} per class (median {median:g}) over {classes} classes: one val image moves a class's "
                   f"val accuracy by up to {pct(1 / low)} points and the val mean per-class accuracy by up to "
                   f"{pct(1 / (low * classes))} points.")
    if lim.saturated:
        out.append(f"- **Val saturated** (100% on val): {', '.join(f'`{s}`' for s in lim.saturated)}; val cannot "
                   "rank these.")
    return out


def data_limits(inp) -> list[str]:
    lim, data = inp.tables.limits, (inp.config or {}).get("data", {})
    out = [f"- **Overlap with the pre-training set** ({source}): {why}." for source, why in lim.overlaps.items()]
    out += [f"- **Near-identical classes**: {why}, and both are classes here: their confusions are not the "
            "model's errors (merge them with `data.rename` or drop one with `data.drop`)."
            for why in lim.near_identical]
    handled = [k for k in list(data.get("drop", [])) + list(data.get("rename", {})) if "faces" in k.lower()]
    if handled:
        out.append(f"- **Near-identical classes handled by the config**: {', '.join(f'`{k}`' for k in handled)} "
                   "(Caltech 101's `Faces` and `Faces_easy` are the same photographs at two crops).")
    out.append("- **Duplicates**: exact copies (sha256) and near-copies that pHash pairs (re-encodes, resizes, slight "
               "re-crops) are kept in one split; the same photograph cropped or framed differently, or the same "
               "object photographed twice, is not seen by pHash and may sit in two splits.")
    return out


def timing_text(p: dict) -> str:
    device = p.get("device", "?")
    load = p.get("load_avg") or {}
    parts = [f"wall seconds on `{device}`"]
    if load:
        parts.append(f"1-minute load average {load.get('start', '?')} at the start and {load.get('end', '?')} at the "
                     "end of the run" + (f" on {p['cpu_count']} CPUs" if p.get("cpu_count") else ""))
    else:
        parts.append("the load on the machine while they ran is not in provenance.json yet (the run records it "
                     "at its end, and this line and the Provenance section are then rewritten)")
    return ("; ".join(parts) + ". Other work sharing the machine slows every timing, so costs compare the arms of "
            "one run, not runs on different machines.")
