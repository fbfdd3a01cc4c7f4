"""Own data without reading code: every combination of folder size and split keys ends in a plan (exit 0) or one
``error:`` line naming what to set, never a traceback and never a run folder; following that advice works; the
smallest viable folders run the whole study."""
import re

import numpy as np
import pytest
import tomli_w
from PIL import Image

import run_study
from tests.conftest import TEST_BACKBONE

# (classes, images per class) of generated folders: one class, a class of one image, the smallest viable, small.
FOLDERS = [(1, 6), (2, 1), (2, 3), (3, 5), (4, 12)]
SPLITS = [{"protocol": "per_class", "train_per_class": t, "val_per_class": v} for t, v in
          ((1, 0), (2, 1), (4, 1), (3, 5), (30, 5))] + \
         [{"protocol": "fraction", "train_fraction": t, "val_fraction": v} for t, v in
          ((0.2, 0.1), (0.6, 0.1), (0.6, 0.0), (0.9, 0.1))]
ADVICE = re.compile(r'data\.split\.(\w+) (?:<= \d+ \(e\.g\. |= )("?[\w.]+"?)')


def make_folder(root, *, classes: int, per_class: int, seed: int = 0):
    """Class folders of distinct generated images (noise on a class colour: no two are near-copies)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            base = np.array([60 * c % 256, 90 * c % 256, 200 - 40 * c], np.float32)
            pixels = np.clip(base + rng.normal(scale=70, size=(48, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i}.png")
    return root


def config(folder, split: dict, *, too_few: str, **extra) -> dict:
    # The tiny test network: --plan times its stages on each folder, and what is tested is the data's advice.
    return {"name": "mine", "data": {"sources": [{"name": "mine", "path": str(folder)}],
                                     "split": {**split, "too_few": too_few}},
            "extract": {"backbones": [TEST_BACKBONE]}, **extra}


def run(tmp_path, cfg: dict, *args: str) -> tuple[int, str]:
    path = tmp_path / f"c{len(list(tmp_path.glob('c*.toml')))}.toml"
    path.write_text(tomli_w.dumps(cfg))
    return run_study.main(["--config", str(path), "--data-root", str(tmp_path), "--out", str(tmp_path / "out"),
                           "--quiet", *args]), str(path)


def assert_exit_0_or_one_error_line(rc: int, err: str) -> None:
    assert "Traceback" not in err
    if rc != 0:
        assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    return {shape: make_folder(root / f"{shape[0]}x{shape[1]}", classes=shape[0], per_class=shape[1])
            for shape in FOLDERS}


@pytest.mark.parametrize("too_few", ["error", "drop"])
@pytest.mark.parametrize("split", SPLITS, ids=lambda s: "-".join(str(v) for v in s.values()))
@pytest.mark.parametrize("shape", FOLDERS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_folder_and_split_plans_or_says_what_to_set(folders, shape, split, too_few, tmp_path, capsys):
    """--plan (the dataset stage, the checks, the plan): exit 0, or one error line; following the error's own
    advice ends the same way, and no run folder is left either way."""
    rc, _ = run(tmp_path, config(folders[shape], split, too_few=too_few), "--plan")
    err = capsys.readouterr().err
    assert_exit_0_or_one_error_line(rc, err)
    assert not list((tmp_path / "out" / "runs").glob("*")) if (tmp_path / "out" / "runs").is_dir() else True
    for _ in range(3):  # an error's advice may lead to another error's advice (e.g. smaller val, then train)
        if rc == 0 or "data.split" not in err:
            break
        advice = dict(ADVICE.findall(err.split(": set ", 1)[-1].split(" set ", 1)[-1].split(", or ")[0]))
        assert advice, f"the error names no value to set: {err}"
        split = {"protocol": split["protocol"], **{k: v for k, v in split.items() if k in advice or k != "protocol"},
                 **{k: _value(v) for k, v in advice.items()}}
        if split["protocol"] == "fraction":
            split = {k: v for k, v in split.items() if not k.endswith("per_class")}
        rc, _ = run(tmp_path, config(folders[shape], split, too_few=too_few), "--plan")
        err = capsys.readouterr().err
        assert_exit_0_or_one_error_line(rc, err)
    assert rc == 0 or "add images" in err or "add class folders" in err, err


def _value(text: str):
    text = text.strip('"')
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def test_the_four_by_thirty_error_names_the_values_that_work(tmp_path, capsys):
    folder = make_folder(tmp_path / "flowers", classes=4, per_class=30)
    rc, _ = run(tmp_path, config(folder, {"train_per_class": 30, "val_per_class": 5}, too_few="drop"), "--plan")
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "out" / "runs").exists() or not list((tmp_path / "out" / "runs").iterdir())
    assert "leaves 0 of 4 classes" in err and "data.split.train_per_class <= 29" in err
    assert 'data.split.protocol = "fraction"' in err


def test_a_dataset_fault_leaves_no_run_folder(tmp_path, capsys):
    folder = make_folder(tmp_path / "f", classes=2, per_class=3)
    rc, _ = run(tmp_path, config(folder, {"train_per_class": 30, "val_per_class": 5}, too_few="error"))
    assert rc == 2 and "class 'class_0' has 3 images" in capsys.readouterr().err
    assert not list((tmp_path / "out" / "runs").iterdir())


TINY_STUDY = {"extract": {"views": 1, "num_workers": 0, "batch_size": 16},
              "classify": {"bootstrap": 0, "n_jobs": 1}, "fewshot": {"k": [1, 2], "draws": 1, "trials": 1},
              "finetune": {"policies": ["head", "last:1"], "n_boot": 0, "num_workers": 0},
              "tune": {"trials": 2, "finetune": {"epochs": [1]}}}


@pytest.mark.slow
@pytest.mark.parametrize("shape, split", [
    ((2, 3), {"train_per_class": 2, "val_per_class": 1}),  # 1 train, 1 val, 1 test image per class
    ((3, 5), {"protocol": "fraction", "train_fraction": 0.4, "val_fraction": 0.2}),
])
def test_the_smallest_viable_folders_run_the_whole_study(folders, shape, split, tmp_path, capsys):
    rc, _ = run(tmp_path, config(folders[shape], split, too_few="error", **TINY_STUDY))
    err = capsys.readouterr().err
    assert rc == 0, err
    (run_dir,) = (tmp_path / "out" / "runs").iterdir()
    assert (run_dir / "report.md").is_file() and (run_dir / "log.txt").is_file()
