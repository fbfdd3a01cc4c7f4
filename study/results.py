"""The result row: the one typed record that heads, fine-tunes, ensembles and few-shot fits write and reports read.

Writers construct a ``ResultRow`` (its checks run on construction), and ``append_rows`` writes its JSON
(``to_dict``) as one line of ``results.jsonl``; readers get it back with ``read_results``
(``ResultRow.from_dict``, which also reads the flat rows older code wrote). One ``Selection`` shape serves
both arms: the settings tried on val (``points``), the one chosen, and for fine-tunes the per-epoch curve.
One ``Costs`` record holds the wall seconds. A row names its split seed and, for few-shot fits, its draw
seed apart. The arms' shared names (``ARMS``, the ``fused:`` prefix, ``ENSEMBLE``) live here too.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from study.protocol import choose

KINDS = ("head", "finetune", "fewshot")
# Keys every results.jsonl line holds (``ResultRow.to_dict``); older lines held ``seed`` for ``split_seed``.
ARTEFACT_KEYS = ("head_key", "run_key", "fit_keys")  # where a row's models are (ResultRow.keys)
REQUIRED_KEYS = ("kind", "backbone", "method", "feature_set", "split_seed", "draw_seed", "metrics", "hyperparams",
                 "train_s", "predict_s", "cache_key", "manifest_hash", "n_train", "n_test")
ARMS = ("head", "finetune")
FUSED_PREFIX = "fused:"  # a fused feature set (heads), or an ensemble of fine-tunes of the same backbones
ENSEMBLE = "ft:ensemble"  # the method of an ensemble of fine-tunes
# Tiny random-initialised networks for tests (extract/backbones.py): a row of theirs says nothing about transfer.
TEST_BACKBONES = ("test_efficientnet", "test_efficientnet_gn")


def fused_name(backbones: list[str]) -> str:
    return FUSED_PREFIX + "+".join(backbones)


def fused_parts(name: str) -> list[str]:
    """The backbones a feature set's name stands for: a fused set's parts (``fused_name`` reversed), else itself."""
    return name.removeprefix(FUSED_PREFIX).split("+") if name.startswith(FUSED_PREFIX) else [name]


@dataclass(frozen=True)
class Point:
    """One setting tried on val (fine-tunes: scored at its best epoch)."""
    params: dict
    val_mean_per_class: float
    val_log_loss: float | None = None
    best_epoch: int | None = None
    epochs_run: int | None = None
    stopped_early: bool | None = None
    extra: dict = field(default_factory=dict)  # e.g. a probe's phase-1 best epoch


@dataclass(frozen=True)
class Selection:
    """How a row's settings were chosen on val: the points tried, the chosen one, and (fine-tunes) the chosen
    point's per-epoch ``curve`` with the epoch kept."""
    points: tuple[Point, ...]
    chosen: int
    metric: str = "val_mean_per_class"
    best_epoch: int | None = None
    curve: tuple[dict, ...] = ()
    stopped_early: bool | None = None

    def __post_init__(self):
        if not 0 <= self.chosen < len(self.points):
            raise ValueError(f"selection: chosen point {self.chosen} of {len(self.points)}")

    @property
    def best(self) -> Point:
        return self.points[self.chosen]

    @classmethod
    def of(cls, points: list[Point], **kw) -> "Selection":
        """The selection that chooses among ``points`` by the protocol's rule (study/protocol.py)."""
        return cls(points=tuple(points), chosen=choose([(p.val_mean_per_class, p.val_log_loss) for p in points]), **kw)


@dataclass(frozen=True)
class Costs:
    """Wall seconds. ``train_s``: heads, the sweep and refit; fine-tunes, every epoch of every fit plus their share
    of the stored cut (``prefix_cache_s``). ``feature_s``: a head's share of the stored features it read."""
    train_s: float
    predict_s: float
    feature_s: float | None = None
    select_s: float | None = None
    refit_s: float | None = None
    prefix_cache_s: float | None = None
    train_epochs_s: float | None = None

    @property
    def total_s(self) -> float:
        """Training including the features or activations it read: what the report compares the arms on."""
        return self.train_s + (self.feature_s or 0.0)


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

    @classmethod
    def from_dict(cls, m: dict) -> "Metrics":
        return cls(top1=m["top1"], top5=m.get("top5"), mean_per_class=m["mean_per_class"], macro_f1=m["macro_f1"],
                   ci95={k: (v[0], v[1]) for k, v in (m.get("ci95") or {}).items()},
                   per_class_acc=tuple(m.get("per_class_acc") or ()),
                   confusion=tuple(tuple(r) for r in m.get("confusion") or ()), n_boot=m.get("n_boot"))

    def to_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "mean_per_class": self.mean_per_class, "macro_f1": self.macro_f1,
                "ci95": {k: list(v) for k, v in self.ci95.items()}, "per_class_acc": list(self.per_class_acc),
                "confusion": [list(r) for r in self.confusion], "n_boot": self.n_boot}


