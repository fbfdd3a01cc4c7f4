"""Fine-tuning's protocol, alike the heads': a declared grid chosen on val, the chosen point refit on
train+val, test read once at the end; the two-phase ``probe+last:k`` policy; the git sha on every row.

Small: the tiny 4-class Caltech manifest, the tiny random test network (the logic needs no pretrained weights),
3 epochs, fp32."""
from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest
import torch

from dataset.manifest import read_manifest
from extract.blocks import parse_policy
from extract.engine import PassSettings, plan_layers
from finetune import train as train_mod
from finetune.config import SEARCH_AXES
from finetune.inputs import StoreAccess
from finetune.model import build_split_net
from pipeline.config import load_config
from study.config import REPO_ROOT
from study.protocol import choose, choose_trial
from study.results import ResultRow, TrialRow, check_row
from study.schema import ConfigError
from tests.finetune_fixtures import recipe, search, tune_config

# ------------------------------------------------------------------------------------ no training


def test_probe_policy_parses_and_the_config_accepts_it():
    p = parse_policy("probe+last:2")
    assert (p.last, p.probe, p.phases) == (2, True, ("head", "last:2"))
    assert parse_policy("last:2").phases == ("last:2",) and not parse_policy("last:2").probe
    assert load_config(overrides=['finetune.policies=["last:2", "probe+last:2"]'])["finetune"]["policies"] == [
        "last:2", "probe+last:2"]
    for bad in ("probe+head", "probe+all", "probe+last:0", "probe+"):
        with pytest.raises(ValueError, match="probe"):
            parse_policy(bad)


def test_probe_policy_stores_its_cut_once():
    """plan_layers stores last:k's cut for probe+last:k, and one cut when both policies ask for it."""
    assert [layer.name for layer in plan_layers("efficientnet_lite0", ["probe+last:2"])] == ["pooled", "last:2"]
    both = plan_layers("efficientnet_lite0", ["last:2", "probe+last:2", "head", "last:1"])
    assert [layer.name for layer in both] == ["pooled", "last:2", "last:1"]
    assert both[1].spec == plan_layers("efficientnet_lite0", ["last:2"])[1].spec


