"""The ``results.jsonl`` row: the one schema that heads and fine-tuning write and reports read.

A row is a flat JSON object. Required keys (``REQUIRED_KEYS``) are checked on write so that a
stage cannot emit a row the report cannot read:

- ``kind``: "head" | "finetune" | "fewshot"
- ``backbone``: registry name, e.g. "efficientnet_lite0"
- ``method``: e.g. "lr", "svm", "knn", "ft:head", "ft:last:1"
- ``feature_set``: "clean" | "aug" (heads: which training rows; fine-tune: augmentation policy name)
- ``seed``: int; ``k_per_class``: int or null (few-shot rows)
- ``metrics``: dict from ``study.metrics.evaluate`` (top1, top5, mean_per_class, macro_f1,
  ``ci95`` {metric: [lo, hi]}, per_class_acc, confusion)
- ``test_sample_id`` / ``test_pred``: per-test-sample predictions, manifest order (for McNemar)
- ``hyperparams``: chosen hyperparameters; ``selection``: the val scores of the sweep (heads: a list of
  {params, val_mean_per_class, val_log_loss} per grid point; fine-tunes: {metric, best_epoch,
  best_score, curve, stopped_early})
- ``val_mean_per_class``: the val score of the chosen settings (what the report chooses by);
  ``fit_on``: what the scored model was fit on ("train+val", "train"); ``views``: augmented
  views per training image (0: none); ``views_fresh``: true when augmentation is drawn anew each step
- ``train_s``, ``predict_s``: wall seconds; ``trainable_params``, ``total_params``: ints or null
- ``cache_key``, ``manifest_hash``: what the numbers were computed from
- ``n_train``, ``n_val``, ``n_test``, ``class_names``
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

REQUIRED_KEYS = (
    "kind", "backbone", "method", "feature_set", "seed", "metrics", "hyperparams",
    "train_s", "predict_s", "cache_key", "manifest_hash", "n_train", "n_test",
)
KINDS = ("head", "finetune", "fewshot")


def check_row(row: dict) -> dict:
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
        raise ValueError(f"results row is missing keys {missing}; it has {sorted(row)}")
    if row["kind"] not in KINDS:
        raise ValueError(f"results row kind {row['kind']!r}; allowed: {KINDS}")
    typed = ResultRow.from_dict(row, index=-1)  # a row the report cannot read is refused when written, not when read
    if typed.selection is not None and typed.val_mean_per_class is not None:
        # The row's val score is its chosen setting's: never above the best setting it tried on val.
        best = typed.selection.best.val_mean_per_class
        if not math.isclose(typed.val_mean_per_class, best, rel_tol=0, abs_tol=1e-12):
            raise ValueError(f"results row {row['method']} says val_mean_per_class {typed.val_mean_per_class}, but "
                             f"the best setting of its selection scored {best} on val")
    return row


def append_rows(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(check_row(r), sort_keys=True) + "\n" for r in rows)
    _append_whole(path, lines)


_write = os.write  # the one system call a full disk fails (tests patch it)


def _append_whole(path: Path, text: str) -> None:
    """Append whole lines, durably, or nothing: a failed write (disk full) is cut back to where it started,
    so a reader never meets half a JSON line."""
    from study.errors import WriteFailed, is_write_fault

    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[_write(fd, view):]
            os.fsync(fd)
        except OSError as exc:
            os.ftruncate(fd, start)
            if is_write_fault(exc):
                raise WriteFailed(path, exc) from exc
            raise
    finally:
        os.close(fd)


def read_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n} is not a JSON line: {exc}") from exc
    return rows


def append_skip(run_dir: str | Path, *, stage: str, what: str, reason: str, fix: str = "") -> dict:
    """Record work a run could not do (missing weights, a dropped class...) so the report lists it."""
    row = {"stage": stage, "what": what, "reason": reason, "fix": fix}
    path = Path(run_dir) / "skipped.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    _append_whole(path, json.dumps(row, sort_keys=True) + "\n")
    return row


def read_skips(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "skipped.jsonl"
    return read_rows(path) if path.is_file() else []


# ---------------------------------------------------------------------------------------------
# The typed view of a row: what reports read. Both arms' rows pass through ``ResultRow.from_dict``
# when written (``check_row``) and when read (``read_results``), so the report never guesses a
# default: a missing optional value is None here, decided once.


@dataclass(frozen=True)
class GridPoint:
    """One setting tried on val."""
    params: dict
    val_mean_per_class: float
    val_log_loss: float | None


@dataclass(frozen=True)
class Selection:
    """How a row's settings were chosen on val: one shape for both arms.

    Heads: ``points`` is the grid swept on val, no curve. Fine-tunes: ``points`` is the recipe(s)
    tried (one today) with its best-epoch val score, ``curve`` the per-epoch history
    (``epoch``, ``train_loss``, ``val_mean_per_class``, ...) and ``best_epoch`` the epoch kept.
    """
    metric: str
    points: tuple[GridPoint, ...]
    best_epoch: int | None
    curve: tuple[dict, ...]
    stopped_early: bool | None

    @property
    def best(self) -> GridPoint:
        # Ties by val log-loss when known, then grid order: the same rule as classify.selection.
        return max(self.points, key=lambda p: (p.val_mean_per_class, -_or_inf(p.val_log_loss)))


@dataclass(frozen=True)
class Metrics:
    top1: float
    top5: float | None
    mean_per_class: float
    macro_f1: float
    ci95: dict[str, tuple[float, float]]
    per_class_acc: tuple[float | None, ...]
    confusion: tuple[tuple[int, ...], ...]
    n_boot: int | None


@dataclass(frozen=True)
class ResultRow:
    index: int                      # the 0-based line of results.jsonl: what the report cites
    kind: str                       # head | finetune | fewshot
    backbone: str
    method: str
    feature_set: str
    tta: str
    seed: int                       # split seed (few-shot rows: the draw seed)
    k_per_class: int | None
    metrics: Metrics
    test_sample_id: tuple[str, ...]
    test_pred: tuple[int, ...]
    hyperparams: dict
    selection: Selection | None
    val_mean_per_class: float | None
    val_log_loss: float | None
    fit_on: str
    views: int | None               # augmented views per training image (0: none; None: not recorded)
    views_fresh: bool               # augmentation drawn anew every step (naive fine-tune loop)
    train_s: float
    predict_s: float
    feature_s: float | None
    trainable_params: int | None
    total_params: int | None
    epochs_run: int | None
    n_train: int
    n_val: int | None
    n_test: int
    class_names: tuple[str, ...]
    cache_key: str
    manifest_hash: str
    git_sha: str | None             # the code that computed the row (None: written before it was recorded)

    @property
    def arm(self) -> str:
        """head | finetune: the arm that made the row. Few-shot rows belong to the arm whose chosen variant
        was refit on k images per class: the fine-tune's are ``method = "ft:<policy>"``, the rest are heads."""
        if self.kind == "finetune" or (self.kind == "fewshot" and self.method.startswith("ft:")):
            return "finetune"
        return "head"

    @property
    def n_variants(self) -> int:
        """Settings this row chose among on val (grid points x recipes)."""
        return len(self.selection.points) if self.selection else 1

    @classmethod
    def from_dict(cls, row: dict, *, index: int) -> "ResultRow":
        selection = _selection(row)
        val, val_loss = row.get("val_mean_per_class"), None
        if selection is not None:
            best = selection.best
            val = best.val_mean_per_class if val is None else val
            val_loss = best.val_log_loss
        hp = row.get("hyperparams") or {}
        return cls(
            index=index, kind=row["kind"], backbone=row["backbone"], method=row["method"],
            feature_set=row["feature_set"], tta=row.get("tta", "none"), seed=int(row["seed"]),
            k_per_class=row.get("k_per_class"), metrics=_metrics(row["metrics"]),
            test_sample_id=tuple(row.get("test_sample_id") or ()), test_pred=tuple(row.get("test_pred") or ()),
            hyperparams=hp, selection=selection, val_mean_per_class=val, val_log_loss=val_loss,
            fit_on=row.get("fit_on") or _fit_on_of_older_row(row),
            views=row["views"] if "views" in row else _views_of_older_row(row),
            views_fresh=bool(row.get("views_fresh", hp.get("path") == "naive")),
            train_s=float(row["train_s"]), predict_s=float(row["predict_s"]), feature_s=row.get("feature_s"),
            trainable_params=row.get("trainable_params"), total_params=row.get("total_params"),
            epochs_run=row.get("epochs_run"), n_train=int(row["n_train"]), n_val=row.get("n_val"),
            n_test=int(row["n_test"]), class_names=tuple(row.get("class_names") or ()),
            cache_key=row["cache_key"], manifest_hash=row["manifest_hash"], git_sha=row.get("git_sha"),
        )


