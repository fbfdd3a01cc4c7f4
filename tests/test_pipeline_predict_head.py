"""``pipeline.predict --head``: a head fitted on real Lite0 features classifies the images themselves, refuses a
backbone that is not the one it was fitted on, and every bad input is one ``error:`` line with exit status 2."""
import json
import shutil

import numpy as np
import pytest

from classify.features import head_data
from classify.heads import make_pipeline, probabilities
from classify.search import backbone_spec_of
from classify.store import save_head
from dataset.manifest import read_manifest
from extract.backbones import load_backbone
from pipeline.predict import image_paths, main, predict
from pipeline.variant import VariantError, head_variant
from tests.classify_fixtures import tiny_lite0_features

pytestmark = pytest.mark.needs_data
NAMES = ["accordion", "anchor", "barrel", "crab"]


@pytest.fixture(scope="module", params=["none", "hflip"])
def saved_head(request, tmp_path_factory, tiny_manifest, data_root):
    """A head fitted on the tiny features, without and with mirror averaging (extract.tta)."""
    features = tiny_lite0_features(tmp_path_factory, tiny_manifest, tta=request.param)
    manifest = read_manifest(tiny_manifest)
    data = head_data(features, manifest, feature_set="clean")
    model = make_pipeline("lr", {"power": 0.5, "norm": "standard", "pca": 0, "C": 1.0}, seed=0,
                          head_cfg={"max_iter": 300, "tol": 1e-4}, n_rows=len(data.train)).fit(data.train.X,
                                                                                               data.train.y)
    head_dir = tmp_path_factory.mktemp("head")
    save_head(head_dir, model=model, meta={
        "backbone": "efficientnet_lite0", "backbone_spec": backbone_spec_of(features.spec, "efficientnet_lite0"),
        "features_spec": features.spec, "class_names": NAMES, "cache_key": features.key, "method": "lr",
        "feature_set": "clean"})
    test = manifest[manifest["split"] == "test"].set_index("sample_id").loc[data.test.sample_id]
    paths = [data_root / p for p in test["path"]]
    expected, _ = probabilities(model, data.test.X, n_classes=len(NAMES))
    return head_dir, paths, expected


def test_a_saved_head_predicts_the_studys_probabilities_from_the_images(saved_head):
    """Embedded as the store did (with tta = "hflip", the mean of each image and its mirror)."""
    head_dir, paths, expected = saved_head
    results, failed = predict(head_variant(head_dir), paths, topk=len(NAMES))
    assert not failed
    got = np.array([[dict(r.top)[n] for n in NAMES] for r in results])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert [r.top[0][0] for r in results] == [NAMES[i] for i in expected.argmax(1)]


def test_the_cli_writes_csv_and_json_with_a_header_topk_and_output(saved_head, tmp_path, capsys):
    head_dir, paths, expected = saved_head
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, p in enumerate(paths[:3]):
        shutil.copy(p, folder / f"{i:02d}_{p.name}")
    (folder / "notes.txt").write_text("not an image")
    assert main(["--head", str(head_dir), "--topk", "2", "--quiet", str(folder)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "path,class_1,probability_1,class_2,probability_2"
    assert [line.split(",")[1] for line in lines[1:]] == [NAMES[i] for i in expected[:3].argmax(1)]
    assert image_paths([str(folder)]) == sorted(folder.glob("*.jpg"))
    out = tmp_path / "p.json"
    assert main(["--head", str(head_dir), "--format", "json", "--output", str(out), "--quiet", str(folder)]) == 0
    doc = json.loads(out.read_text())
    assert [len(p["top"]) for p in doc["predictions"]] == [1, 1, 1] and doc["calibrated"] and not doc["skipped"]


def test_an_unreadable_image_is_reported_and_exits_1(saved_head, tmp_path, capsys):
    head_dir, paths, expected = saved_head
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["--head", str(head_dir), "--quiet", str(paths[0]), str(broken)]) == 1
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[1].split(",")[1] == NAMES[expected[0].argmax()]
    assert f"skipped {broken}" in captured.err


def test_a_backbone_with_other_weights_is_refused_naming_the_fields(saved_head):
    head_dir, paths, _ = saved_head
    with pytest.raises(VariantError, match="weights"):
        head_variant(head_dir, loader=lambda name, **kw: load_backbone(name, pretrained=False))


def _tampered(head_dir, tmp_path, change) -> str:
    tampered = tmp_path / "tampered"
    shutil.copytree(head_dir, tampered)
    meta = json.loads((tampered / "meta.json").read_text())
    change(meta)
    (tampered / "meta.json").write_text(json.dumps(meta))
    return str(tampered)


@pytest.mark.parametrize("case, args, message", [
    ("crop size", lambda h, t: ["--head", _tampered(h, t, lambda m: m["backbone_spec"]["data_config"].update(
        crop_size=240))], "data_config.crop_size"),
    ("no backbone", lambda h, t: ["--head", _tampered(h, t, lambda m: m.pop("backbone"))], "lacks 'backbone'"),
    ("class names", lambda h, t: ["--head", _tampered(h, t, lambda m: m.update(class_names=["a", "b"]))],
     "class_names"),
    ("unknown backbone", lambda h, t: ["--head", str(h), "--backbone", "resnet5000"], "unknown backbone"),
    ("device gpu", lambda h, t: ["--head", str(h), "--device", "gpu"], "--device 'gpu'; allowed: auto, cpu"),
    ("topk", lambda h, t: ["--head", str(h), "--topk", "9"], "--topk 9; allowed: 1..4"),
    ("format", lambda h, t: ["--head", str(h), "--format", "xml"], "--format 'xml'; allowed: csv, json"),
    ("no run", lambda h, t: ["--run", str(t)], "is not a run folder"),
    ("both", lambda h, t: ["--run", str(t), "--head", str(h)], "not allowed with argument"),
    ("missing image", lambda h, t: ["--head", str(h), str(t / "nope.jpg")], "neither an image file nor a folder"),
])
def test_bad_input_is_one_error_line_and_exit_2(saved_head, tmp_path, capsys, case, args, message):
    head_dir, paths, _ = saved_head
    argv = args(head_dir, tmp_path)
    assert main([*argv, *([str(paths[0])] if "nope.jpg" not in argv[-1] else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and message in err, err
