"""The tuner (study/tune.py) on cheap objectives: the budget met exactly, pruned trials counted, a run killed mid-trial
resumed without re-running a finished trial, two worker processes sharing one journal file, spaces declared in the
config with clear errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from study import tune
from study.schema import ConfigError

CFG = {"trials": 8, "sampler": "random", "startup_trials": 3, "pruner": "none", "seed": 3, "storage": "",
       "stale_after_s": 60.0}
SPACE = {"x": {"low": 1e-3, "high": 10.0, "log": True}, "kind": ["a", "b", "c"]}
REPO = Path(__file__).resolve().parent.parent

# A worker process: runs the study `name` under `out` to its budget; the objective logs every call it starts and,
# when asked, hangs in trial `hang_at` (the parent kills it there).
WORKER = r"""
import json, sys, time
from pathlib import Path
from study import tune
out, name, cfg, log, hang_at, pause = sys.argv[1:7]
cfg, hang_at, pause = json.loads(cfg), int(hang_at), float(pause)
space = tune.parse_space({"x": {"low": 1e-3, "high": 10.0, "log": True}, "kind": ["a", "b", "c"]})
def objective(trial):
    params = {k: p.suggest(trial) for k, p in space.items()}
    with open(log, "a") as f:
        f.write(json.dumps({"number": trial.number, "params": params}) + "\n")
    if trial.number == hang_at:
        time.sleep(600)
    time.sleep(pause)
    return tune.Outcome(val=-abs(params["x"] - 1.0) + {"a": 0.0, "b": 0.1, "c": 0.2}[params["kind"]])
study = tune.open_study(name=name, cfg=cfg, tune_dir=Path(out))
tune.run_trials(study, objective, trials=cfg["trials"], lock=tune.budget_lock(Path(out), name))
"""


def _worker(tmp_path, name, *, hang_at=-1, pause=0.0, log="calls.jsonl"):
    return subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), name, json.dumps(CFG),
                             str(tmp_path / log), str(hang_at), str(pause)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def _calls(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _objective(seen: list, *, prune=lambda n: False):
    space = tune.parse_space(SPACE)

    def objective(trial):
        params = {k: p.suggest(trial) for k, p in space.items()}
        seen.append(params)
        if prune(trial.number):
            trial.report(0.1, 0)
            raise optuna.TrialPruned()
        return tune.Outcome(val=-abs(params["x"] - 1.0), val_log_loss=0.5, attrs={"tag": trial.number})
    return objective


def test_the_budget_is_met_exactly_and_a_rerun_runs_nothing(tmp_path):
    study = tune.open_study(name="s", cfg=CFG, tune_dir=tmp_path)
    seen = []
    tune.run_trials(study, _objective(seen), trials=CFG["trials"], lock=tune.budget_lock(tmp_path, "s"))
    assert len(seen) == 8 and [t.number for t in tune.finished(study)] == list(range(8))
    again = tune.open_study(name="s", cfg=CFG, tune_dir=tmp_path)  # the journal under --out: a later run's view
    tune.run_trials(again, _objective(seen), trials=CFG["trials"], lock=tune.budget_lock(tmp_path, "s"))
    assert len(seen) == 8 and len(tune.finished(again)) == 8
    record = tune.finished(again)[0]
    assert record.state == "COMPLETE" and record.val_log_loss == 0.5 and record.attrs["tag"] == 0
    assert record.seconds >= 0 and set(record.params) == {"x", "kind"}


def test_a_smaller_budget_on_a_study_taken_further_reads_only_its_own_first_trials(tmp_path):
    """Study names leave out the budget (a larger budget goes on with the same study): a later, smaller budget
    must still choose among, and be charged for, the trials it would have run, not the larger budget's."""
    study = tune.open_study(name="b", cfg=CFG, tune_dir=tmp_path)
    seen = []
    tune.run_trials(study, _objective(seen), trials=8, lock=tune.budget_lock(tmp_path, "b"))
    tune.run_trials(study, _objective(seen), trials=3, lock=tune.budget_lock(tmp_path, "b"))
    assert len(seen) == 8  # nothing new ran
    assert [t.number for t in tune.finished(study, limit=3)] == [0, 1, 2]
    assert len(tune.finished(study)) == 8


def test_a_running_trial_left_under_this_processs_pid_is_cut_off_and_retried(tmp_path):
    """A killed run's trial stays RUNNING under its pid; when the system gives that pid to the rerun itself, the
    trial is not alive (this process runs one trial at a time), so it is retried instead of waited for forever."""
    study = tune.open_study(name="pid", cfg=CFG, tune_dir=tmp_path)
    left = study.ask()
    left.set_user_attr("worker", {"host": __import__("socket").gethostname(), "pid": os.getpid()})
    left.set_user_attr("beat", time.time())
    seen = []
    tune.run_trials(study, _objective(seen), trials=2, lock=tune.budget_lock(tmp_path, "pid"))
    states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
    assert states[left.number] == "FAIL" and len(tune.finished(study)) == 2 and len(seen) == 2