def val_best(rows: list[dict]) -> dict:
    """The val-chosen row among ``rows``: the report's rule (reports/collect.py) — the best val score, then
    the lower val log-loss (unknown counts as worst), then the earlier row."""
    typed = [ResultRow.from_dict(r, index=i) for i, r in enumerate(rows)]
    best = min(typed, key=lambda t: (-_or_neg_inf(t.val_mean_per_class), _or_inf(t.val_log_loss), t.index))
    return rows[best.index]


def _or_neg_inf(x: float | None) -> float:
    return -math.inf if x is None or (isinstance(x, float) and math.isnan(x)) else x


def read_results(path: str | Path) -> list[ResultRow]:
    return [ResultRow.from_dict(r, index=i) for i, r in enumerate(read_rows(path))]


def _or_inf(x: float | None) -> float:
    return math.inf if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _metrics(m: dict) -> Metrics:
    return Metrics(top1=m["top1"], top5=m.get("top5"), mean_per_class=m["mean_per_class"], macro_f1=m["macro_f1"],
                   ci95={k: (v[0], v[1]) for k, v in (m.get("ci95") or {}).items()},
                   per_class_acc=tuple(m.get("per_class_acc") or ()),
                   confusion=tuple(tuple(r) for r in m.get("confusion") or ()), n_boot=m.get("n_boot"))


