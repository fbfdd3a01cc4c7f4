"""The report's figures (matplotlib, Agg): each function draws fields of ``reports.tables.Tables`` into one figure,
unsaved (``reports.stage`` saves them; tests inspect them).

The comparison figures show one mark per (backbone, arm) (``Tables.variants``: over split seeds), coloured by arm
and shaped by backbone; the val-chosen one is marked on every figure. Layouts are constrained and legends sit
inside the figure, beside or above the axes, so no legend covers data or leaves the canvas.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from adjustText import adjust_text  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

from reports.collect import FUSED_PREFIX  # noqa: E402

KIND_COLOURS = {"head": "tab:blue", "finetune": "tab:orange"}
ARM_NAMES = {"head": "frozen features + head", "finetune": "fine-tuning"}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
FUSED_MARKERS = ("*", "p", "H", "8")  # fused sets stand apart from every single backbone
DPI = 110
# adjustText stops at a step count, not a time limit: a figure must not depend on how busy the machine
# is. With fifty points to avoid it rarely reaches zero overlap with the points, so it would run to any limit.
ADJUST_STEPS = 300


def save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def new_figure(*, figsize, nrows: int = 1, ncols: int = 1, **kw):
    """A figure with a constrained layout (it makes room for every label and for legends placed 'outside')."""
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, dpi=DPI, layout="constrained", squeeze=False, **kw)
    return fig, axes


def backbone_markers(backbones) -> dict[str, str]:
    """A fixed marker per backbone: single backbones in sorted order through ``MARKERS``, fused sets
    through ``FUSED_MARKERS``, so the same backbone gets the same marker in every figure of a run."""
    names = sorted(set(backbones))
    single = [b for b in names if not b.startswith(FUSED_PREFIX)]
    fused = [b for b in names if b.startswith(FUSED_PREFIX)]
    out = {b: MARKERS[i % len(MARKERS)] for i, b in enumerate(single)}
    out.update({b: FUSED_MARKERS[i % len(FUSED_MARKERS)] for i, b in enumerate(fused)})
    return out


def _arm_handles(arms) -> list:
    return [Line2D([], [], linestyle="", marker="o", color=KIND_COLOURS.get(a, "grey"), label=ARM_NAMES.get(a, a))
            for a in ("head", "finetune") if a in set(arms)]


def _marker_handles(markers: dict[str, str]) -> list:
    return [Line2D([], [], linestyle="", marker=m, color="0.3", label=b) for b, m in markers.items()]


def unit_label(r) -> str:
    return f"{r.backbone}: {ARM_NAMES.get(r.arm, r.arm)}"


def accuracy_by_method(units: pd.DataFrame):
    """Test mean per-class accuracy per (backbone, arm) (``Tables.variants``: mean over split seeds, with its
    class-stratified interval), one bar each, coloured by arm; the val-chosen one hatched and named."""
    v = units.sort_values(["backbone", "arm"], key=lambda c: c.map({"head": 0, "finetune": 1}) if c.name == "arm"
                          else c).reset_index(drop=True)
    n = len(v)
    font = 8 if n <= 25 else 7 if n <= 60 else 6
    fig, axes = new_figure(figsize=(9, 0.24 * n * font / 8 + 2.2))
    ax = axes[0, 0]
    y = np.arange(n)
    lo, hi = v["lo"].astype(float), v["hi"].astype(float)
    err = None if lo.isna().any() else np.vstack([v["mean"] - lo, hi - v["mean"]]).astype(float)
    bars = ax.barh(y, v["mean"], xerr=err, color=[KIND_COLOURS.get(a, "grey") for a in v.arm],
                   capsize=2 if n > 25 else 3, error_kw={"elinewidth": 0.8})
    for bar, chosen in zip(bars, v.chosen):
        if chosen:
            bar.set_hatch("///")
            bar.set_edgecolor("black")
    ax.set_yticks(y, [unit_label(r) + (" (val-chosen)" if r.chosen else "") for r in v.itertuples()], fontsize=font)
    ax.set_ylim(n - 0.4, -0.6)  # first on top: read top-down, heads before fine-tunes per backbone
    for i in np.flatnonzero(v.backbone.to_numpy()[1:] != v.backbone.to_numpy()[:-1]):
        ax.axhline(i + 0.5, color="0.6", lw=0.6)  # a rule between backbones
    low = float(np.nanmin(lo if err is not None else v["mean"]))
    ax.set_xlim(max(0.0, low - 0.05), 1.0)
    ax.set_xlabel("test mean per-class accuracy (mean over split seeds, 95% class-stratified interval)",
                  fontsize=font + 1)
    ax.set_title("Accuracy by backbone and arm (hatched: val-chosen)", fontsize=font + 2)
    fig.legend(handles=_arm_handles(v.arm), fontsize=font, loc="outside upper right", ncols=2)
    return fig


def pareto_front(points: pd.DataFrame) -> pd.DataFrame:
    """The variants no other variant beats on both cost and accuracy (cheapest first)."""
    front, best = [], -np.inf
    for i, r in points.sort_values(["cost", "mean"], ascending=[True, False]).iterrows():
        if r["mean"] > best:
            front.append(i)
            best = r["mean"]
    return points.loc[front]


def cost_figure(units: pd.DataFrame, ringed: pd.DataFrame):
    """(figure, axes, label texts) of accuracy against training cost, unsaved.

    Every (backbone, arm) (``Tables.variants``) is a point; only the Pareto front and ``ringed`` (each arm's choice
    by the decision rule; the decision's own is ringed twice) are named. The names are spread by adjustText, then
    any pair still touching is pushed apart (``_untangle``) and kept inside the axes, with thin leader lines to
    their points. The layout is computed and frozen before the names move: names are placed in data coordinates,
    so a later layout pass would move the axes under them."""
    v = units
    markers = backbone_markers(v.backbone)
    fig, axes = new_figure(figsize=(10, 6))
    ax = axes[0, 0]
    for (arm, backbone), part in v.groupby(["arm", "backbone"]):
        ax.scatter(part["cost"], part["mean"], color=KIND_COLOURS.get(arm, "grey"),
                   marker=markers[backbone], s=70 if markers[backbone] == "*" else 36,  # a star reads small
                   alpha=0.85, edgecolors="white", linewidths=0.4, zorder=3)
    front = pareto_front(v)
    ax.step(front["cost"], front["mean"], where="post", color="grey", linestyle="--", lw=1, zorder=2)
    ax.scatter(ringed["cost"], ringed["mean"], s=150, facecolors="none", edgecolors="black", linewidths=1.0, zorder=4)
    chosen = v[v.chosen]
    ax.scatter(chosen["cost"], chosen["mean"], s=320, facecolors="none", edgecolors="black", linewidths=1.0, zorder=4)
    if v["cost"].max() > 10 * max(v["cost"].min(), 1e-9):  # log only when costs span orders of magnitude
        ax.set_xscale("log")
    ax.set_xlabel("training cost, wall seconds incl. features (mean over split seeds)", fontsize=8)
    ax.set_ylabel("test mean per-class accuracy (mean over split seeds)", fontsize=8)
    ax.set_title("Accuracy against cost: named are the Pareto front and each arm's choice (ringed; twice: the "
                 "decision)", fontsize=9)
    _cost_legends(fig, v.arm, markers)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.08 * (hi - lo))  # headroom for the names of the best points
    ax.set_xlim(ax.get_xlim())
    fig.canvas.draw()
    fig.set_layout_engine("none")  # frozen: the names below are placed against this layout
    named = pd.concat([front, ringed[~ringed.index.isin(front.index)]])
    return fig, ax, _name_points(ax, named, v)


def _cost_legends(fig, arms, markers: dict[str, str]) -> None:
    """Beside the axes, inside the figure: the arms' colours and what the line and the rings mean, and the
    backbones' markers."""
    fig.legend(handles=_arm_handles(arms) + [
        Line2D([], [], color="grey", linestyle="--", label="Pareto front"),
        Line2D([], [], linestyle="", marker="o", markersize=10, markerfacecolor="none", markeredgecolor="black",
               label="the arm's choice"),
        Line2D([], [], linestyle="", marker="o", markersize=15, markerfacecolor="none", markeredgecolor="black",
               label="val-chosen (the decision)")], title="arm", fontsize=7, title_fontsize=8,
        loc="outside right upper")
    fig.legend(handles=_marker_handles(markers), title="backbone", fontsize=7, title_fontsize=8,
               loc="outside right lower")


def _name_points(ax, named: pd.DataFrame, points: pd.DataFrame) -> list:
    """Name each of ``named``, kept off every point of ``points`` and off each other, with leader lines."""
    # A pale box keeps a name readable where it must sit over the front line or another point.
    box = {"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.75}
    texts = [ax.text(r.cost, r.mean, unit_label(r), fontsize=7, zorder=5, bbox=box) for r in named.itertuples()]
    if texts:
        adjust_text(texts, x=points["cost"].to_numpy(float), y=points["mean"].to_numpy(float), ax=ax,
                    expand=(1.15, 1.4), iter_lim=ADJUST_STEPS)
        _untangle(texts, ax)
        _keep_inside(texts, ax)
        _leader_lines(texts, named, ax)
    return texts


def _keep_inside(texts, ax) -> None:
    """Move back inside the axes any name that ``_untangle`` pushed past an edge."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    for t in texts:
        box = t.get_window_extent(renderer)
        dx = min(0.0, frame.x1 - box.x1) + max(0.0, frame.x0 - box.x0)
        dy = min(0.0, frame.y1 - box.y1) + max(0.0, frame.y0 - box.y0)
        if dx or dy:
            x, y = ax.transData.transform(t.get_position())
            t.set_position(ax.transData.inverted().transform((x + dx, y + dy)))


def _untangle(texts, ax, *, pad: float = 4.0) -> None:
    """Push apart, upwards, any names adjustText left touching: placed lowest first, each moves up past
    whatever it meets. adjustText is a force simulation stopped after ADJUST_STEPS, not a guarantee."""
    renderer = ax.figure.canvas.get_renderer()
    placed = []
    for t in sorted(texts, key=lambda t: t.get_window_extent(renderer).y0):
        box = t.get_window_extent(renderer)
        for _ in range(len(texts) + 1):
            hit = [b for b in placed if box.x0 - pad < b.x1 and b.x0 - pad < box.x1
                   and box.y0 - pad < b.y1 and b.y0 - pad < box.y1]
            if not hit:
                break
            x, y = ax.transData.transform(t.get_position())
            t.set_position(ax.transData.inverted().transform((x, y + max(b.y1 for b in hit) + pad - box.y0)))
            box = t.get_window_extent(renderer)
        placed.append(box)


def _leader_lines(texts, named: pd.DataFrame, ax, *, min_px: float = 6.0) -> None:
    """A thin line from each moved name's nearest edge to its point."""
    renderer = ax.figure.canvas.get_renderer()
    for t, r in zip(texts, named.itertuples()):
        box = t.get_window_extent(renderer)
        px, py = ax.transData.transform((r.cost, r.mean))
        ex, ey = min(max(px, box.x0), box.x1), min(max(py, box.y0), box.y1)
        if np.hypot(ex - px, ey - py) < min_px:
            continue
        (x0, y0), (x1, y1) = ax.transData.inverted().transform([(ex, ey), (px, py)])
        ax.plot([x0, x1], [y0, y1], color="0.45", lw=0.5, zorder=4, scalex=False, scaley=False)


def fewshot_differences(pairs: pd.DataFrame, *, chosen_backbone: str | None, crossovers: dict):
    """Per backbone, the fine-tune minus the head at each k (``Tables.fewshot_pairs``) with its 95% interval, a line
    at 0, and each backbone's crossover (the first k whose interval is above 0), if any; the decision's backbone
    drawn thicker."""
    fig, axes = new_figure(figsize=(7, 4.4))
    ax = axes[0, 0]
    backbones = sorted(pairs.backbone.unique())
    width = 0.06 * (len(backbones) - 1)
    for i, (backbone, marker) in enumerate(zip(backbones, backbone_markers(backbones).values())):
        part = pairs[pairs.backbone == backbone].sort_values("k_per_class")
        shift = np.exp(-width / 2 + 0.06 * i)  # side by side on the log axis, so intervals do not hide each other
        mine = backbone == chosen_backbone
        k = part["k_per_class"].to_numpy(float) * shift
        ax.errorbar(k, 100 * part["diff"], yerr=100 * np.vstack([part["diff"] - part.lo, part.hi - part["diff"]]),
                    marker=marker, capsize=3, lw=2.2 if mine else 1.0,
                    label=backbone + (" (val-chosen)" if mine else "")
                    + (f"; ahead from k = {crossovers[backbone]}" if crossovers.get(backbone) else ""))
    ax.axhline(0, color="grey", lw=0.8)
    ks = sorted(set(pairs["k_per_class"].astype(int)))
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.xaxis.set_minor_locator(NullLocator())  # log minor ticks would label ks nobody measured
    ax.set_xlabel("training images per class (k, log scale)")
    ax.set_ylabel("fine-tune − head, test mean per-class\naccuracy (pts, 95% interval)")
    ax.set_title("Few-shot: both arms on the same drawn images (above 0: fine-tuning ahead)", fontsize=9)
    fig.legend(fontsize=7, loc="outside upper center", ncols=min(3, len(backbones)))
    return fig


def training_curves(rows, *, chosen: set[int] = frozenset()):
    """Small multiples, one row of panels per policy: every fine-tune's per-epoch training loss (left) and val
    mean per-class accuracy (right), one line per (backbone, split seed) coloured by backbone, the kept epoch
    ringed; the rows in ``chosen`` (the val-chosen fine-tunes) drawn thick."""
    policies = sorted({r.method for r in rows})
    backbones = sorted({r.backbone for r in rows})
    colours = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(backbones)}
    fig, axes = new_figure(figsize=(10, 2.6 * len(policies) + 1.0), nrows=len(policies), ncols=2)
    for (loss_ax, val_ax), policy in zip(axes, policies):
        for r in (r for r in rows if r.method == policy):
            curve = r.selection.curve
            epochs = [p["epoch"] for p in curve]
            style = {"color": colours[r.backbone], "lw": 2.2 if r.index in chosen else 0.8, "marker": "."}
            loss_ax.plot(epochs, [p["train_loss"] for p in curve], **style)
            val_ax.plot(epochs, [p["val_mean_per_class"] for p in curve], **style)
            best = [p for p in curve if p["epoch"] == r.selection.best_epoch]
            if best:
                val_ax.scatter([best[0]["epoch"]], [best[0]["val_mean_per_class"]], s=60, facecolors="none",
                               edgecolors=colours[r.backbone], zorder=3)
        loss_ax.set_ylabel(f"{policy}\ntraining loss", fontsize=8)
        val_ax.set_ylabel("val mean per-class acc.", fontsize=8)
    axes[0, 0].set_title("Training loss per epoch", fontsize=9)
    axes[0, 1].set_title("Val accuracy per epoch (ringed: epoch kept)", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    handles = [Line2D([], [], color=colours[b], label=b) for b in backbones]
    handles.append(Line2D([], [], color="0.3", lw=2.2, label="val-chosen fine-tune"))
    fig.legend(handles=handles, fontsize=7, loc="outside lower center", ncols=min(4, len(handles)))
    return fig


def anytime_curves(curves: pd.DataFrame, *, chosen: tuple[str, str] | None = None):
    """Per backbone, each arm's best val so far against trials (left) and against cumulative seconds (right),
    one thin line per split seed and their mean: what each arm found for what it was allowed to try. The
    decision's (backbone, arm) is named in its panel."""
    backbones = sorted(curves.backbone.unique())
    fig, axes = new_figure(figsize=(9, 2.4 * len(backbones) + 1.0), nrows=len(backbones), ncols=2)
    for row, backbone in zip(axes, backbones):
        part = curves[curves.backbone == backbone]
        for arm, arm_part in part.groupby("arm"):
            mine = chosen == (backbone, arm)
            for _, seed in arm_part.groupby("split_seed"):
                row[0].step(seed.trials, 100 * seed.best_val, where="post", color=KIND_COLOURS[arm], alpha=0.3, lw=0.8)
                row[1].step(seed.seconds, 100 * seed.best_val, where="post", color=KIND_COLOURS[arm], alpha=0.3,
                            lw=0.8)
            mean = arm_part.groupby("trials").best_val.mean()
            row[0].step(mean.index, 100 * mean.to_numpy(), where="post", color=KIND_COLOURS[arm], lw=3 if mine else 1.6)
        row[0].set_ylabel(f"{backbone}\nbest val %", fontsize=8)
        if chosen is not None and chosen[0] == backbone:
            row[0].set_title(f"val-chosen: {ARM_NAMES[chosen[1]]}", fontsize=8)
        row[1].set_xscale("log")
    axes[-1][0].set_xlabel("trials")
    axes[-1][1].set_xlabel("cumulative seconds (log)")
    fig.suptitle("Best val mean per-class accuracy so far (thin: each split seed; thick: their mean)", fontsize=9)
    handles = _arm_handles(curves.arm)
    fig.legend(handles=handles, fontsize=7, loc="outside lower center", ncols=len(handles))
    return fig