def test_a_pruned_trial_counts_as_a_trial_and_is_recorded_as_pruned(tmp_path):
    study = tune.open_study(name="p", cfg=CFG, tune_dir=tmp_path)
    seen = []
    tune.run_trials(study, _objective(seen, prune=lambda n: n % 3 == 1), trials=6, lock=tune.budget_lock(tmp_path, "p"))
    records = tune.finished(study)
    assert len(seen) == 6 and len(records) == 6
    assert [r.state for r in records] == ["COMPLETE", "PRUNED", "COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]
    assert records[1].val == 0.1 and records[1].curve == (0.1,)  # the last value it reported


def test_an_objective_error_fails_the_trial_and_queues_its_setting_again(tmp_path):
    study = tune.open_study(name="e", cfg=CFG, tune_dir=tmp_path)
    space, seen = tune.parse_space(SPACE), []

    def flaky(trial):
        params = {k: p.suggest(trial) for k, p in space.items()}
        seen.append(params)
        if len(seen) == 2:
            raise RuntimeError("disk full")
        return tune.Outcome(val=params["x"])
    with pytest.raises(RuntimeError, match="disk full"):
        tune.run_trials(study, flaky, trials=4, lock=tune.budget_lock(tmp_path, "e"))
    tune.run_trials(study, flaky, trials=4, lock=tune.budget_lock(tmp_path, "e"))
    assert len(tune.finished(study)) == 4 and seen[2] == seen[1]  # the failed setting ran again, first
    assert len(seen) == 5


def test_a_run_killed_mid_trial_resumes_without_rerunning_a_finished_trial(tmp_path):
    proc = _worker(tmp_path, "k", hang_at=3)
    deadline = time.time() + 120
    while len(_calls(tmp_path / "calls.jsonl")) < 4 and time.time() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)  # kill -9 inside trial 3
    proc.wait()
    before = _calls(tmp_path / "calls.jsonl")
    assert [c["number"] for c in before] == [0, 1, 2, 3]
    again = _worker(tmp_path, "k")
    assert again.wait(timeout=300) == 0
    calls = _calls(tmp_path / "calls.jsonl")
    study = tune.open_study(name="k", cfg=CFG, tune_dir=tmp_path)
    records = tune.finished(study)
    assert len(records) == CFG["trials"] and all(r.state == "COMPLETE" for r in records)
    settings = [json.dumps(c["params"], sort_keys=True) for c in calls]
    # Trials 0-2 finished before the kill: never run again. Trial 3 was cut off: run again once, same setting.
    assert settings.count(settings[3]) == 2 and len(set(settings)) == CFG["trials"] == len(calls) - 1
    assert calls[4]["params"] == before[3]["params"]


@pytest.mark.slow  # several processes or a large generated run: the full suite runs it
def test_two_workers_share_one_budget_and_choose_what_one_process_chooses(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    assert _worker(one, "w").wait(timeout=300) == 0
    two = tmp_path / "two"
    two.mkdir()
    workers = [_worker(two, "w", pause=0.3, log="calls.jsonl") for _ in range(2)]
    assert [w.wait(timeout=300) for w in workers] == [0, 0]
    calls = _calls(two / "calls.jsonl")
    settings = [json.dumps(c["params"], sort_keys=True) for c in calls]
    assert len(calls) == CFG["trials"] and len(set(settings)) == len(settings)  # exactly the budget, none twice
    assert len({c["number"] for c in calls}) == CFG["trials"]
    best = [max(tune.finished(tune.open_study(name="w", cfg=CFG, tune_dir=d)), key=lambda r: r.val) for d in (one, two)]
    assert best[0].params == best[1].params and best[0].val == best[1].val


def test_spaces_are_declared_and_checked():
    space = tune.parse_space({"C": {"low": 1e-4, "high": 1.0, "log": True}, "k": {"low": 1, "high": 50},
                              "m": ["a", "b"]}, integers=("k",))
    assert space["k"].integer and not space["C"].integer and space["m"].choices == ("a", "b")
    assert space["C"].at_edge(1.1e-4) and space["C"].at_edge(0.9) and not space["C"].at_edge(0.01)
    assert space["k"].at_edge(1) and not space["k"].at_edge(25) and not space["m"].at_edge("a")
    for bad in ({"low": 1.0}, {"low": 2, "high": 1}, {"low": 0, "high": 1, "log": True}, [], ["a", "a"],
                {"low": 1, "high": 2, "step": 1}):
        with pytest.raises(ConfigError, match="list of distinct choices"):
            tune.space_param("tune.head.lr_C", bad)


def test_the_config_declares_both_arms_spaces_and_one_budget():
    from pipeline.config import load_config

    cfg = load_config()
    assert cfg.tune.trials >= 1 and set(cfg.tune.head) >= {"lr_C", "svm_C", "knn_k", "norm"}
    assert set(cfg.tune.finetune) == {"lr", "backbone_lr_mult", "weight_decay", "label_smoothing", "epochs"}
    with pytest.raises(ConfigError, match="tune.finetune.lr"):
        load_config(overrides=["tune.finetune.lr={low=0.0, high=1.0, log=true}"])
    with pytest.raises(ConfigError, match="unknown config key 'tune.head.mlp_width'"):
        load_config(overrides=["tune.head.mlp_width=[1, 2]"])
