"""Model selection on real Lite0 features of 4 Caltech classes: test rows never reach fitting or selection."""
import dataclasses
import pickle

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC

from classify.features import head_data
from classify.fewshot import draw_per_class, fewshot_pool
from classify.heads import GramSVC, head_grid, make_power, make_preprocessor
from classify.selection import HeadData, Rows, select_and_refit
from dataset.manifest import read_manifest
from study.schema import ConfigError
from tests.classify_fixtures import small_classify_config, tiny_lite0_features

pytestmark = pytest.mark.needs_data
FITTED = (StandardScaler, Normalizer, LogisticRegression, GramSVC, KNeighborsClassifier)


@pytest.fixture(scope="module")
def features(tmp_path_factory, tiny_manifest):
    return tiny_lite0_features(tmp_path_factory, tiny_manifest)


@pytest.fixture(scope="module")
def manifest(tiny_manifest):
    return read_manifest(tiny_manifest)


@pytest.fixture(scope="module")
def cfg():
    return small_classify_config()


def _poisoned(data: HeadData, rng) -> HeadData:
    """The same data with test rows replaced by far-away noise and test labels shuffled."""
    X = 1e3 + rng.standard_normal(data.test.X.shape).astype(data.test.X.dtype)
    return HeadData(train=data.train, val=data.val, val_fit=data.val_fit,
                    test=Rows(X, rng.permutation(data.test.y), data.test.sample_id))


@pytest.fixture
def fit_log(monkeypatch):
    """Record the (X, y) of every fit of the scalers and classifiers the heads are built from."""
    log = []
    for cls in FITTED:
        original = cls.fit

        def recording_fit(self, X, y=None, *args, _original=original, **kwargs):
            log.append((type(self).__name__, np.array(X, copy=True), None if y is None else np.array(y)))
            return _original(self, X, y, *args, **kwargs)
        monkeypatch.setattr(cls, "fit", recording_fit)
    return log


def _row_set(X: np.ndarray) -> set:
    return {row.tobytes() for row in np.ascontiguousarray(X)}


@pytest.mark.parametrize("method", ["lr", "svm", "knn"])
@pytest.mark.parametrize("feature_set", ["clean", "aug"])
def test_no_test_row_reaches_any_fit(features, manifest, cfg, fit_log, method, feature_set):
    data = head_data(features, manifest, feature_set=feature_set)
    data = _poisoned(data, np.random.default_rng(0))
    select_and_refit(method, head_grid(method, cfg[method]), data=data, seed=0, head_cfg=cfg[method], n_classes=4)
    assert fit_log, "the recorder saw no fit"
    test_rows = _row_set(data.test.X)
    allowed_y = {len(data.train): data.train.y, len(data.train) + len(data.val_fit):
                 np.concatenate([data.train.y, data.val_fit.y])}
    for name, X, y in fit_log:
        assert not (_row_set(X) & test_rows), f"{name}.fit saw a test row"
        assert np.abs(X).max() < 1e2, f"{name}.fit saw the poisoned test features"
        if y is not None:  # classifiers: labels are exactly train's, or train+val's for the refit
            assert len(y) in allowed_y and np.array_equal(y, allowed_y[len(y)]), name


@pytest.mark.parametrize("method", ["lr", "svm", "knn"])
def test_selection_and_refit_ignore_test_rows(features, manifest, cfg, method):
    data = head_data(features, manifest, feature_set="clean")
    grid = head_grid(method, cfg[method])
    a = select_and_refit(method, grid, data=data, seed=0, head_cfg=cfg[method], n_classes=4)
    b = select_and_refit(method, grid, data=_poisoned(data, np.random.default_rng(1)), seed=0, head_cfg=cfg[method],
                         n_classes=4)
    assert a.selection.points == b.selection.points and a.selection.best.params == b.selection.best.params
    assert np.array_equal(a.model.predict(data.val.X), b.model.predict(data.val.X))
    assert len(a.selection.points) == len(grid)
    # Real features of 4 distinct classes: the chosen head is far above chance (0.25) on test.
    assert np.mean(a.test_pred == data.test.y) >= 0.75


