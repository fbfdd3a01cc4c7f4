"""``pipeline.predict``: every kind of variant a study chooses predicts from images, and its export (one TorchScript
file, loaded in a process that cannot import this project) gives the study's own test predictions."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tomli_w
import torch

import run_study
from pipeline.predict import main
from study.config import merge
from study.results import ENSEMBLE, read_results

pytestmark = [pytest.mark.needs_data, pytest.mark.slow]

CLASSES = ["daisy", "sunflower", "tulip"]
LITES = ["efficientnet_lite0", "efficientnet_lite1"]
# Two small studies on one --out (they share the store): A's heads read 'stages'; B fuses Lite0 and Lite1 and
# fine-tunes both with the two-phase probe (the cut path), then ensembles them.
COMMON = {
    "seed": 0,
    "data": {"sources": [{"name": "flowers", "kind": "folder", "path": "oxford_flowers17", "classes": CLASSES,
                          "max_per_class": 10}],
             "split": {"train_per_class": 6, "val_per_class": 2}},
    # The export runs in fp32: the study it is compared with asks for fp32 too (bf16 autocast, where the CPU has it,
    # moves a tiny head's probabilities by up to 0.15).
    "extract": {"views": 1, "batch_size": 16, "num_workers": 0, "precision": "fp32"},
    "classify": {"heads": ["lr"], "bootstrap": 0, "n_jobs": 1},
    "fewshot": {"k": []},
    "finetune": {"n_boot": 0, "num_workers": 0, "precision": "fp32"},
    "tune": {"trials": 2, "sampler": "random", "pruner": "none", "finetune": {"epochs": [2]}},
}
RUN_A = merge(COMMON, {"name": "a", "stages": ["dataset", "extract", "classify"],
                       "classify": {"feature_sets": ["stages"]}})
RUN_B = merge(COMMON, {"name": "b", "stages": ["dataset", "extract", "classify", "finetune"],
                       "extract": {"backbones": LITES}, "classify": {"feature_sets": ["clean"], "fusions": [LITES]},
                       "finetune": {"policies": ["probe+last:1"], "ensembles": [LITES]}})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root):
    base = tmp_path_factory.mktemp("predict")
    out, found = base / "out", {}
    for name, text in (("a", RUN_A), ("b", RUN_B)):
        (base / f"{name}.toml").write_text(tomli_w.dumps(text))
        assert run_study.main(["--config", str(base / f"{name}.toml"), "--data-root", str(data_root),
                               "--out", str(out), "--quiet"]) == 0
        found[name] = next(p for p in (out / "runs").iterdir() if p.name.endswith(f"-{name}"))
    return found


def _row(run, pick):
    rows = read_results(run / "results.jsonl")
    return next(r for r in rows if pick(r)), rows


VARIANTS = {
    "stages head": ("a", lambda r: r.kind == "head"),
    "fused head": ("b", lambda r: r.kind == "head" and r.backbone.startswith("fused:")),
    "probe fine-tune": ("b", lambda r: r.kind == "finetune" and r.method == "ft:probe+last:1"),
    "ensemble": ("b", lambda r: r.method == ENSEMBLE),
}


def _study_probabilities(run, row, rows):
    """What the study scored test with: the head's pipeline on the stored features (the mirror-averaged view the
    heads read), or the fine-tunes' sealed test logits (softmax; an ensemble averages its members')."""
    from classify.heads import probabilities
    from classify.store import load_head
    from extract.read import load_features
    from finetune.checkpoint import read_checkpoint
    from study.results import fused_parts

    out = run.parent.parent
    if row.kind == "head":
        model, meta = load_head(out / "heads" / row.keys["head_key"])
        parts = [load_features(run, b, view="tta") for b in fused_parts(row.backbone)]
        test = parts[0].split == "test"
        X = np.concatenate([p.X[test] for p in parts], axis=1)
        if row.feature_set == "stages":
            cut = load_features(run, row.backbone, view="tta", layer="last:1").X[test].mean(axis=(2, 3))
            X = np.concatenate([X, cut], axis=1)
        return probabilities(model, X, n_classes=len(row.class_names))[0], parts[0].path[test]
    members = [row] if row.method != ENSEMBLE else [
        r for r in rows if r.kind == "finetune" and r.method != ENSEMBLE]
    probs = [torch.softmax(read_checkpoint(out / "finetune" / m.keys["run_key"] / "predictions.pt")["test_logits"],
                           1).numpy() for m in members]
    paths = load_features(run, row.backbone if row.method != ENSEMBLE else members[0].backbone).path
    split = load_features(run, members[0].backbone).split
    return np.mean(probs, axis=0), paths[split == "test"]


LOADER = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from PIL import Image
    from torchvision.transforms import v2, InterpolationMode
    folder, paths, dest = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
    prep = json.load(open(folder + "/preprocessing.json"))
    model = torch.jit.load(folder + "/model.pt")
    xs = []
    for spec in prep["inputs"]:
        t = v2.Compose([v2.Resize(spec["resize_shorter_side"], interpolation=InterpolationMode(spec["interpolation"]),
                                  antialias=spec["antialias"]), v2.CenterCrop(spec["centre_crop"]), v2.ToImage(),
                        v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec["mean"], spec["std"])])
        xs.append(torch.stack([t(Image.open(p).convert("RGB")) for p in paths]))
    with torch.no_grad():
        probs = model(xs[0]) if len(xs) == 1 else model(xs)
    np.save(dest, probs.numpy())
""")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_exported_model_gives_the_studys_test_predictions(runs, variant, tmp_path, data_root):
    """The export, loaded by a bare Python process (no project on its path, only torch/torchvision/PIL) from its
    preprocessing.json, reproduces the study's test probabilities and predicted classes."""
    name, pick = VARIANTS[variant]
    run = runs[name]
    row, rows = _row(run, pick)
    expected, rel_paths = _study_probabilities(run, row, rows)
    assert main(["--run", str(run), "--variant", str(row.index), "--export", str(tmp_path / "exp"), "--quiet"]) == 0
    prep = json.loads((tmp_path / "exp" / "preprocessing.json").read_text())
    assert prep["class_names"] == list(row.class_names) and prep["variant"]["row"] == row.index
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    paths = ",".join(str(data_root / p) for p in rel_paths)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-I", str(script), str(tmp_path / "exp"), paths, str(tmp_path / "p.npy")],
                   check=True, cwd=tmp_path, env=env)
    got = np.load(tmp_path / "p.npy")
    assert got.shape == expected.shape
    print(f"\n{variant}: max |exported - study| = {np.abs(got - expected).max():.2e}")
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE[variant])
    assert (got.argmax(1) == np.asarray(row.test_pred)).mean() >= AGREE[variant]


