"""One tuner for both arms: Optuna studies with the same trial budget, kept in a durable storage under --out.

A *study* is one (backbone or fusion, arm, split seed). It runs ``tune.trials`` trials; each draws a setting from
the arm's declared search space (``[tune.head]`` / ``[tune.finetune]``: a list is a categorical choice, a table
``{low, high, log}`` a numeric range), trains on train and is scored on val (mean per-class accuracy). A
fine-tune trial reports val after every epoch, and the pruner (Hyperband by default) may stop it; a pruned trial
counts as a trial.

Trials live in Optuna storage: a journal file under ``--out`` (``<out>/tune/journal.log``) by default, or an RDB
URL (``tune.storage``), so a killed run resumes its studies. A finished trial is never run again; a trial cut off
mid-way (its worker process is gone) is marked failed and run again with the same parameters, its fits resuming
from their checkpoints. Several workers sharing the storage and ``--out`` share a study's budget: a new trial
starts only under a lock while fewer than ``trials`` are finished or running, so the budget is met exactly, and
the choice waits until every trial of the budget has finished.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from study.atomic import file_lock
from study.hashing import spec_hash
from study.schema import ConfigError, Field, float_range, int_range, is_str, one_of, pattern

log = logging.getLogger(__name__)
SAMPLERS = ("tpe", "random")
PRUNERS = ("hyperband", "median", "none")
FINISHED = ("COMPLETE", "PRUNED")
EDGE = 0.05  # a chosen value within 5% of a range's end (in log space for log ranges) sits "at an edge"
POLL_S = 5.0  # how often a worker whose budget is taken looks at the trials other workers are running


# ---------------------------------------------------------------------------------------------- spaces


@dataclass(frozen=True)
class Param:
    """One declared axis of a search space: ``choices`` (categorical) or ``low``..``high`` (float, or int)."""
    name: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    def suggest(self, trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def at_edge(self, value) -> bool:
        """Whether ``value`` sits within 5% of an end of a numeric range (never for a categorical choice)."""
        if self.choices or self.high == self.low:
            return False
        lo, hi, v = (math.log(self.low), math.log(self.high), math.log(value)) if self.log else \
            (self.low, self.high, value)
        return min(v - lo, hi - v) <= EDGE * (hi - lo)

    def describe(self) -> str:
        if self.choices:
            return "{" + ", ".join(map(str, self.choices)) + "}"
        return f"[{self.low:g}, {self.high:g}]" + (" log" if self.log else "")


def space_param(key: str, value) -> dict:
    """A config value that declares one axis: a non-empty list (categorical) or a table ``{low, high, log}``."""
    if isinstance(value, list) and value and len(set(map(repr, value))) == len(value):
        return value
    if isinstance(value, dict) and set(value) <= {"low", "high", "log"} and {"low", "high"} <= set(value):
        lo, hi = value["low"], value["high"]
        ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (lo, hi)) and lo <= hi
        ok = ok and isinstance(value.get("log", False), bool) and (not value.get("log") or lo > 0)
        if ok:
            return value
    raise ConfigError(f"config key '{key}' has value {value!r}; allowed: a list of distinct choices, or a table "
                      "{low = L, high = H, log = true|false} with L <= H (L > 0 when log)")


def parse_space(table: dict, *, integers: tuple[str, ...] = ()) -> dict[str, Param]:
    """The declared axes of a validated space table; ``integers`` names the ranges that take whole numbers."""
    out = {}
    for name, value in table.items():
        if isinstance(value, list):
            out[name] = Param(name, choices=tuple(value))
        else:
            integer = name in integers
            out[name] = Param(name, low=value["low"], high=value["high"], log=bool(value.get("log", False)),
                              integer=integer)
    return out


# ---------------------------------------------------------------------------------------------- config


def _axis(default, help: str = "", *, each: Callable[[str, Any], Any] | None = None) -> Field:
    """A declared axis; ``each`` checks every value it can take (each choice, or both ends of a range), so a value
    the fit would refuse is refused with the config, not mid-search."""
    def check(key: str, value):
        value = space_param(key, value)
        if each is not None:
            named = [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else \
                [(f"{key}.low", value["low"]), (f"{key}.high", value["high"])]
            for name, v in named:
                each(name, v)
        return value
    return Field(default, check, help)


def _number(description: str, ok: Callable[[float], bool]) -> Callable[[str, Any], Any]:
    return pattern(description, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and ok(v))


# The heads' space: the method and feature set come from classify.heads / classify.feature_sets; these are the
# settings each method's pipeline takes (classify/heads.py). Wide, log-scaled where a value is a scale.
HEAD_SPACE = {
    "norm": _axis(["standard", "l2"], "feature normalisation fitted on the training rows",
                  each=one_of("standard", "l2", "none")),
    "power": _axis([0.5, 1.0], "signed power per feature before the norm (0.5 = signed square root)",
                   each=_number("a number with 0 < power <= 1", lambda v: 0 < v <= 1)),
    "lr_C": _axis({"low": 1e-5, "high": 100.0, "log": True}, "logistic regression's inverse regularisation",
                  each=_number("a number > 0", lambda v: v > 0)),
    "svm_C": _axis({"low": 1e-6, "high": 10.0, "log": True}, "the linear SVM's C",
                   each=_number("a number > 0", lambda v: v > 0)),
    "svm_kernel": _axis(["linear"], "SVM kernels ('linear', 'rbf')", each=one_of("linear", "rbf")),
    "knn_k": _axis({"low": 1, "high": 64, "log": True}, "neighbours (whole numbers)", each=int_range(1)),
    "knn_metric": _axis(["cosine", "euclidean"], "kNN's distance", each=one_of("cosine", "euclidean", "manhattan")),
    "knn_weights": _axis(["uniform", "distance"], "kNN's vote: equal, or by 1/distance",
                         each=one_of("uniform", "distance")),
}
HEAD_INTEGERS = ("knn_k",)
# The fine-tunes' space: the policy comes from finetune.policies; a trial trains for its epochs (the cosine
# schedule's length) unless early stopping or the pruner ends it first, and keeps its best val epoch.
FINETUNE_SPACE = {
    "lr": _axis({"low": 1e-4, "high": 0.1, "log": True}, "the new head's peak learning rate"),
    "backbone_lr_mult": _axis({"low": 0.01, "high": 1.0, "log": True},
                              "unfrozen blocks train at lr x this (policies that train blocks)"),
    "weight_decay": _axis({"low": 1e-6, "high": 0.1, "log": True}, "AdamW's (or SGD's) weight decay"),
    "label_smoothing": _axis({"low": 0.0, "high": 0.3}, "the loss's label smoothing"),
    "epochs": _axis({"low": 2, "high": 15}, "epochs per trial (whole numbers); the high end is the pruner's "
                    "resource"),
}
FINETUNE_INTEGERS = ("epochs",)

SCHEMA = {
    "head": HEAD_SPACE,
    "finetune": FINETUNE_SPACE,
    # Trials per (backbone or fusion, arm, split seed): the same for both arms; a pruned trial counts.
    "trials": Field(12, int_range(1, 10_000), "trials per (backbone, arm, split seed), the same for both arms"),
    "sampler": Field("tpe", one_of(*SAMPLERS), "tpe (seeded TPE) or random (seeded per trial number)"),
    # TPE draws this many trials at random before it models the results (Optuna's n_startup_trials).
    "startup_trials": Field(5, int_range(1, 10_000), "random trials before TPE models the results"),
    "pruner": Field("hyperband", one_of(*PRUNERS), "stops fine-tune trials whose val falls behind, epoch by epoch"),
    "seed": Field(0, int_range(0, 2**31 - 1), "the samplers' seed (each study adds its own name)"),
    # "" = a journal file under --out (nothing to set up); else an RDB URL (e.g. sqlite:///path or postgresql://)
    # that `run_study.py --worker` processes on several machines share (they must share --out too).
    "storage": Field("", is_str, "'' (a journal file under --out) or an Optuna RDB URL"),
    # A trial whose worker has not been heard of for this long (another machine) is taken as cut off.
    "stale_after_s": Field(900.0, float_range(10.0, 86_400.0),
                           "a trial whose worker is silent this long is taken as cut off"),
}


# ---------------------------------------------------------------------------------------------- storage


def storage(*, url: str, tune_dir: Path):
    """The Optuna storage: ``url`` (an RDB URL), or the journal file ``<tune_dir>/journal.log``."""
    import optuna

    if url:
        return optuna.storages.RDBStorage(url)
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

    path = Path(tune_dir) / "journal.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))


class _PerTrialRandom:
    """Random search whose draws depend on (seed, trial number, parameter) alone, so several workers drawing
    trials in any order draw the same settings as one process."""

    def __new__(cls, seed: int):
        import optuna

        class PerTrialRandom(optuna.samplers.RandomSampler):
            def sample_independent(self, study, trial, param_name, param_distribution):
                self._rng.rng.seed(int(spec_hash([seed, trial.number, param_name])[:8], 16))
                return super().sample_independent(study, trial, param_name, param_distribution)
        return PerTrialRandom(seed=seed)


def sampler(cfg: dict, *, name: str):
    import optuna

    seed = int(spec_hash([cfg["seed"], name])[:8], 16)
    if cfg["sampler"] == "random":
        return _PerTrialRandom(seed)
    with warnings.catch_warnings():  # multivariate/group are "experimental" in Optuna's words, stable in use
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg["startup_trials"], multivariate=True,
                                          group=True)


def pruner(cfg: dict, *, max_epochs: int | None):
    import optuna

    if cfg["pruner"] == "none" or not max_epochs:
        return optuna.pruners.NopPruner()
    if cfg["pruner"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg["startup_trials"], n_warmup_steps=1)
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs, reduction_factor=3)


# ---------------------------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Outcome:
    """What a trial's objective found: its val score and (where known) val log-loss, and anything else to keep."""
    val: float
    val_log_loss: float | None = None
    attrs: dict = field(default_factory=dict)


