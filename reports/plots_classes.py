"""The error-analysis figures at any class count: the decision's model's worst classes (at most ``WORST``), named,
with counts, beside the other arm's choice on the same test images."""
from __future__ import annotations

import numpy as np

from reports.plots import ARM_NAMES, KIND_COLOURS, new_figure

WORST = 20


def worst_labels(chosen) -> list[int]:
    """The labels of the chosen model's worst classes (``ChosenModel.per_class``: worst first)."""
    return [int(x) for x in chosen.per_class.label.head(WORST)]


def _models(chosen) -> list:
    return [chosen.row] + ([] if chosen.other is None else [chosen.other])


def _name(row) -> str:
    return f"{row.backbone} {row.method} ({row.feature_set}), {ARM_NAMES[row.arm]}"


def confusion(chosen):
    """Per model (the decision's and the other arm's choice), the confusion counts among the worst classes: rows
    the true class, columns the predicted one, each cell's count written in it, coloured by the share of the
    true class's test images; the right margin gives each class's right / total."""
    labels = worst_labels(chosen)
    names = [chosen.class_names[i] for i in labels]
    models = _models(chosen)
    n = len(labels)
    side = 1.2 + 0.32 * n
    fig, axes = new_figure(figsize=(min(2.5 + side * len(models), 24), side + 1.8), ncols=len(models))
    for ax, row in zip(axes[0], models):
        cm = np.asarray(row.metrics.confusion)
        sub = cm[np.ix_(labels, labels)]
        totals = cm[labels].sum(axis=1)
        ax.imshow(sub / np.maximum(totals, 1)[:, None], cmap="Blues", vmin=0, vmax=1)
        for i, j in zip(*np.nonzero(sub)):
            ax.text(j, i, str(sub[i, j]), ha="center", va="center", fontsize=6,
                    color="white" if sub[i, j] > 0.6 * max(totals[i], 1) else "black")
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
        right = ax.secondary_yaxis("right")
        right.set_yticks(range(n), [f"{cm[c, c]}/{t}" for c, t in zip(labels, totals)], fontsize=6)
        ax.set_xlabel("predicted (among these classes)", fontsize=8)
        ax.set_ylabel("true class", fontsize=8)
        ax.set_title(("val-chosen: " if row is chosen.row else "other arm: ") + _name(row), fontsize=8)
    fig.suptitle(f"Confusions among the {n} worst classes of the val-chosen model (split seed {chosen.row.split_seed}; "
                 "right margin: right / test images)", fontsize=9)
    return fig


def per_class(chosen):
    """Test accuracy on the worst classes, one bar per model per class, each bar labelled right / images."""
    labels = worst_labels(chosen)
    names = [chosen.class_names[i] for i in labels]
    models = _models(chosen)
    n = len(labels)
    fig, axes = new_figure(figsize=(8, 0.28 * n * len(models) + 2.2))
    ax = axes[0, 0]
    height = 0.8 / len(models)
    for m, row in enumerate(models):
        cm = np.asarray(row.metrics.confusion)
        right, total = cm[labels, labels], cm[labels].sum(axis=1)
        acc = right / np.maximum(total, 1)
        y = np.arange(n) + (m - (len(models) - 1) / 2) * height
        ax.barh(y, acc, height=height, color=KIND_COLOURS.get(row.arm, "grey"),
                hatch="///" if row is chosen.row else None, edgecolor="black" if row is chosen.row else None,
                label=("val-chosen: " if row is chosen.row else "other arm: ") + _name(row))
        for yy, a, r, t in zip(y, acc, right, total):
            ax.text(min(a, 1.0) + 0.01, yy, f"{r}/{t}", va="center", fontsize=6)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_ylim(n - 0.5, -0.5)  # worst on top
    ax.set_xlim(0, 1.12)  # room for the counts right of a full bar
    ax.set_xlabel(f"test accuracy (split seed {chosen.row.split_seed}); bar labels: right / test images", fontsize=8)
    ax.set_title(f"The {n} worst classes of the val-chosen model", fontsize=9)
    fig.legend(fontsize=7, loc="outside upper center", ncols=1)
    return fig
