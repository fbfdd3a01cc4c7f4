"""``classify.predict`` end to end: a head fitted on real Lite0 features classifies the images themselves."""
import json
import shutil

import numpy as np
import pytest

from classify.features import head_data
from classify.heads import class_scores
from classify.predict import HeadMismatch, image_paths, main, predict_images
from classify.search import backbone_spec_of
from classify.selection import concat, refit
from classify.store import save_head
from dataset.manifest import read_manifest
from extract.backbones import load_backbone
from tests.classify_fixtures import small_classify_config, tiny_lite0_features

pytestmark = pytest.mark.needs_data


@pytest.fixture(scope="module", params=["none", "hflip"])
def saved_head(request, tmp_path_factory, tiny_manifest, data_root):
    """An LR head fitted on the tiny features' train+val rows (a point the search could choose), without and with
    mirror averaging (extract.tta), saved as the stage saves one."""
    features = tiny_lite0_features(tmp_path_factory, tiny_manifest, tta=request.param)
    manifest = read_manifest(tiny_manifest)
    cfg = small_classify_config()
    data = head_data(features, manifest, feature_set="clean")
    point = {"power": 0.5, "norm": "standard", "pca": 0, "C": 1.0}
    model = refit("lr", point, rows=concat(data.train, data.val_fit), seed=0, head_cfg=cfg["lr"])
    scores = class_scores(model, data.test.X, n_classes=4)
    head_dir = tmp_path_factory.mktemp("head")
    names = ["accordion", "anchor", "barrel", "crab"]
    save_head(head_dir, model=model, meta={
        "backbone": "efficientnet_lite0", "backbone_spec": backbone_spec_of(features.spec, "efficientnet_lite0"),
        "features_spec": features.spec, "class_names": names, "cache_key": features.key, "hyperparams": point})
    test = manifest[manifest["split"] == "test"].set_index("sample_id").loc[data.test.sample_id]
    paths = [data_root / p for p in test["path"]]
    expected = [names[i] for i in model.predict(data.test.X)]
    return head_dir, paths, expected, scores.max(axis=1)


def test_saved_head_predicts_the_same_classes_from_the_images(saved_head):
    """Same classes and probabilities as the stage's test scores: predict embeds the images exactly as the
    cache did (with tta = "hflip", the mean of each image and its mirror)."""
    head_dir, paths, expected, expected_prob = saved_head
    results, failed = predict_images(head_dir, paths)
    assert not failed
    assert [r.class_name for r in results] == expected
    assert all(r.calibrated and 0.25 < r.probability <= 1.0 for r in results)
    np.testing.assert_allclose([r.probability for r in results], expected_prob, rtol=0, atol=1e-4)


def test_cli_takes_a_folder_and_prints_class_and_probability(saved_head, tmp_path, capsys):
    head_dir, paths, expected, _ = saved_head
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, p in enumerate(paths[:3]):
        shutil.copy(p, folder / f"{i:02d}_{p.name}")
    (folder / "notes.txt").write_text("not an image")
    assert main(["--head", str(head_dir), str(folder)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[1] for line in lines] == expected[:3]
    assert all(line.split("\t")[2].startswith("probability=") for line in lines)
    assert image_paths([str(folder)]) == sorted(folder.glob("*.jpg"))


def test_a_backbone_with_other_weights_is_refused_naming_the_fields(saved_head):
    head_dir, paths, *_ = saved_head
    random_weights = load_backbone("efficientnet_lite0", pretrained=False)
    with pytest.raises(HeadMismatch, match="weights"):
        predict_images(head_dir, paths[:1], backbone=random_weights)


def test_a_head_whose_preprocessing_differs_is_refused(saved_head, tmp_path, capsys):
    head_dir, paths, *_ = saved_head
    tampered = tmp_path / "tampered"
    shutil.copytree(head_dir, tampered)
    meta = json.loads((tampered / "meta.json").read_text())
    meta["backbone_spec"]["data_config"]["crop_size"] += 16
    (tampered / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(HeadMismatch, match=r"data_config\.crop_size"):
        predict_images(tampered, paths[:1])
    assert main(["--head", str(tampered), str(paths[0])]) == 2
    assert "data_config.crop_size" in capsys.readouterr().err


def test_an_unreadable_image_is_reported_not_fatal(saved_head, tmp_path):
    head_dir, paths, expected, _ = saved_head
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    results, failed = predict_images(head_dir, [paths[0], broken])
    assert [r.class_name for r in results] == expected[:1]
    assert [p for p, _ in failed] == [broken]
    assert np.isfinite(results[0].probability)