def _worker() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _alive(worker: dict, *, beat: float | None, stale_after_s: float) -> bool:
    if worker.get("host") == socket.gethostname():
        if int(worker.get("pid", -1)) == os.getpid():
            # This process runs one trial at a time and is not running one now: a trial under its pid was left
            # by a killed run whose pid the system gave again.
            return False
        try:
            os.kill(int(worker["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return beat is not None and time.time() - beat < stale_after_s


def _retry_cut_off(study, *, stale_after_s: float) -> int:
    """Mark failed every running trial whose worker is gone, and queue its parameters again; returns how many."""
    import optuna

    n = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", {})
        if _alive(worker, beat=t.user_attrs.get("beat"), stale_after_s=stale_after_s):
            continue
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.user_attrs.get("retry_of", t.number)},
                            skip_if_exists=False)
        n += 1
    return n


def _next_trial(study, *, trials: int, lock: Path, stale_after_s: float):
    """Under the budget's lock: a trial to run (a queued retry first), or None when the budget is taken."""
    import optuna

    states = optuna.trial.TrialState
    with file_lock(lock, what=f"the trial budget of {study.study_name}"):
        _retry_cut_off(study, stale_after_s=stale_after_s)
        counted = study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED, states.RUNNING))
        if len(counted) >= trials:
            return None
        trial = study.ask()
        trial.set_user_attr("worker", _worker())
        trial.set_user_attr("beat", time.time())
        return trial


