"""The report's figures (matplotlib, Agg): each function takes tables, writes one PNG, returns its path."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

KIND_COLOURS = {"head": "tab:blue", "finetune": "tab:orange"}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _errors(df: pd.DataFrame, key: str) -> np.ndarray | None:
    lo, hi = df[f"{key}_lo"], df[f"{key}_hi"]
    if lo.isna().any() or hi.isna().any():
        return None
    return np.vstack([df[key] - lo, hi - df[key]]).astype(float)


def accuracy_by_method(main: pd.DataFrame, path: Path) -> Path:
    """Mean per-class accuracy with 95% CI, one bar per (backbone, method)."""
    df = main.sort_values(["backbone", "mean_per_class"])
    names = [f"{b}: {m} ({f})" for b, m, f in zip(df.backbone, df.method, df.feature_set)]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(df) + 1.2))
    ax.barh(names, df["mean_per_class"], xerr=_errors(df, "mean_per_class"),
            color=[KIND_COLOURS.get(k, "grey") for k in df.kind], capsize=3)
    lo = max(0.0, float(df["mean_per_class"].min()) - 0.1)
    ax.set_xlim(lo, 1.0)
    ax.set_xlabel("test mean per-class accuracy (95% bootstrap CI)")
    ax.set_title("Accuracy by method\nblue: frozen features + head; orange: fine-tuning", fontsize=9)
    return _save(fig, path)


def accuracy_vs_cost(main: pd.DataFrame, path: Path) -> Path:
    """Accuracy against training wall time, with the Pareto front (nothing both cheaper and better)."""
    df = main.assign(cost=main["train_s"] + main["feature_s"].fillna(0)).sort_values("cost")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, part in df.groupby("kind"):
        ax.scatter(part["cost"], part["mean_per_class"], label=kind, color=KIND_COLOURS.get(kind, "grey"))
    for _, r in df.iterrows():
        ax.annotate(f"{r.backbone}: {r.method} ({r.feature_set})", (r.cost, r.mean_per_class), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    front, best = [], -np.inf
    for _, r in df.iterrows():
        if r.mean_per_class > best:
            front.append((r.cost, r.mean_per_class))
            best = r.mean_per_class
    if front:
        ax.step(*zip(*front), where="post", color="grey", linestyle="--", label="Pareto front")
    if df["cost"].max() > 10 * max(df["cost"].min(), 1e-9):  # log only when costs span orders of magnitude
        ax.set_xscale("log")
    ax.set_xlabel("training cost, wall seconds (heads: sweep + refit + feature extraction when recorded)")
    ax.set_ylabel("test mean per-class accuracy")
    ax.legend()
    return _save(fig, path)


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
    df = per_class.dropna(subset=["accuracy"]).sort_values("accuracy")
    fig, ax = plt.subplots(figsize=(8, max(3, 0.11 * len(df) + 1)))
    ax.barh(df["class_name"], df["accuracy"], color="tab:blue")
    ax.tick_params(axis="y", labelsize=5 if len(df) > 60 else 7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("test accuracy")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def fewshot_curves(fewshot: pd.DataFrame, path: Path) -> Path:
    """Mean over seeds of test mean per-class accuracy against training images per class."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for (backbone, method, fset), part in fewshot.groupby(["backbone", "method", "feature_set"]):
        g = part.groupby("k_per_class")["mean_per_class"]
        mean, spread = g.mean(), g.std().fillna(0)
        ax.errorbar(mean.index, mean.values, yerr=spread.values, marker="o", capsize=3,
                    label=f"{backbone}: {method} ({fset})")
    ax.set_xlabel("training images per class (k)")
    ax.set_ylabel("test mean per-class accuracy (mean ± sd over seeds)")
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
        name = f"{r.backbone}: {r.method} ({r.feature_set}) seed {r.seed}"
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
