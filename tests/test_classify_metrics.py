import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, top_k_accuracy_score

from study.metrics import evaluate


@pytest.fixture
def predictions():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 7, 300)
    p = np.where(rng.random(300) < 0.7, y, rng.integers(0, 7, 300))
    s = rng.random((300, 7))
    s[np.arange(300), p] += 1.0
    return y, p, s


def test_metrics_agree_with_scikit_learn(predictions):
    y, p, s = predictions
    m = evaluate(y, p, s, n_classes=7, n_boot=0)
    assert m["top1"] == pytest.approx(np.mean(y == p))
    assert m["mean_per_class"] == pytest.approx(balanced_accuracy_score(y, p))
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert m["top5"] == pytest.approx(top_k_accuracy_score(y, s, k=5, labels=np.arange(7)))
    assert np.array(m["confusion"]).sum() == 300
    assert m["per_class_acc"][3] == pytest.approx(np.mean(p[y == 3] == 3))


def test_bootstrap_interval_brackets_the_point_and_is_seeded(predictions):
    y, p, s = predictions
    a = evaluate(y, p, s, n_classes=7, n_boot=200, seed=3)
    b = evaluate(y, p, s, n_classes=7, n_boot=200, seed=3)
    c = evaluate(y, p, s, n_classes=7, n_boot=200, seed=4)
    for key in ("top1", "mean_per_class", "macro_f1", "top5"):
        lo, hi = a["ci95"][key]
        assert lo <= a[key] <= hi and hi - lo < 0.25
    assert a["ci95"] == b["ci95"] and a["ci95"] != c["ci95"]


def test_absent_class_has_no_per_class_accuracy():
    m = evaluate([0, 0, 1], [0, 1, 1], n_classes=3, n_boot=0)
    assert m["per_class_acc"][2] is None and m["top5"] is None


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="expected scores"):
        evaluate([0, 1], [0, 1], np.zeros((2, 5)), n_classes=3)