def _selection(row: dict) -> Selection | None:
    sel = row.get("selection")
    if not sel:
        return None
    if isinstance(sel, list):  # heads: the swept grid
        points = tuple(GridPoint(params=s["params"], val_mean_per_class=s["val_mean_per_class"],
                                 val_log_loss=s.get("val_log_loss")) for s in sel)
        return Selection(metric="val_mean_per_class", points=points, best_epoch=None, curve=(), stopped_early=None)
    # Fine-tunes: a "grid" of recipes when the arm records one, else the one recipe it ran.
    grid = sel.get("grid") or [{"params": row.get("hyperparams") or {}, "val_mean_per_class": sel["best_score"],
                                "val_log_loss": sel.get("best_log_loss")}]
    points = tuple(GridPoint(params=g["params"], val_mean_per_class=g["val_mean_per_class"],
                             val_log_loss=g.get("val_log_loss")) for g in grid)
    return Selection(metric=sel.get("metric", "val_mean_per_class"), points=points,
                     best_epoch=sel.get("best_epoch"), curve=tuple(sel.get("curve") or ()),
                     stopped_early=sel.get("stopped_early"))


def _fit_on_of_older_row(row: dict) -> str:
    # What the code did before rows recorded it: heads refit on train+val, fine-tunes trained on
    # train, few-shot heads drew from their pool.
    if row["kind"] == "fewshot":
        return row.get("fewshot_pool", "train")
    return "train+val" if row["kind"] == "head" else "train"


def _views_of_older_row(row: dict) -> int | None:
    if row["kind"] == "finetune":
        hp = row.get("hyperparams") or {}
        return 0 if hp.get("path") == "naive" else hp.get("views")
    return 0 if row["feature_set"] == "clean" else None