@dataclass(frozen=True)
class ResultRow:
    kind: str                       # head | finetune | fewshot
    backbone: str                   # a registry name, or fused:a+b
    method: str                     # lr, svm, knn, ft:<policy>, ft:ensemble
    feature_set: str                # heads: clean | aug | stages; fine-tunes: the augmentation policy
    split_seed: int
    metrics: Metrics
    test_sample_id: tuple[str, ...]
    test_pred: tuple[int, ...]
    hyperparams: dict
    costs: Costs
    n_train: int                    # images (few-shot: k x classes)
    n_test: int
    class_names: tuple[str, ...]
    cache_key: str
    manifest_hash: str
    selection: Selection | None = None
    val_mean_per_class: float | None = None  # the chosen setting's val score: what the report chooses by
    fit_on: str = "train+val"       # what the scored model was fit on
    draw_seed: int | None = None    # few-shot rows: the seed of the drawn images
    k_per_class: int | None = None
    tta: str = "none"
    views: int | None = None        # augmented views per training image (0: none; None: not recorded)
    views_fresh: bool = False       # augmentation drawn anew every step (naive fine-tune loop)
    trainable_params: int | None = None
    total_params: int | None = None
    epochs_run: int | None = None
    n_val: int | None = None
    n_fit: int | None = None        # images the scored model was fit on
    n_fit_rows: int | None = None   # feature rows a head was fit on (its augmented views count)
    keys: dict = field(default_factory=dict)  # where its artefacts are: head_key, run_key, fit_keys
    # The val predictions of the model whose val score the row reports (the chosen setting trained on train):
    # what a paired comparison of two variants on val reads.
    val_sample_id: tuple[str, ...] = ()
    val_pred: tuple[int, ...] = ()
    git_sha: str | None = None      # the code that computed the row (None: written before it was recorded)
    index: int = -1                 # its line in results.jsonl (0-based): what the report cites; -1 before

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"results row kind {self.kind!r}; allowed: {KINDS}")
        for split in ("test", "val"):
            ids, pred = getattr(self, f"{split}_sample_id"), getattr(self, f"{split}_pred")
            if len(ids) != len(pred):
                raise ValueError(f"results row {self.method}: {len(ids)} {split} ids, {len(pred)} predictions")
        if self.selection is not None and self.val_mean_per_class is not None:
            # The row's val score is its chosen setting's: never above the best setting it tried on val.
            best = self.selection.best.val_mean_per_class
            if not math.isclose(self.val_mean_per_class, best, rel_tol=0, abs_tol=1e-12):
                raise ValueError(f"results row {self.method} says val_mean_per_class {self.val_mean_per_class}, but "
                                 f"the best setting of its selection scored {best} on val")

    @property
    def seed(self) -> int:
        """The seed the row's fit drew with: the draw seed of a few-shot row, else the split seed."""
        return self.split_seed if self.draw_seed is None else self.draw_seed

    @property
    def arm(self) -> str:
        """head | finetune: the arm that made the row. Few-shot rows belong to the arm whose chosen variant
        was refit on k images per class: the fine-tune's are ``method = "ft:<policy>"``, the rest are heads."""
        return "finetune" if self.method.startswith("ft:") else "head"

    @property
    def val_log_loss(self) -> float | None:
        return self.selection.best.val_log_loss if self.selection else None

    @property
    def n_variants(self) -> int:
        """Settings this row chose among on val (grid points x recipes)."""
        return len(self.selection.points) if self.selection else 1

    # Older names, still read by benchmarks and tests.
    @property
    def train_s(self) -> float:
        return self.costs.train_s

    @property
    def predict_s(self) -> float:
        return self.costs.predict_s

    @property
    def feature_s(self) -> float | None:
        return self.costs.feature_s

    def replace(self, **changes) -> "ResultRow":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The row's JSON object (what a results.jsonl line holds)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "index"}
        out["metrics"] = self.metrics.to_dict()
        del out["costs"], out["keys"]
        out.update(dataclasses.asdict(self.costs))  # flat, as results.jsonl has always held them
        out.update(self.keys)
        out["selection"] = None if self.selection is None else {
            **dataclasses.asdict(self.selection), "points": [dataclasses.asdict(p) for p in self.selection.points],
            "curve": list(self.selection.curve)}
        for key in ("test_sample_id", "test_pred", "class_names", "val_sample_id", "val_pred"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, row: dict, *, index: int = -1) -> "ResultRow":
        if "draw_seed" not in row:
            return _from_flat(row, index=index)
        kw = {f.name: row[f.name] for f in dataclasses.fields(cls) if f.name in row}
        sel = row.get("selection")
        costs = Costs(**{f.name: row[f.name] for f in dataclasses.fields(Costs) if f.name in row})
        kw.update(index=index, metrics=Metrics.from_dict(row["metrics"]), costs=costs, keys=_keys(row),
                  test_sample_id=tuple(row["test_sample_id"]), test_pred=tuple(row["test_pred"]),
                  class_names=tuple(row["class_names"]), val_sample_id=tuple(row.get("val_sample_id") or ()),
                  val_pred=tuple(row.get("val_pred") or ()),
                  selection=None if sel is None else Selection(
                      points=tuple(Point(**p) for p in sel["points"]), chosen=sel["chosen"], metric=sel["metric"],
                      best_epoch=sel["best_epoch"], curve=tuple(sel["curve"]), stopped_early=sel["stopped_early"]))
        return cls(**kw)


