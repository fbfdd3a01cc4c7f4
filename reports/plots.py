"""The report's figures (matplotlib, Agg): each function draws fields of ``reports.tables.Tables`` into one PNG.

The comparison figures show one mark per variant (``Tables.variants``: averaged over split seeds), coloured
by arm and shaped by backbone, so a study of some fifty variants stays readable; ``cost_figure`` builds the
accuracy-against-cost figure without saving it, for tests that inspect it.
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


def _save(fig, path: Path, *, layout: bool = True) -> Path:
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def backbone_markers(backbones) -> dict[str, str]:
    """A fixed marker per backbone: single backbones in sorted order through ``MARKERS``, fused sets
    through ``FUSED_MARKERS``, so the same backbone gets the same marker in every figure of a run."""
    names = sorted(set(backbones))
    single = [b for b in names if not b.startswith(FUSED_PREFIX)]
    fused = [b for b in names if b.startswith(FUSED_PREFIX)]
    out = {b: MARKERS[i % len(MARKERS)] for i, b in enumerate(single)}
    out.update({b: FUSED_MARKERS[i % len(FUSED_MARKERS)] for i, b in enumerate(fused)})
    return out


def _name(r) -> str:
    return f"{r.backbone}: {r.method} ({r.feature_set})"


def _arm_handles(arms) -> list:
    return [Line2D([], [], linestyle="", marker="o", color=KIND_COLOURS.get(a, "grey"), label=ARM_NAMES.get(a, a))
            for a in ("head", "finetune") if a in set(arms)]


def _marker_handles(markers: dict[str, str]) -> list:
    return [Line2D([], [], linestyle="", marker=m, color="0.3", label=b) for b, m in markers.items()]


def accuracy_by_method(variants: pd.DataFrame, path: Path) -> Path:
    """Test mean per-class accuracy per variant (``Tables.variants``), one bar each, coloured by arm: mean ± sd
    over split seeds when a variant has several, else its 95% bootstrap CI. Height and font follow the bar
    count so that fifty variants keep one readable label each."""
    v = variants.sort_values(["backbone", "arm", "mean"], ascending=[True, True, False],
                             key=lambda c: c.map({"head": 0, "finetune": 1}) if c.name == "arm" else c)
    v = v.reset_index(drop=True)
    n = len(v)
    over_seeds = bool((v.n_seeds > 1).any())
    if over_seeds:
        err = v["sd"].fillna(0).to_numpy(dtype=float)
        what = "mean ± sd over split seeds"
    else:
        lo, hi = v["lo"].astype(float), v["hi"].astype(float)
        err = (None if lo.isna().any() or hi.isna().any() else
               np.vstack([v["mean"] - lo, hi - v["mean"]]).astype(float))
        what = "95% bootstrap CI"
    font = 8 if n <= 25 else 7 if n <= 60 else 6
    fig, ax = plt.subplots(figsize=(9, 0.24 * n * font / 8 + 1.8), dpi=DPI)
    y = np.arange(n)
    ax.barh(y, v["mean"], xerr=err, color=[KIND_COLOURS.get(a, "grey") for a in v.arm],
            capsize=2 if n > 25 else 3, error_kw={"elinewidth": 0.8})
    ax.set_yticks(y, [_name(r) for r in v.itertuples()], fontsize=font)
    ax.set_ylim(n - 0.4, -0.6)  # first variant on top: read top-down, heads before fine-tunes per backbone
    for i in np.flatnonzero(v.backbone.to_numpy()[1:] != v.backbone.to_numpy()[:-1]):
        ax.axhline(i + 0.5, color="0.6", lw=0.6)  # a rule between backbones
    below = 0 if err is None else err if err.ndim == 1 else err[0]
    ax.set_xlim(max(0.0, float(np.nanmin(v["mean"] - below)) - 0.05), 1.0)
    ax.set_xlabel(f"test mean per-class accuracy ({what})", fontsize=font + 1)
    ax.set_title("Accuracy by variant", fontsize=font + 2)
    ax.legend(handles=_arm_handles(v.arm), fontsize=font, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0)  # outside: a bar may reach any accuracy
    return _save(fig, path)


def pareto_front(points: pd.DataFrame) -> pd.DataFrame:
    """The variants no other variant beats on both cost and accuracy (cheapest first)."""
    front, best = [], -np.inf
    for i, r in points.sort_values(["cost", "mean"], ascending=[True, False]).iterrows():
        if r["mean"] > best:
            front.append(i)
            best = r["mean"]
    return points.loc[front]


def cost_figure(variants: pd.DataFrame, val_best: pd.DataFrame):
    """(figure, axes, label texts) of accuracy against training cost, unsaved.

    Every variant (``Tables.variants``) is a point; only the Pareto-front variants and each arm's val-best
    variant (``Tables.val_best_per_arm``, ringed) are named, since fifty names on one plot read as none. The
    names are spread by adjustText, then any pair still touching is pushed apart (``_untangle``), and thin
    leader lines join each name to its point. Layout is final before the names move: names are placed in data
    coordinates, so a later ``tight_layout`` would move the axes under them and could make them collide again."""
    v = variants
    markers = backbone_markers(v.backbone)
    fig, ax = plt.subplots(figsize=(10, 6), dpi=DPI)
    for (arm, backbone), part in v.groupby(["arm", "backbone"]):
        ax.scatter(part["cost"], part["mean"], color=KIND_COLOURS.get(arm, "grey"),
                   marker=markers[backbone], s=70 if markers[backbone] == "*" else 36,  # a star reads small
                   alpha=0.85, edgecolors="white", linewidths=0.4, zorder=3)
    front = pareto_front(v)
    ax.step(front["cost"], front["mean"], where="post", color="grey", linestyle="--", lw=1, zorder=2)
    ax.scatter(val_best["cost"], val_best["mean"], s=150, facecolors="none", edgecolors="black",
               linewidths=1.0, zorder=4)
    if v["cost"].max() > 10 * max(v["cost"].min(), 1e-9):  # log only when costs span orders of magnitude
        ax.set_xscale("log")
    ax.set_xlabel("training cost, wall seconds (mean over split seeds; heads: sweep + refit + feature extraction "
                  "when recorded)", fontsize=8)
    ax.set_ylabel("test mean per-class accuracy (mean over split seeds)", fontsize=8)
    ax.set_title("Accuracy against cost: named are the Pareto front and each arm's val-best variant (ringed)",
                 fontsize=9)
    _cost_legends(ax, v.arm, markers)
    fig.tight_layout()
    # Frozen limits, with headroom for the names of the best points: the names and their leader lines
    # must not rescale the axes under the positions they were given.
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.08 * (hi - lo))
    ax.set_xlim(ax.get_xlim())
    named = pd.concat([front, val_best[~val_best.index.isin(front.index)]])
    return fig, ax, _name_points(ax, named, v)


def _cost_legends(ax, arms, markers: dict[str, str]) -> None:
    """Beside the axes: the arms' colours and what the line and the rings mean (top), the backbones' markers
    (bottom)."""
    legend = ax.legend(handles=_arm_handles(arms) + [
        Line2D([], [], color="grey", linestyle="--", label="Pareto front"),
        Line2D([], [], linestyle="", marker="o", markersize=10, markerfacecolor="none", markeredgecolor="black",
               label="val-best of its arm")], title="arm", fontsize=7, title_fontsize=8,
        loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.add_artist(legend)
    ax.legend(handles=_marker_handles(markers), title="backbone", fontsize=7, title_fontsize=8,
              loc="lower left", bbox_to_anchor=(1.01, 0.0), borderaxespad=0)


def _name_points(ax, named: pd.DataFrame, points: pd.DataFrame) -> list:
    """Name each of ``named``, kept off every point of ``points`` and off each other, with leader lines."""
    # A pale box keeps a name readable where it must sit over the front line or another point.
    box = {"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.75}
    texts = [ax.text(r.cost, r.mean, _name(r), fontsize=7, zorder=5, bbox=box) for r in named.itertuples()]
    if texts:
        adjust_text(texts, x=points["cost"].to_numpy(float), y=points["mean"].to_numpy(float), ax=ax,
                    expand=(1.15, 1.4), iter_lim=ADJUST_STEPS)
        _untangle(texts, ax)
        _leader_lines(texts, named, ax)
    return texts


def accuracy_vs_cost(variants: pd.DataFrame, val_best: pd.DataFrame, path: Path) -> Path:
    """Accuracy against training wall time, with the Pareto front (nothing both cheaper and better)."""
    fig, _, _ = cost_figure(variants, val_best)
    return _save(fig, path, layout=False)


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


def confusion(matrix: list[list[int]], class_names: list[str], title: str, path: Path) -> Path:
    cm = np.asarray(matrix, dtype=float)
    cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(cm)
    fig, ax = plt.subplots(figsize=(min(2 + 0.12 * n, 16), min(2 + 0.12 * n, 16)))
    im = ax.imshow(cm, cmap="viridis", vmin=0, vmax=1)
    if n <= 40:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=6)
        ax.set_yticks(range(n), class_names, fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def per_class_accuracy(per_class: pd.DataFrame, title: str, path: Path) -> Path:
    """One model's test accuracy per class, as ordered in ``per_class`` (``ChosenModel.per_class``: worst first)."""
    fig, ax = plt.subplots(figsize=(8, max(3, 0.11 * len(per_class) + 1)))
    ax.barh(per_class["class_name"], per_class["accuracy"], color="tab:blue")
    ax.tick_params(axis="y", labelsize=5 if len(per_class) > 60 else 7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("test accuracy")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def fewshot_curves(arms: pd.DataFrame, path: Path, *, crossover: int | None) -> Path:
    """Each arm's few-shot curve (``Tables.fewshot_arms``): mean ± sd over distinct fits of test mean per-class
    accuracy against training images per class, log k, and a dotted line at ``crossover``, the report's verdict
    on where the fine-tune arm first gets ahead (``Tables.crossover``)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=DPI)
    for arm in ("head", "finetune"):
        part = arms[arms.arm == arm].sort_values("k_per_class")
        if part.empty:
            continue
        ax.errorbar(part["k_per_class"], part["mean"], yerr=part["sd"].astype(float).fillna(0).to_numpy(),
                    marker="o", capsize=3, color=KIND_COLOURS[arm], label=f"{ARM_NAMES[arm]} (val-chosen)")
    if crossover is not None:
        ax.axvline(crossover, color="grey", linestyle=":", label=f"fine-tuning ahead from k = {crossover}")
    ks = sorted(set(arms["k_per_class"].astype(int)))
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.xaxis.set_minor_locator(NullLocator())  # log minor ticks would label ks nobody measured
    ax.set_xlabel("training images per class (k, log scale)")
    ax.set_ylabel("test mean per-class accuracy\n(mean ± sd over distinct fits)")
    ax.set_title("Few-shot curves")
    ax.legend(fontsize=7)
    return _save(fig, path)


def training_curves(rows, path: Path) -> Path:
    """Every fine-tune's per-epoch training loss (left) and val mean per-class accuracy (right), from
    its row's ``selection.curve``; the epoch kept (best val) is ringed."""
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        curve = r.selection.curve
        epochs = [p["epoch"] for p in curve]
        name = f"{r.backbone}: {r.method} ({r.feature_set}) seed {r.split_seed}"
        line, = loss_ax.plot(epochs, [p["train_loss"] for p in curve], marker=".", label=name)
        val_ax.plot(epochs, [p["val_mean_per_class"] for p in curve], marker=".", color=line.get_color(), label=name)
        best = [p for p in curve if p["epoch"] == r.selection.best_epoch]
        if best:
            val_ax.scatter([best[0]["epoch"]], [best[0]["val_mean_per_class"]], s=80, facecolors="none",
                           edgecolors=line.get_color())
    loss_ax.set(xlabel="epoch", ylabel="mean training loss", title="Training loss")
    val_ax.set(xlabel="epoch", ylabel="val mean per-class accuracy", title="Val accuracy (ringed: epoch kept)")
    val_ax.legend(fontsize=6)
    return _save(fig, path)


def anytime_curves(curves: pd.DataFrame, path: Path) -> Path:
    """Per backbone, each arm's best val so far against trials (left) and against cumulative seconds (right),
    one thin line per split seed and their mean: what each arm found for what it was allowed to try."""
    backbones = sorted(curves.backbone.unique())
    fig, axes = plt.subplots(len(backbones), 2, figsize=(9, 2.6 * len(backbones) + 0.6), squeeze=False)
    colours = {"head": "tab:blue", "finetune": "tab:orange"}
    for row, backbone in zip(axes, backbones):
        part = curves[curves.backbone == backbone]
        for arm, arm_part in part.groupby("arm"):
            for _, seed in arm_part.groupby("split_seed"):
                row[0].step(seed.trials, 100 * seed.best_val, where="post", color=colours[arm], alpha=0.3, lw=0.8)
                row[1].step(seed.seconds, 100 * seed.best_val, where="post", color=colours[arm], alpha=0.3, lw=0.8)
            mean = arm_part.groupby("trials").best_val.mean()
            row[0].step(mean.index, 100 * mean.to_numpy(), where="post", color=colours[arm], lw=2,
                        label="frozen features + head" if arm == "head" else "fine-tune")
        row[0].set_ylabel(f"{backbone}\nbest val %", fontsize=8)
        row[0].legend(loc="lower right", fontsize=7)
        row[1].set_xscale("log")
    axes[-1][0].set_xlabel("trials")
    axes[-1][1].set_xlabel("cumulative seconds (log)")
    fig.suptitle("Best val mean per-class accuracy so far (thin: each split seed; thick: their mean)", fontsize=9)
    return _save(fig, path)