def test_best_has_the_top_val_score_and_ties_go_to_the_lower_val_log_loss(features, manifest, cfg):
    data = head_data(features, manifest, feature_set="clean")
    fit = select_and_refit("lr", head_grid("lr", cfg["lr"]), data=data, seed=0, head_cfg=cfg["lr"], n_classes=4)
    scores = [s.val_mean_per_class for s in fit.selection.points]
    assert all(0 <= s <= 1 for s in scores)
    tied = [s for s in fit.selection.points if s.val_mean_per_class == max(scores)]
    assert fit.selection.best.params == min(tied, key=lambda s: s.val_log_loss).params
    # Val has 2 images per class: every score is a multiple of 1/8.
    assert all(abs(s * 8 - round(s * 8)) < 1e-9 for s in scores)


def test_results_are_deterministic_for_a_seed(features, manifest, cfg):
    data = head_data(features, manifest, feature_set="aug")
    runs = [select_and_refit("svm", head_grid("svm", cfg["svm"]), data=data, seed=3, head_cfg=cfg["svm"], n_classes=4)
            for _ in range(2)]
    assert runs[0].selection.points == runs[1].selection.points
    assert np.array_equal(runs[0].test_scores, runs[1].test_scores)


def test_aug_feature_set_adds_views_to_fitting_rows_only(features, manifest):
    clean = head_data(features, manifest, feature_set="clean")
    aug = head_data(features, manifest, feature_set="aug")
    assert len(clean.train) == 24 and len(aug.train) == 48  # 6 train images x 4 classes, view 0 + 1 view
    assert len(aug.val_fit) == 16 and len(aug.val) == len(clean.val) == 8
    assert np.array_equal(aug.val.X, clean.val.X) and np.array_equal(aug.test.X, clean.test.X)
    assert set(aug.train.sample_id) == set(clean.train.sample_id)


def test_fewshot_draws_k_per_class_from_the_pool_seeded(features, manifest):
    pool = fewshot_pool(head_data(features, manifest, feature_set="clean"), pool="train+val")
    assert len(pool) == 32 and not set(pool.sample_id) & set(manifest.query("split == 'test'").sample_id)
    a, b, c = (draw_per_class(pool, k=3, seed=s) for s in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.bincount(pool.y[a]).tolist() == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="only 8 images"):
        draw_per_class(pool, k=9, seed=0)


def test_grid_config_is_validated_with_the_key_named():
    with pytest.raises(ConfigError, match=r"classify\.lr\.norm\[0\].*'l3'"):
        small_classify_config(lr={"norm": ["l3"]})
    with pytest.raises(ConfigError, match=r"classify\.knn\.k\[0\]"):
        small_classify_config(knn={"k": [0]})