def _from_flat(row: dict, *, index: int) -> ResultRow:
    """A row as code before ``ResultRow`` wrote them: flat costs, two selection shapes, ``seed`` the draw seed of
    a few-shot row (its split in ``split_seed``)."""
    missing = [k for k in ("kind", "backbone", "method", "feature_set", "seed", "metrics", "hyperparams", "train_s",
                           "predict_s", "cache_key", "manifest_hash", "n_train", "n_test") if k not in row]
    if missing:
        raise ValueError(f"results row is missing keys {missing}; it has {sorted(row)}")
    selection = _flat_selection(row)
    val = row.get("val_mean_per_class")
    if selection is not None and val is None:
        val = selection.best.val_mean_per_class
    hp = row.get("hyperparams") or {}
    few = row["kind"] == "fewshot"
    return ResultRow(
        index=index, kind=row["kind"], backbone=row["backbone"], method=row["method"],
        feature_set=row["feature_set"], tta=row.get("tta", "none"),
        split_seed=int(row.get("split_seed", row["seed"]) if few else row["seed"]),
        draw_seed=int(row["seed"]) if few else None, k_per_class=row.get("k_per_class"),
        metrics=Metrics.from_dict(row["metrics"]), test_sample_id=tuple(row.get("test_sample_id") or ()),
        test_pred=tuple(row.get("test_pred") or ()), hyperparams=hp, selection=selection, val_mean_per_class=val,
        fit_on=row.get("fit_on") or _fit_on_of_older_row(row),
        views=row["views"] if "views" in row else _views_of_older_row(row),
        views_fresh=bool(row.get("views_fresh", hp.get("path") == "naive")),
        costs=Costs(train_s=float(row["train_s"]), predict_s=float(row["predict_s"]), feature_s=row.get("feature_s"),
                    select_s=row.get("select_s"), refit_s=row.get("refit_s"),
                    prefix_cache_s=row.get("prefix_cache_s"), train_epochs_s=row.get("train_epochs_s")),
        trainable_params=row.get("trainable_params"), total_params=row.get("total_params"),
        epochs_run=row.get("epochs_run"), n_train=int(row["n_train"]), n_val=row.get("n_val"),
        n_fit=row.get("n_fit"), n_fit_rows=row.get("n_fit_rows"), n_test=int(row["n_test"]),
        class_names=tuple(row.get("class_names") or ()), cache_key=row["cache_key"],
        manifest_hash=row["manifest_hash"], keys=_keys(row), git_sha=row.get("git_sha"))


def _keys(row: dict) -> dict:
    return {k: row[k] for k in ARTEFACT_KEYS if k in row}