# Heads and the fused head read float32 features the same code computes: equal to float rounding. The fine-tunes
# scored test on the stored float16 cut; the export runs the prefix in float32.
# Measured: 1.2e-7 (heads), 1.1e-5 (fine-tune, ensemble).
TOLERANCE = {"stages head": 1e-5, "fused head": 1e-5, "probe fine-tune": 1e-3, "ensemble": 1e-3}
AGREE = {"stages head": 1.0, "fused head": 1.0, "probe fine-tune": 1.0, "ensemble": 1.0}


def test_the_readme_example_fits_a_model_on_the_stored_features(runs, capsys):
    """The README's five lines, run as written (on this run's --out), and the frame form of the same rows."""
    import re

    from extract.read import load_features
    from study.config import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    code = re.search(r"## Reusing the stored features.*?```python\n(.*?)```", readme, re.S).group(1)
    assert len(code.strip().splitlines()) == 5
    exec(code.replace('load_features("out"', f'load_features("{runs["b"].parent.parent}"'), {})
    accuracy = float(capsys.readouterr().out.split()[-1])
    assert 0.5 < accuracy <= 1.0  # three flower classes: far above chance (1/3)
    f = load_features(runs["b"], "efficientnet_lite1", view="tta")
    frame = load_features(runs["b"], "efficientnet_lite1", view="tta", as_frame=True)
    assert f.X.shape == (len(f.y), 1280) and set(f.split) == {"train", "val", "test"}
    assert list(frame.columns[:5]) == ["sample_id", "path", "split", "label", "class_name"]
    np.testing.assert_array_equal(frame.filter(like="f").to_numpy(np.float32)[:, :3], f.X[:, :3])
    augmented = load_features(runs["b"], "efficientnet_lite1", view=1)
    assert set(augmented.split) == {"train", "val"} and not np.allclose(augmented.X, f.X[f.split != "test"])


def folders(path):
    return [p for p in path.iterdir() if not p.name.startswith(".")]


def test_prune_removes_what_no_run_uses_and_keeps_what_predict_needs(runs, tmp_path):
    from pipeline.prune import main as prune

    out = tmp_path / "out"
    shutil.copytree(runs["a"].parent.parent, out)
    assert prune([str(out), "--dry-run"]) == 0 and prune([str(out)]) == 0  # both runs live: nothing to remove
    assert len(folders(out / "finetune" / "fits")) == len(folders(runs["a"].parent.parent / "finetune" / "fits"))
    assert prune([str(out), "--trials"]) == 0  # the trial checkpoints go; the models the rows report stay
    b = out / "runs" / runs["b"].name
    assert main(["--run", str(b), "--variant", str(_row(b, VARIANTS["ensemble"][1])[0].index), "--export",
                 str(tmp_path / "e"), "--quiet"]) == 0
    shutil.rmtree(b)  # run b is gone: its heads, searches and fits go, run a's head stays
    assert prune([str(out)]) == 0
    # (a lock file, empty, stays: removing one another process may hold is not safe)
    assert not folders(out / "finetune" / "fits") and len(folders(out / "heads")) == 1
    assert main(["--run", str(out / "runs" / runs["a"].name), "--export", str(tmp_path / "a"), "--quiet"]) == 0