def test_grid_walks_c_upwards_within_each_normalisation(cfg):
    grid = head_grid("lr", cfg["lr"])
    assert len(grid) == 8
    for norm in ("standard", "l2"):
        cs = [p["C"] for p in grid if p["norm"] == norm]
        assert cs == sorted(cs) == [0.01, 0.1, 1.0, 10.0]


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_gram_svc_matches_libsvm_with_its_own_kernel(features, manifest, kernel):
    data = head_data(features, manifest, feature_set="clean")
    scaler = StandardScaler().fit(data.train.X)
    X, X_test = scaler.transform(data.train.X), scaler.transform(data.test.X)
    ours = GramSVC(C=0.5, kernel=kernel).fit(X, data.train.y)
    theirs = SVC(C=0.5, kernel=kernel, gamma="scale").fit(X, data.train.y)
    # Past one 512-row slice of the primal path (linear, 4 classes; RBF goes through libsvm).
    X_test = np.concatenate([X_test] * (600 // len(X_test) + 1))
    assert (ours._primal() is not None) == (kernel == "linear")
    assert np.array_equal(ours.predict(X_test), theirs.predict(X_test))
    np.testing.assert_allclose(ours.decision_function(X_test), theirs.decision_function(X_test), rtol=1e-3, atol=1e-3)
    # A saved head keeps no primal weights and rebuilds the same ones when it predicts again.
    loaded = pickle.loads(pickle.dumps(ours))
    assert "_primal_cache" not in vars(loaded)
    assert np.array_equal(loaded.predict(X_test), theirs.predict(X_test))


def test_signed_power_keeps_the_sign_and_rejects_out_of_range_powers():
    X = np.array([[-4.0, 0.0, 9.0]], dtype=np.float32)
    np.testing.assert_allclose(make_power(0.5).fit_transform(X), [[-2.0, 0.0, 3.0]])
    assert make_power(1.0).fit_transform(X) is X or np.array_equal(make_power(1.0).fit_transform(X), X)
    with pytest.raises(ValueError, match=r"power 0\.0; allowed: 0 < power <= 1"):
        make_power(0.0)
    with pytest.raises(ConfigError, match=r"classify\.lr\.power\[1\].*1\.5"):
        small_classify_config(lr={"power": [0.5, 1.5]})


def test_power_is_a_preprocessing_axis_of_the_grid_and_the_pipeline(features, manifest, cfg):
    head_cfg = {**cfg["lr"], "power": [1.0, 0.5]}
    grid = head_grid("lr", head_cfg)
    assert len(grid) == 16 and {p["power"] for p in grid} == {0.5, 1.0}
    data = head_data(features, manifest, feature_set="clean")
    fit = select_and_refit("lr", grid, data=data, seed=0, head_cfg=head_cfg, n_classes=4)
    assert len(fit.selection.points) == 16 and fit.model.named_steps["power"].kw_args == (
        {"power": 0.5} if fit.selection.best.params["power"] == 0.5 else None)
    # A head saved before the power axis existed (no "power" key) still builds: power 1.
    old = {k: v for k, v in grid[-1].items() if k != "power"}
    assert make_preprocessor(old, n_rows=10, seed=0).named_steps["power"].kw_args is None


def _with_mirror_rows(fs, ids=None):
    """The cache plus view -1 rows (3x each clean row), as extract.tta = 'hflip' would add."""
    clean = np.flatnonzero(fs.view == 0)
    if ids is not None:
        clean = clean[np.isin(fs.sample_id[clean], ids)]
    cat = lambda a, b: np.concatenate([a, b])  # noqa: E731
    return dataclasses.replace(fs, features=cat(fs.features, 3 * fs.features[clean]),
                               labels=cat(fs.labels, fs.labels[clean]),
                               sample_id=cat(fs.sample_id, fs.sample_id[clean]),
                               split=cat(fs.split, fs.split[clean]),
                               view=cat(fs.view, np.full(len(clean), -1)))


def test_mirror_views_are_averaged_into_every_splits_clean_rows(features, manifest):
    with_tta = _with_mirror_rows(features)
    plain = head_data(features, manifest, feature_set="clean")
    for fset in ("clean", "aug"):
        averaged = head_data(with_tta, manifest, feature_set=fset)
        for split in ("train", "val", "val_fit", "test"):
            rows, base = getattr(averaged, split), getattr(head_data(features, manifest, feature_set=fset), split)
            assert rows.sample_id.tolist() == base.sample_id.tolist()  # no mirror row becomes a row of its own
            is_clean = np.isin(np.arange(len(rows)), np.arange(len(getattr(plain, split))))
            np.testing.assert_allclose(rows.X[is_clean], 2 * base.X[is_clean], rtol=1e-6)  # (x + 3x) / 2
            np.testing.assert_array_equal(rows.X[~is_clean], base.X[~is_clean])  # augmented views untouched
    ignored = head_data(with_tta, manifest, feature_set="clean", tta=False)
    np.testing.assert_array_equal(ignored.test.X, plain.test.X)
    with pytest.raises(ValueError, match="mirror rows for"):
        head_data(_with_mirror_rows(features, ids=features.sample_id[:3]), manifest, feature_set="clean")