def _flat_selection(row: dict) -> Selection | None:
    sel = row.get("selection")
    if not sel:
        return None
    if isinstance(sel, list):  # heads: the swept grid
        return Selection.of([Point(params=s["params"], val_mean_per_class=s["val_mean_per_class"],
                                   val_log_loss=s.get("val_log_loss")) for s in sel])
    # Fine-tunes: a "grid" of recipes when the arm records one, else the one recipe it ran.
    grid = sel.get("grid") or [{"params": row.get("hyperparams") or {}, "val_mean_per_class": sel["best_score"],
                                "val_log_loss": sel.get("best_log_loss")}]
    known = ("params", "val_mean_per_class", "val_log_loss", "best_epoch", "epochs_run", "stopped_early")
    points = [Point(**{k: g.get(k) for k in known if k in g}, extra={k: v for k, v in g.items() if k not in known})
              for g in grid]
    return Selection.of(points, metric=sel.get("metric", "val_mean_per_class"), best_epoch=sel.get("best_epoch"),
                        curve=tuple(sel.get("curve") or ()), stopped_early=sel.get("stopped_early"))


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


def check_row(row):
    """``row`` (a ResultRow or its JSON object) if it is a results row the report can read: its JSON line reads
    back as the same row (``ResultRow.from_dict`` refuses it otherwise)."""
    typed = row if isinstance(row, ResultRow) else ResultRow.from_dict(row)
    text = json.dumps(typed.to_dict(), sort_keys=True)
    if json.dumps(ResultRow.from_dict(json.loads(text)).to_dict(), sort_keys=True) != text:
        raise ValueError(f"results row {typed.method} does not survive its own JSON (a value that is not JSON?)")
    return row


def val_best(rows: list):
    """The val-chosen row among ``rows`` (ResultRows, or their JSON objects), by the protocol's rule
    (study/protocol.py)."""
    typed = [r if isinstance(r, ResultRow) else ResultRow.from_dict(r) for r in rows]
    return rows[choose([(r.val_mean_per_class, r.val_log_loss) for r in typed])]


@dataclass(frozen=True)
class TrialRow:
    """One tuner trial (study/tune.py) as the report reads it: what the arm tried on val, and what it cost."""
    arm: str                      # head | finetune
    backbone: str
    split_seed: int
    number: int                   # the trial's number in its study (0-based, in the order trials started)
    state: str                    # COMPLETE | PRUNED
    params: dict
    val_mean_per_class: float | None  # a pruned trial: the last val it reported
    seconds: float
    study: str
    val_log_loss: float | None = None
    best_epoch: int | None = None
    curve: tuple[float, ...] = ()  # fine-tunes: val after each epoch of the scored phase
    at_edge: tuple[str, ...] = ()  # numeric parameters within 5% of an end of their declared range
    cv: float | None = None        # heads choosing by cross-validation (val too small): the score that chose

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "curve": list(self.curve), "at_edge": list(self.at_edge)}

    @classmethod
    def from_dict(cls, row: dict) -> "TrialRow":
        return cls(**{**row, "curve": tuple(row.get("curve") or ()), "at_edge": tuple(row.get("at_edge") or ())})


def append_trials(run_dir: str | Path, trials: list[TrialRow]) -> None:
    if trials:
        path = Path(run_dir) / "trials.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        _append_whole(path, "".join(json.dumps(t.to_dict(), sort_keys=True) + "\n" for t in trials))


def read_trials(run_dir: str | Path) -> list[TrialRow]:
    path = Path(run_dir) / "trials.jsonl"
    return [TrialRow.from_dict(r) for r in read_rows(path)] if path.is_file() else []


# ---------------------------------------------------------------------------------------------- files


def append_rows(path: str | Path, rows: list[ResultRow | dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _append_whole(path, rows_text(rows))


def rows_text(rows: list[ResultRow | dict]) -> str:
    """``rows`` as JSON lines (results.jsonl; what a head or fine-tune folder stores next to its model). A JSON
    object is read as a ResultRow first, so a row the report cannot read is refused when written."""
    typed = [r if isinstance(r, ResultRow) else ResultRow.from_dict(r) for r in rows]
    return "".join(json.dumps(r.to_dict(), sort_keys=True) + "\n" for r in typed)


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


def read_results(path: str | Path) -> list[ResultRow]:
    return [ResultRow.from_dict(r, index=i) for i, r in enumerate(read_rows(path))]


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
