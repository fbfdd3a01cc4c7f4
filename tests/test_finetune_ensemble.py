"""Ensembles of fine-tunes (finetune/ensemble.py) and the predictions they read (finetune.experiment.run_predictions):
the stored logits are the very models the rows were scored with, a missing or damaged file is recomputed without
training, the ensemble averages its members' softmax on the same images, and the stage writes it or records a skip.

Small: the tiny 4-class Caltech manifest, the two tiny random test networks (no accuracy is asserted), the ``head`` and
``probe+last:1`` policies (3 epochs a phase, fp32)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax

from extract.backbones import load_backbone
from extract.engine import PassSettings
from finetune import train as train_mod
from finetune.checkpoint import read_checkpoint, save_checkpoint
from finetune.ensemble import METHOD, ensemble_row
from finetune.inputs import StoreAccess
from finetune.search import PREDICTIONS, run_finetune, run_predictions
from finetune.train import NotFinished
from pipeline.config import load_config
from study.metrics import mean_per_class_accuracy
from study.results import check_row
from tests.conftest import TEST_BACKBONE, TEST_BACKBONE2
from tests.finetune_fixtures import recipe, tune_config

NAMES = (TEST_BACKBONE, TEST_BACKBONE2)
POLICIES = ("head", "probe+last:1")  # probe+last:1: two phases, the chosen model is phase 2's
# Two trials per backbone, one fixed recipe: each search chooses its policy on val.
TUNE = dict(trials=2)
TUNE_SET = ("tune.trials=2", "tune.startup_trials=1", 'tune.sampler="random"', 'tune.pruner="none"',
            "tune.finetune.lr=[3e-3]", "tune.finetune.backbone_lr_mult=[0.1]", "tune.finetune.weight_decay=[0.01]",
            "tune.finetune.label_smoothing=[0.1]", "tune.finetune.epochs=[3]")


@pytest.fixture(scope="module")
def hp():
    hp = recipe()
    hp.update(views=1, batch_size=8, n_boot=20, num_workers=0, warmup_epochs=1, precision="fp32", ensembles=[],
              policies=list(POLICIES))
    return hp


@pytest.fixture(scope="module")
def setup(tiny_backbone, hp, tiny_manifest, data_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    store = StoreAccess(root=root / "store", settings=PassSettings(precision="fp32", batch_size=16, num_workers=0,
                                                                   progress=False))
    backbones = {TEST_BACKBONE: tiny_backbone, TEST_BACKBONE2: load_backbone(TEST_BACKBONE2)}
    common = dict(manifest_path=tiny_manifest, data_root=data_root, hp=hp, seed=0, device="cpu",
                  finetune_dir=root / "finetune", store=store, tune_cfg=tune_config(**TUNE), tune_dir=root / "tune")
    # Each backbone's val-chosen fine-tune (its search over POLICIES): the ensemble's members.
    rows = {name: run_finetune(backbone=bb, **common).rows[0] for name, bb in backbones.items()}
    # A two-phase fine-tune whatever the searches chose: its scored model is phase 2's.
    probe_hp = {**hp, "policies": ["probe+last:1"]}
    runs = {**{(name, "chosen"): (row, hp) for name, row in rows.items()},
            (TEST_BACKBONE, "probe+last:1"): (run_finetune(backbone=tiny_backbone,
                                                           **{**common, "hp": probe_hp}).rows[0],
                                                     probe_hp)}
    return {"root": root, "backbones": backbones, "common": common, "runs": runs, "rows": rows}


def _predictions(setup, name, row=None, hp=None):
    common = {**setup["common"], **({"hp": hp} if hp else {})}
    return run_predictions(backbone=setup["backbones"][name], row=row or setup["rows"][name], **common)


@pytest.mark.parametrize("name,policy", [(TEST_BACKBONE, "chosen"), (TEST_BACKBONE2, "chosen"),
                                         (TEST_BACKBONE, "probe+last:1")])
def test_stored_predictions_are_the_scored_models(setup, name, policy):
    """Val logits are the chosen point's model trained on train, at its kept epoch: their val score and val
    log-loss are the ones its selection recorded (a refit, trained on val, would score a lower loss); test
    logits are the refit's (the row's test predictions)."""
    row, hp = setup["runs"][(name, policy)]
    p = _predictions(setup, name, row, hp)
    assert mean_per_class_accuracy(p["val_labels"], p["val_logits"].argmax(1)) == pytest.approx(
        row.val_mean_per_class, abs=1e-12)
    logits, labels = torch.from_numpy(p["val_logits"]), torch.from_numpy(p["val_labels"])
    loss = float(torch.nn.functional.cross_entropy(logits, labels))
    assert loss == pytest.approx(row.selection.best.val_log_loss, abs=1e-5)
    assert tuple(p["test_logits"].argmax(1).tolist()) == row.test_pred
    assert tuple(p["test_sample_id"]) == row.test_sample_id and len(p["val_sample_id"]) == row.n_val


def test_missing_or_damaged_predictions_are_recomputed_without_training(setup, monkeypatch):
    name = TEST_BACKBONE
    path = setup["common"]["finetune_dir"] / setup["rows"][name].keys["run_key"] / PREDICTIONS
    first = _predictions(setup, name)
    trained = []
    real = train_mod.Trainer.train_epoch
    monkeypatch.setattr(train_mod.Trainer, "train_epoch", lambda *a, **k: trained.append(1) or real(*a, **k))
    for damage in ("delete", "flip"):
        if damage == "delete":
            path.unlink()
        else:
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
        again = _predictions(setup, name)
        assert path.is_file() and trained == []
        for key in ("val_logits", "test_logits"):
            np.testing.assert_allclose(again[key], first[key], rtol=0, atol=1e-5)


def test_predictions_that_are_not_the_rows_models_are_recomputed(setup):
    """A sealed, readable predictions file whose logits are not the row's models' (stale) is never used."""
    name = TEST_BACKBONE2
    path = setup["common"]["finetune_dir"] / setup["rows"][name].keys["run_key"] / PREDICTIONS
    good = _predictions(setup, name)
    for split in ("test", "val"):
        payload = read_checkpoint(path)
        payload[f"{split}_logits"] = payload[f"{split}_logits"].roll(1, dims=1)  # other predictions, same shapes
        save_checkpoint(path, payload)
        again = _predictions(setup, name)
        np.testing.assert_allclose(again[f"{split}_logits"], good[f"{split}_logits"], rtol=0, atol=1e-5)


def test_a_run_whose_kept_models_are_gone_is_refused_not_retrained(setup):
    name = TEST_BACKBONE
    row = setup["rows"][name]
    run_dir = setup["common"]["finetune_dir"] / row.keys["run_key"]
    refit_last = setup["common"]["finetune_dir"] / "fits" / row.keys["fit_keys"][-1] / "last.pt"
    saved = {f: f.read_bytes() for f in (run_dir / PREDICTIONS, refit_last)}
    try:
        for f in saved:
            f.unlink()
        with pytest.raises(NotFinished, match="not a finished fine-tune"):
            _predictions(setup, name)
    finally:
        for f, data in saved.items():
            f.write_bytes(data)


def test_a_row_from_other_settings_is_refused(setup):
    name = TEST_BACKBONE
    with pytest.raises(ValueError, match="came from run"):
        run_predictions(backbone=setup["backbones"][name], row=setup["rows"][name],
                        **{**setup["common"], "hp": {**setup["common"]["hp"], "dropout": 0.2}})


def test_the_ensemble_averages_its_members_softmax(setup):
    members = [(setup["rows"][n], _predictions(setup, n)) for n in NAMES]
    row = ensemble_row(members, n_boot=20)
    check_row(row)
    assert row.backbone == f"fused:{TEST_BACKBONE}+{TEST_BACKBONE2}" and row.method == METHOD
    val = np.mean([softmax(p["val_logits"].astype(np.float64), axis=1) for _, p in members], axis=0)
    test = np.mean([softmax(p["test_logits"].astype(np.float64), axis=1) for _, p in members], axis=0)
    assert row.val_mean_per_class == pytest.approx(
        mean_per_class_accuracy(members[0][1]["val_labels"], val.argmax(1)), abs=1e-12)
    assert list(row.test_pred) == test.argmax(1).tolist()
    assert row.train_s == pytest.approx(sum(r.train_s for r, _ in members))
    assert [m["backbone"] for m in row.hyperparams["members"]] == list(NAMES)
    # Softmax averaged, not logits: member A is sure of class 0 and sure it is not class 1; member B is sure of
    # class 1. Averaged logits pick class 0, averaged probabilities class 1.
    r0, p0 = members[0]
    r1, p1 = members[1]
    a, b = np.zeros_like(p0["test_logits"]), np.zeros_like(p1["test_logits"])
    a[:, 0], a[:, 1], b[:, 1] = 3.0, -50.0, 5.0
    row = ensemble_row([(r0, {**p0, "test_logits": a}), (r1, {**p1, "test_logits": b})], n_boot=20)
    assert set(row.test_pred) == {1}
    # Members whose rows are not the same images in the same order are refused, never averaged.
    for key, value in (("views", 7), ("split_seed", 9), ("views_fresh", True), ("feature_set", "strong"),
                       ("tta", "none"), ("fit_on", "train"), ("manifest_hash", "x"), ("class_names", ("a",)),
                       ("test_sample_id", r1.test_sample_id[::-1])):
        with pytest.raises(ValueError, match=repr(key)):
            ensemble_row([members[0], (r1.replace(**{key: value}), p1)], n_boot=20)
    with pytest.raises(ValueError, match="val rows are not the same images"):
        ensemble_row([members[0], (r1, {**p1, "val_sample_id": p1["val_sample_id"][::-1]})], n_boot=20)
    r1, p1 = members[1]
    order = np.arange(len(p1["test_sample_id"]))[::-1]
    shuffled = {**p1, "test_logits": p1["test_logits"][order],
                "test_sample_id": [p1["test_sample_id"][i] for i in order]}
    with pytest.raises(ValueError, match="test rows are not the same images"):
        ensemble_row([members[0], (r1, shuffled)], n_boot=20)
    with pytest.raises(ValueError, match="at least two"):
        ensemble_row(members[:1], n_boot=20)


def test_stage_writes_the_ensemble_and_records_one_it_cannot_make(setup, tiny_manifest, data_root, tmp_path):
    from finetune import stage
    from reports.render import protocol_arm_lines
    from study.context import StudyContext
    from study.results import read_results, read_skips

    out_dir = setup["root"]  # the layout StudyContext expects: finetune/, store/, dataset/
    (out_dir / "dataset").mkdir(exist_ok=True)
    (out_dir / "dataset" / "manifest.csv").write_bytes(tiny_manifest.read_bytes())
    config = load_config(overrides=[
        f"extract.backbones={list(NAMES)}", f"finetune.policies={list(POLICIES)}", "finetune.views=1",
        "finetune.batch_size=8", "finetune.n_boot=20", "finetune.num_workers=0", 'finetune.precision="fp32"',
        'extract.precision="fp32"', "fewshot.k=[]", "finetune.backbones=[]", *TUNE_SET,
        f'finetune.ensembles=[["{TEST_BACKBONE}", "{TEST_BACKBONE2}"], ["{TEST_BACKBONE}", "efficientnet_lite2"]]'])
    ctx = StudyContext(config=config, data_root=data_root, out_dir=out_dir, run_dir=tmp_path / "run", device="cpu")
    stage.run(ctx)
    rows = [r.replace(index=-1) for r in read_results(ctx.results_path)]
    assert rows[:2] == [setup["rows"][n] for n in NAMES]  # cached fine-tunes, re-appended
    (ens,) = rows[2:]
    # Its members are each backbone's val-chosen fine-tune.
    assert [m["run_key"] for m in ens.hyperparams["members"]] == [setup["rows"][n].keys["run_key"] for n in NAMES]
    expected = ensemble_row([(setup["rows"][n], _predictions(setup, n)) for n in NAMES], n_boot=20)
    assert ens.test_pred == expected.test_pred and ens.val_mean_per_class == expected.val_mean_per_class
    (skip,) = read_skips(ctx.run_dir)
    assert skip["what"] == f"fused:{TEST_BACKBONE}+efficientnet_lite2" and "efficientnet_lite2" in skip["reason"]
    # The report says what the ensemble is, next to the fine-tune arm's protocol line.
    lines = protocol_arm_lines(read_results(ctx.results_path))
    assert any(line.startswith(f"- `ft:ensemble` (`fused:{TEST_BACKBONE}+{TEST_BACKBONE2}`)") for line in lines)
    # Each (method, augmentation) once, with how many backbones ran it.
    (arm,) = [line for line in lines if line.startswith("- **fine-tune**")]
    assert "`ft:ensemble (light)`" in arm


def test_config_refuses_an_ensemble_of_one_backbone_twice_or_out_of_the_fusions_order():
    from study.schema import ConfigError

    with pytest.raises(ConfigError, match=r"finetune\.ensembles\[0\]"):
        load_config(overrides=['finetune.ensembles=[["efficientnet_lite0", "efficientnet_lite0"]]'])
    with pytest.raises(ConfigError, match="finetune.ensembles"):
        load_config(overrides=['finetune.ensembles=[["efficientnet_lite0"]]'])
    # The default config fuses Lite0+Lite2 in the heads: an ensemble of the two in the other order would never
    # meet that head in a verdict.
    with pytest.raises(ConfigError, match=r"the order of classify\.fusions\[0\]"):
        load_config(overrides=['finetune.ensembles=[["efficientnet_lite2", "efficientnet_lite0"]]'])


def _predictions_rank(rank: int, world: int, port: int, out_dir: str, name: str, row: dict, common: dict) -> None:
    import datetime
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # A rank left waiting in a collective fails after a minute instead of hanging the test run.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        out = run_predictions(backbone=load_backbone(name), row=row, **common)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("present", [True, False], ids=["stored", "recomputed"])
def test_two_gloo_ranks_get_the_predictions_in_step(setup, tmp_path, present):
    """Under torchrun every rank calls run_predictions: with the file present all return at once, without it all
    resume the finished fits together; rank 0 holds the predictions, the others None, and nothing hangs."""
    import socket

    import torch.multiprocessing as mp

    name = TEST_BACKBONE
    row = setup["rows"][name]
    path = setup["common"]["finetune_dir"] / row.keys["run_key"] / PREDICTIONS
    expected = _predictions(setup, name)
    saved = path.read_bytes()
    if not present:
        path.unlink()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(_predictions_rank, args=(2, port, str(tmp_path), name, row, setup["common"]), nprocs=2, join=True)
    finally:
        if not path.is_file():
            path.write_bytes(saved)
    got = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert torch.load(tmp_path / "rank1.pt", weights_only=False) is None
    for key in ("val_logits", "test_logits"):
        np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-5)
    assert path.is_file()


def test_the_reports_spell_the_arms_names_as_the_arms_write_them():
    """reports/ keeps its own copies of these names (importing the arms would pull torch into reports)."""
    from classify.fusion import PREFIX
    from reports.collect import ENSEMBLE, FUSED_PREFIX

    assert (FUSED_PREFIX, ENSEMBLE) == (PREFIX, METHOD)
