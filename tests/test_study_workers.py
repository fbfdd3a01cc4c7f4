"""``run_study.py --worker`` beside a leading run on one --out: together they run each search's trial budget exactly
(no trial twice, none failed), both take fine-tune trials (a head search is run whole by one of them), the worker
writes no report, and the leader's rows are the rows one process alone gets (random search draws each trial's
setting from its number, so who ran it does not matter).

Several processes on the tiny test network and a generated 3-class folder, one thread each (CPU sums depend on
the thread count, and the single-process run is compared number for number)."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest
import tomli_w

from study.results import read_results, read_trials
from tests.conftest import REPO, TEST_BACKBONE
from tests.test_own_data import make_folder

pytestmark = pytest.mark.slow
TRIALS = 6


def _config(folder) -> dict:
    return {
        "name": "w", "seed": 0, "seeds": [0],
        "data": {"sources": [{"name": "mine", "path": str(folder)}],
                 "split": {"protocol": "per_class", "train_per_class": 5, "val_per_class": 2}},
        "extract": {"backbones": [TEST_BACKBONE], "views": 1, "num_workers": 0, "precision": "fp32"},
        "classify": {"heads": ["lr", "knn"], "feature_sets": ["clean"], "n_jobs": 1, "bootstrap": 0},
        "finetune": {"policies": ["head", "last:1"], "n_boot": 0, "num_workers": 0, "precision": "fp32",
                     "batch_size": 8},
        "fewshot": {"k": []},
        "tune": {"trials": TRIALS, "sampler": "random", "pruner": "none", "finetune": {"epochs": [2]}},
    }


def _start(config_path, out, *extra) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STUDY_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "run_study.py", "--config", str(config_path), "--data-root", "/",
                             "--out", str(out), "--quiet", *extra], cwd=REPO, env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err


def _journal_trials(out) -> dict[str, list]:
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(out / "tune" / "journal.log")))
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage).get_trials(deepcopy=False)
            for s in optuna.get_all_study_summaries(storage)}


def _numbers(rows) -> list[tuple]:
    return [(r.arm, r.backbone, r.method, r.feature_set, r.selection.best.extra["trial"], r.val_mean_per_class,
             r.metrics.mean_per_class, r.test_pred) for r in rows]


def test_a_worker_and_the_leader_share_each_budget_and_the_leader_reports_what_one_process_gets(tmp_path):
    folder = make_folder(tmp_path / "images", classes=3, per_class=9)
    config_path = tmp_path / "w.toml"
    config_path.write_text(tomli_w.dumps(_config(folder)))
    shared = tmp_path / "shared"
    leader, worker = _start(config_path, shared), _start(config_path, shared, "--worker")
    _finish(leader)
    _finish(worker)
    (lead_dir,) = [d for d in (shared / "runs").iterdir() if not d.name.endswith("-worker")]
    (work_dir,) = [d for d in (shared / "runs").iterdir() if d.name.endswith("-worker")]
    assert (lead_dir / "report.md").is_file() and not (work_dir / "report.md").exists()
    assert f"**Random networks**: `{TEST_BACKBONE}`" in (lead_dir / "report.md").read_text()

    studies = _journal_trials(shared)
    assert len(studies) == 2  # one head search and one fine-tune search of the one backbone and split seed
    pids = {}
    for name, trials in studies.items():
        states = Counter(t.state.name for t in trials)
        assert states == {"COMPLETE": TRIALS}, (name, states)  # the budget exactly, none failed or run again
        assert sorted(t.number for t in trials) == list(range(TRIALS))
        pids[name.split("-")[0]] = Counter(t.user_attrs["worker"]["pid"] for t in trials)
    assert set(pids) == {"head", "ft"}, pids
    assert set(pids["ft"]) == {leader.pid, worker.pid}, pids  # both took fine-tune trials of the one search
    assert len(pids["head"]) == 1 and set(pids["head"]) <= {leader.pid, worker.pid}  # one ran the head search
    assert Counter(t.arm for t in read_trials(lead_dir)) == {"head": TRIALS, "finetune": TRIALS}

    alone = tmp_path / "alone"
    _finish(_start(config_path, alone))
    (alone_dir,) = (alone / "runs").iterdir()
    rows = read_results(lead_dir / "results.jsonl")
    assert [r.arm for r in rows] == ["head", "finetune"]
    assert _numbers(rows) == _numbers(read_results(alone_dir / "results.jsonl"))