def _others_running(study) -> int:
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))


def run_trials(study, objective: Callable[[Any], Outcome], *, trials: int, lock: Path,
               stale_after_s: float = 900.0) -> None:
    """Run ``objective`` on new trials of ``study`` until ``trials`` of them are finished or running (here or in
    other workers). The objective raises ``optuna.TrialPruned`` to prune; any other error fails the trial and
    is raised (its parameters are queued again, so a rerun retries them)."""
    import optuna

    while True:
        trial = _next_trial(study, trials=trials, lock=lock, stale_after_s=stale_after_s)
        if trial is None:
            # The budget is taken; trials other workers are running may still finish (or be cut off and come back
            # to be run again): the choice waits for every trial of the budget.
            running = _others_running(study)
            if not running:
                return
            log.info("%s: waiting for %d trial(s) another worker is running", study.study_name, running)
            time.sleep(POLL_S)
            continue
        t0 = time.perf_counter()
        try:
            outcome = objective(trial)
        except optuna.TrialPruned:
            trial.set_user_attr("seconds", time.perf_counter() - t0)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        except BaseException:
            with contextlib.suppress(Exception):  # leave the storage consistent, then report the error
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            raise
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        trial.set_user_attr("val_log_loss", outcome.val_log_loss)
        for key, value in outcome.attrs.items():
            trial.set_user_attr(key, value)
        study.tell(trial, outcome.val)


def beat(trial) -> None:
    """Say this trial's worker is alive (a long trial calls it, e.g. every epoch)."""
    trial.set_user_attr("beat", time.time())


def open_study(*, name: str, cfg: dict, tune_dir: Path, max_epochs: int | None = None):
    """The study ``name`` in the storage (created, or resumed with every trial an earlier run finished)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=name, storage=storage(url=cfg["storage"], tune_dir=tune_dir),
                               sampler=sampler(cfg, name=name), pruner=pruner(cfg, max_epochs=max_epochs),
                               direction="maximize", load_if_exists=True)


def budget_lock(tune_dir: Path, name: str) -> Path:
    """The lock a study's workers take to start a trial (beside the journal; on --out for an RDB storage)."""
    return Path(tune_dir) / f".{name}.lock"


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TrialRecord:
    """A finished trial as the study and the report read it."""
    number: int
    state: str               # COMPLETE | PRUNED
    params: dict
    val: float | None        # its val score (a pruned trial: the last one it reported)
    val_log_loss: float | None
    seconds: float
    attrs: dict
    curve: tuple[float, ...] = ()  # the values it reported, step by step (a fine-tune: val after each epoch)


def finished(study, *, limit: int | None = None) -> list[TrialRecord]:
    """The study's finished trials (complete or pruned), by trial number; with ``limit``, the first ``limit`` of
    them: a study an earlier run took further (its name leaves out the budget) gives a smaller budget only the
    trials that budget would have run, so the arms stay tuned alike."""
    out = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state.name not in FINISHED:
            continue
        curve = tuple(t.intermediate_values[step] for step in sorted(t.intermediate_values))
        attrs = {k: v for k, v in t.user_attrs.items() if k not in ("worker", "beat", "seconds", "val_log_loss")}
        out.append(TrialRecord(number=t.number, state=t.state.name, params=dict(t.params),
                               val=t.value if t.state.name == "COMPLETE" else (curve[-1] if curve else None),
                               val_log_loss=t.user_attrs.get("val_log_loss"),
                               seconds=float(t.user_attrs.get("seconds", 0.0)), attrs=attrs, curve=curve))
    return out if limit is None else out[:limit]