def test_the_space_is_declared_and_the_trunk_multiplier_drawn_only_for_policies_that_train_blocks():
    import optuna

    from finetune.search import _suggest
    from study import tune

    cfg = load_config("configs/gpu.toml")  # the full study searches every axis, over more policies
    assert set(cfg["tune"]["finetune"]) == set(SEARCH_AXES) and len(cfg["finetune"]["policies"]) >= 4
    space = tune.parse_space(cfg["tune"]["finetune"], integers=tune.FINETUNE_INTEGERS)
    assert space["lr"].log and space["epochs"].integer
    run = SimpleNamespace(policies=["head", "last:1"], space=space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = [_suggest(study.ask(), run) for _ in range(20)]
    assert {p for p, _ in drawn} == {"head", "last:1"}
    for policy, point in drawn:
        assert ("backbone_lr_mult" in point) == (policy == "last:1")  # no trunk parameter trains for 'head'
        assert set(point) - {"backbone_lr_mult"} == {"lr", "weight_decay", "label_smoothing", "epochs"}
        assert space["epochs"].low <= point["epochs"] <= space["epochs"].high
    for bad, match in [("tune.finetune.momentum=[0.9]", "tune.finetune.momentum"),
                       ("tune.finetune.lr=[]", "tune.finetune.lr"), ("finetune.grid={lr=[0.1]}", "finetune.grid"),
                       ("tune.finetune.epochs={low=0, high=3}", "tune.finetune.epochs")]:
        with pytest.raises(ConfigError, match=match):
            load_config(overrides=[bad])


def test_choices_go_to_the_best_val_then_the_earlier():
    T = SimpleNamespace
    assert choose([(0.8, 0.5), (0.9, 0.9), (0.9, 0.4), (0.9, 0.4)]) == 2
    assert choose([(0.9, None), (0.9, float("nan")), (0.5, 0.1)]) == 0
    trials = [T(val=0.8, seconds=1, number=0), T(val=0.9, seconds=9, number=1), T(val=0.9, seconds=3, number=2),
              T(val=0.9, seconds=3, number=3)]
    assert choose_trial(trials) == 1  # an exact val tie: the earlier (never wall seconds, nor log-loss across recipes)
    with pytest.raises(ValueError, match="no completed trial"):
        choose_trial([])


# ------------------------------------------------------------------------------------ real fine-tunes


@pytest.fixture(scope="module")
def hp():
    hp = recipe()
    hp.update(views=1, batch_size=8, n_boot=20, num_workers=0, warmup_epochs=1, precision="fp32")
    return hp


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    settings = PassSettings(precision="fp32", batch_size=16, num_workers=0, progress=False)
    return StoreAccess(root=tmp_path_factory.mktemp("store"), settings=settings)


# Two trials over a continuous lr (so they differ), one fixed recipe otherwise.
TWO = {"trials": 2, "finetune": {"lr": {"low": 1e-3, "high": 3e-2, "log": True}}}


def _run(tiny_backbone, hp, store, tiny_manifest, data_root, finetune_dir, policy, on_epoch_end=None, tune=None):
    searched = search(backbone=tiny_backbone, policies=policy, manifest_path=tiny_manifest, data_root=data_root, hp=hp,
                      seed=0, device="cpu", finetune_dir=finetune_dir, store=store, on_epoch_end=on_epoch_end,
                      tune_cfg=tune_config(**(tune or {})))
    (row,) = searched.rows
    return row


class Spy:
    """Records, in order, every fit on train, every refit, and every store read (split of its images)."""

    def __init__(self, manifest):
        self.events = []
        self.split_of = dict(zip(manifest["sha256"], manifest["split"]))

    def install(self, mp):
        from extract.store import Store

        spy, read = self, Store.read

        def spy_read(store, wanted, *a, **k):
            out = read(store, wanted, *a, **k)
            spy.events.append(("read", {(spy.split_of[sha], view.startswith("aug:")) for sha, view in wanted}))
            return out

        def spy_training(event: str, real):
            def run(trainer, *a, **k):
                start = trainer.net.head_state()
                result = real(trainer, *a, **k)
                spy.events.append((event, tuple(trainer.net.suffix_names), start, trainer.net.head_state(),
                                   trainer.ckpt_dir))
                return result
            return run

        mp.setattr(Store, "read", spy_read)
        mp.setattr(train_mod.Trainer, "fit", spy_training("fit", train_mod.Trainer.fit))
        mp.setattr(train_mod.Trainer, "fit_fixed", spy_training("refit", train_mod.Trainer.fit_fixed))


@pytest.fixture(scope="module")
def head_run(tiny_backbone, hp, store, tiny_manifest, data_root, tmp_path_factory):
    finetune_dir = tmp_path_factory.mktemp("ft-head")
    return finetune_dir, _run(tiny_backbone, hp, store, tiny_manifest, data_root, finetune_dir, "head", tune=TWO)


@pytest.fixture(scope="module")
def probe_run(tiny_backbone, hp, store, tiny_manifest, data_root, tmp_path_factory):
    """probe+last:1 with one trial of one recipe, in a fresh folder, every fit and store read recorded."""
    spy = Spy(read_manifest(tiny_manifest))
    with pytest.MonkeyPatch.context() as mp:
        spy.install(mp)
        row = _run(tiny_backbone, hp, store, tiny_manifest, data_root, tmp_path_factory.mktemp("ft-probe"),
                   "probe+last:1",
                   tune={"finetune": {"lr": [1e-2]}})
    return row, spy.events


def test_the_best_trial_is_chosen_on_val_and_refit_on_train_val(head_run, hp):
    finetune_dir, row = head_run
    check_row(row)  # its val score is its chosen trial's
    sel = row.selection
    lrs = [g.params["lr"] for g in sel.points]
    assert len(lrs) == 2 and lrs[0] != lrs[1] and all(g.params["policy"] == "head" for g in sel.points)
    chosen = sel.points[choose_trial([SimpleNamespace(val=g.val_mean_per_class, seconds=g.extra["seconds"],
                                                      number=g.extra["trial"]) for g in sel.points])]
    assert chosen.val_mean_per_class == max(g.val_mean_per_class for g in sel.points)
    assert row.val_mean_per_class == chosen.val_mean_per_class == sel.best.val_mean_per_class
    assert row.hyperparams["lr"] == chosen.params["lr"] and row.hyperparams["best_epoch"] == chosen.best_epoch
    assert row.fit_on == "train+val" and row.n_fit == row.n_train + row.n_val == 32
    typed = ResultRow.from_dict(row.to_dict(), index=0)
    assert typed.n_variants == 2 and typed.selection.best == chosen and typed.fit_on == "train+val"
    # The scored model: the chosen lr, refit on train+val for exactly the chosen epoch count, and no more.
    (refit_key,) = row.keys["fit_keys"]
    last = torch.load(finetune_dir / "fits" / refit_key / "last.pt", weights_only=False)
    assert last["hp"]["lr"] == chosen.params["lr"]
    assert row.hyperparams["refit_epochs"] == chosen.best_epoch + 1 == last["epoch"] + 1 == len(last["history"])
    assert all("val_mean_per_class" not in h for h in last["history"])  # val is not looked at in the refit


def test_test_is_read_once_after_the_final_refit_and_the_refit_reads_val_views(probe_run):
    row, events = probe_run
    kinds = [e[0] for e in events]
    reads_test = [i for i, e in enumerate(events) if e[0] == "read" and any(s == "test" for s, _ in e[1])]
    assert len(reads_test) == 1 and reads_test[0] > max(i for i, k in enumerate(kinds) if k in ("fit", "refit"))
    assert kinds.count("refit") == 2  # both phases refit
    assert row.fit_on == "train+val"
    # The refit reads val images' augmented views (views 0..V of train+val); selection reads val's clean views only.
    last_fit = max(i for i, k in enumerate(kinds) if k == "fit")
    val_aug = [i for i, e in enumerate(events) if e[0] == "read" and ("val", True) in e[1]]
    assert len(val_aug) == 2 and min(val_aug) > last_fit  # pooled (phase 1) and the cut (phase 2)


def test_probe_phase2_starts_from_the_phase1_best_head(probe_run, tiny_backbone):
    row, events = probe_run
    # The first call of each fit (the chosen trial's fits are called again after the search: they resume finished).
    fits = list({e[4]: e for e in reversed([e for e in events if e[0] == "fit"])}.values())
    (p1,) = [e for e in fits if e[1] == ()]  # head: no unit trains
    (p2,) = [e for e in fits if e[1] != ()]
    best = torch.load(p1[4] / "best.pt", weights_only=False)["model"]
    for k, v in p2[2].items():
        assert torch.equal(v, p1[3][k]) and torch.equal(v, best[k]), k
    fresh = build_split_net(tiny_backbone, policy="last:1", n_classes=4, seed=0).head_state()
    assert not all(torch.equal(fresh[k], v) for k, v in p2[2].items())  # phase 1 trained: the start is not a fresh head
    # The refit carries its phase 1's final head the same way.
    r1, r2 = [e for e in events if e[0] == "refit"]
    assert r1[1] == () and r2[1] != ()
    for k, v in r2[2].items():
        assert torch.equal(v, r1[3][k]), k
    assert row.method == "ft:probe+last:1" and row.hyperparams["trainable_units"] == list(p2[1])
    assert isinstance(row.hyperparams["refit_epochs"], list) and len(row.hyperparams["refit_epochs"]) == 2
    assert [c["phase"] for c in row.selection.curve] == sorted(c["phase"] for c in row.selection.curve)
    check_row(row)


def test_rerun_is_cached_and_a_larger_budget_trains_only_the_new_trial(head_run, tiny_backbone, hp, store,
                                                                       tiny_manifest, data_root, monkeypatch):
    finetune_dir, row = head_run
    trained = []
    epoch = train_mod.Trainer.train_epoch

    def spy(trainer, source, **k):
        trained.append((trainer.hp["lr"], len(source)))
        return epoch(trainer, source, **k)
    monkeypatch.setattr(train_mod.Trainer, "train_epoch", spy)
    again = _run(tiny_backbone, hp, store, tiny_manifest, data_root, finetune_dir, "head", tune=TWO)
    assert again == row and trained == []
    bigger = _run(tiny_backbone, hp, store, tiny_manifest, data_root, finetune_dir, "head", tune={**TWO, "trials": 3})
    assert bigger.keys["run_key"] != row.keys["run_key"] and len(bigger.selection.points) == 3
    assert bigger.selection.points[:2] == row.selection.points  # the study went on: its two trials kept, not retrained
    new_lr = bigger.selection.points[2].params["lr"]
    assert {lr for lr, n in trained if n == 24} == {new_lr}  # on train (24 images): only the new trial trains
    trials = [t for t in read_trials_of(finetune_dir, bigger)]
    assert [t.number for t in trials] == [0, 1, 2] and all(t.state == "COMPLETE" for t in trials)


def test_rows_carry_the_git_sha(head_run, probe_run, monkeypatch):
    import re

    from finetune import search as experiment  # the module that writes the rows

    for row in (head_run[1], probe_run[0]):
        assert row.git_sha == experiment.git_sha() and re.fullmatch(r"[0-9a-f]{40}(-dirty)?", row.git_sha)
        sha = row.git_sha.split("-")[0]
        assert subprocess.run(["git", "-C", str(REPO_ROOT), "cat-file", "-e", f"{sha}^{{commit}}"]).returncode == 0
    uncached = experiment.git_sha.__wrapped__
    for dirty, want in [(True, "abc-dirty"), (False, "abc")]:
        monkeypatch.setattr("study.provenance.git_state", lambda repo, d=dirty: {"sha": "abc", "dirty": d})
        assert uncached() == want
    monkeypatch.setattr("study.provenance.git_state", lambda repo: {"sha": None, "dirty": None})
    assert uncached() is None


def read_trials_of(finetune_dir, row) -> list[TrialRow]:
    """The trials a fine-tune's search stored next to its row."""
    import json

    return [TrialRow.from_dict(t) for t in json.loads((finetune_dir / row.keys["run_key"] / "trials.json").read_text())]
