"""The head arm's search on real Lite0 features of 4 Caltech classes: test rows never reach a fit or the choice,
the chosen trial is the best on val (exact ties to the earlier trial), a seed fixes the search, and the rows and
pipelines the trials fit are what they should be."""
import dataclasses
import math
import pickle
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC

from classify.features import head_data
from classify.fewshot import draw_per_class
from classify.heads import GramSVC, make_pipeline, make_power, make_preprocessor
from classify.search import cv_folds, point_of, search_heads
from classify.selection import HeadData, Rows
from classify.stage import head_search
from classify.store import load_head
from dataset.manifest import read_manifest
from study import tune
from study.protocol import choose_trial
from study.schema import ConfigError
from tests.classify_fixtures import small_classify_config, small_tune_config, steady_trial_clock, tiny_lite0_features

pytestmark = pytest.mark.needs_data
FITTED = (StandardScaler, Normalizer, LogisticRegression, GramSVC, KNeighborsClassifier)
CLASSIFIER = {"lr": "LogisticRegression", "svm": "GramSVC", "knn": "KNeighborsClassifier"}
AXES = {"lr": {"lr_C"}, "svm": {"svm_C", "svm_kernel"}, "knn": {"knn_k", "knn_metric", "knn_weights"}}
TIMINGS = ("train_s", "predict_s", "refit_s", "select_s")


@pytest.fixture(scope="module")
def features(tmp_path_factory, tiny_manifest):
    return tiny_lite0_features(tmp_path_factory, tiny_manifest)


@pytest.fixture(scope="module")
def manifest(tiny_manifest):
    return read_manifest(tiny_manifest)


def search_of(features, manifest, tmp_path, *, cfg=None, seed: int = 0):
    """The search the classify stage builds for this backbone: one HeadData per configured feature set."""
    cfg = cfg or small_classify_config()
    return head_search({"clean": features, "aug": features}, backbone="efficientnet_lite0", manifest=manifest,
                       cfg=cfg, seed=seed, run_dir=tmp_path)


def run_search(search, out, *, cfg=None, tune_cfg=None):
    """(the head row, the trial rows) of one search under ``out``."""
    (row,), trials = search_heads(search, cfg=cfg or small_classify_config(), tune_cfg=tune_cfg or small_tune_config(),
                                  out_dir=out, heads_dir=out / "heads")
    return row, trials


def _poisoned(data: HeadData, rng) -> HeadData:
    """The same data with test rows replaced by far-away noise and test labels shuffled."""
    X = 1e3 + rng.standard_normal(data.test.X.shape).astype(data.test.X.dtype)
    return HeadData(train=data.train, val=data.val, val_fit=data.val_fit,
                    test=Rows(X, rng.permutation(data.test.y), data.test.sample_id))


def poisoned(search, seed: int):
    rng = np.random.default_rng(seed)
    return dataclasses.replace(search, data={name: _poisoned(d, rng) for name, d in search.data.items()})


def timeless(record) -> dict:
    return {k: v for k, v in record.to_dict().items() if k not in (*TIMINGS, "seconds")}


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
def test_no_test_row_reaches_any_fit_of_the_search_or_the_refit(features, manifest, fit_log, tmp_path, method):
    """Every trial fits on train (clean, or with its augmented views for 'aug'), the cross-validation (2 val
    images per class) on folds of train+val and the refit on train+val; the test rows, poisoned, reach none."""
    cfg = small_classify_config(heads=[method])
    search = poisoned(search_of(features, manifest, tmp_path, cfg=cfg), seed=0)
    assert cv_folds(search) > 1
    _, trials = run_search(search, tmp_path / "out", cfg=cfg)
    test_rows = set().union(*(_row_set(d.test.X) for d in search.data.values()))
    # A classifier sees its pipeline's transformed rows, so its fits are told apart by their labels.
    train_y = {len(d.train): d.train.y for d in search.data.values()}
    refit_y = {len(d.train) + len(d.val_fit): np.concatenate([d.train.y, d.val_fit.y]) for d in search.data.values()}
    labelled = [(name, y) for name, _, y in fit_log if name in CLASSIFIER.values()]
    assert {name for name, _ in labelled} == {CLASSIFIER[method]}
    same = lambda y, known: len(y) in known and np.array_equal(y, known[len(y)])  # noqa: E731
    assert sum(same(y, train_y) for _, y in labelled) >= len(trials) == 8  # every trial fit on train
    assert sum(same(y, refit_y) for _, y in labelled) == 1  # and one refit on train+val
    assert len(labelled) >= 8 + 1 + 8 * cv_folds(search)  # and the folds of every trial's cross-validation
    for name, X, y in fit_log:
        assert not (_row_set(X) & test_rows), f"{name}.fit saw a test row"
        assert np.abs(X).max() < 1e2, f"{name}.fit saw the poisoned test features"
        if y is not None:  # classifiers: labels of train and val images only (a fold holds a subset of them)
            pool = Counter(refit_y[min(k for k in refit_y if k >= len(y))].tolist())
            assert not Counter(y.tolist()) - pool, name


def test_the_search_and_its_choice_ignore_test_rows(features, manifest, tmp_path, monkeypatch):
    steady_trial_clock(monkeypatch)
    search = search_of(features, manifest, tmp_path)
    row, trials = run_search(search, tmp_path / "a")
    bad_row, bad_trials = run_search(poisoned(search, seed=1), tmp_path / "b")
    assert [timeless(t) for t in trials] == [timeless(t) for t in bad_trials]
    assert (row.method, row.feature_set, row.hyperparams) == (bad_row.method, bad_row.feature_set,
                                                              bad_row.hyperparams)
    assert row.selection == bad_row.selection and row.val_mean_per_class == bad_row.val_mean_per_class
    model, bad_model = (load_head(out / "heads" / r.keys["head_key"])[0]
                        for out, r in ((tmp_path / "a", row), (tmp_path / "b", bad_row)))
    val = search.data[row.feature_set].val.X
    assert np.array_equal(model.predict(val), bad_model.predict(val))
    # Real features of 4 distinct classes: the chosen head is far above chance (0.25) on test.
    assert row.metrics.mean_per_class >= 0.75


def test_the_chosen_trial_has_the_best_score_and_an_exact_tie_goes_to_the_earlier_trial(features, manifest,
                                                                                         tmp_path, monkeypatch):
    # LR and the SVM share their best score on these rows: the tie-break chooses, the same way in every run
    # (the earlier trial; wall seconds would differ from run to run).
    cfg = small_classify_config(heads=["lr", "svm"])
    search = search_of(features, manifest, tmp_path, cfg=cfg)
    row, trials = run_search(search, tmp_path / "real", cfg=cfg)

    def score(t):  # 2 val images per class: the search chose by cross-validation on train+val
        return t.cv if t.cv is not None else t.val_mean_per_class
    best = max(score(t) for t in trials)
    tied = [t for t in trials if score(t) == best]
    assert row.selection.best.extra["trial"] == min(t.number for t in tied)
    assert len(row.selection.points) == len(trials) == 8
    # Val has 2 images per class: every val score is a multiple of 1/8.
    assert all(abs(t.val_mean_per_class * 8 - round(t.val_mean_per_class * 8)) < 1e-9 for t in trials)
    again, _ = run_search(search, tmp_path / "again", cfg=cfg)
    assert again.selection.best.extra["trial"] == row.selection.best.extra["trial"]


def test_choose_trial_ranks_val_then_trial_number():
    def t(number, val, seconds):
        return SimpleNamespace(number=number, val=val, seconds=seconds)
    trials = [t(0, 0.5, 0.1), t(1, 0.75, 3.0), t(2, 0.75, 2.0), t(3, 0.75, 2.0), t(4, None, 0.0), t(5, 0.7, 0.0)]
    assert choose_trial(trials) == 1  # best val; of the three at 0.75, the earliest (not the cheapest)
    assert choose_trial([t(0, float("nan"), 0.0), t(1, 0.1, 9.0)]) == 1  # an unknown val ranks last
    with pytest.raises(ValueError, match="no completed trial"):
        choose_trial([])


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_search_is_deterministic_for_a_seed(features, manifest, tmp_path, monkeypatch, sampler):
    steady_trial_clock(monkeypatch)
    search = search_of(features, manifest, tmp_path, seed=3)
    tune_cfg = small_tune_config(sampler=sampler, startup_trials=4)
    (a, a_trials), (b, b_trials) = (run_search(search, tmp_path / d, tune_cfg=tune_cfg) for d in "ab")
    assert [timeless(t) for t in a_trials] == [timeless(t) for t in b_trials]
    assert timeless(a) == timeless(b)
    _, other = run_search(search, tmp_path / "c", tune_cfg=small_tune_config(sampler=sampler, startup_trials=4,
                                                                            seed=1))
    assert [t.params for t in other] != [t.params for t in a_trials]  # the seed is what fixes the draws


def test_each_trial_draws_its_methods_settings_only_and_the_row_is_its_pipeline(features, manifest, tmp_path):
    row, trials = run_search(search_of(features, manifest, tmp_path), tmp_path / "out")
    assert {t.params["method"] for t in trials} == {"lr", "svm", "knn"}
    assert {t.params["feature_set"] for t in trials} == {"clean", "aug"}
    for t in trials:
        assert set(t.params) == {"method", "feature_set", "norm", "power", *AXES[t.params["method"]]}
    method, feature_set, point = point_of(row.selection.best.params)
    assert (row.method, row.feature_set, row.hyperparams) == (method, feature_set, point)
    assert point_of({"method": "lr", "feature_set": "aug", "norm": "l2", "power": 0.5, "lr_C": 2.0}) == (
        "lr", "aug", {"power": 0.5, "norm": "l2", "pca": 0, "C": 2.0})
    assert point_of({"method": "svm", "feature_set": "clean", "norm": "standard", "power": 1.0, "svm_C": 0.1,
                     "svm_kernel": "rbf"})[2] == {"power": 1.0, "norm": "standard", "pca": 0, "C": 0.1,
                                                  "kernel": "rbf"}
    assert point_of({"method": "knn", "feature_set": "clean", "norm": "l2", "power": 1.0, "knn_k": 3,
                     "knn_metric": "cosine", "knn_weights": "distance"})[2] == {
        "power": 1.0, "norm": "l2", "pca": 0, "k": 3, "metric": "cosine", "weights": "distance"}


def test_trials_name_the_settings_at_an_edge_of_their_range(features, manifest, tmp_path):
    """A chosen value within 5% of an end of its range (log space for log ranges) is flagged: the range may be
    too narrow. Recomputed here from the declared space."""
    cfg = small_classify_config(heads=["knn"])
    tune_cfg = small_tune_config(head={"knn_k": {"low": 1, "high": 16, "log": True}})
    _, trials = run_search(search_of(features, manifest, tmp_path, cfg=cfg), tmp_path / "out", cfg=cfg,
                           tune_cfg=tune_cfg)

    def at_edge(k):  # log(1) = 0 .. log(16): within 5% of the width of either end
        return min(math.log(k), math.log(16) - math.log(k)) <= 0.05 * math.log(16)
    assert [t.at_edge for t in trials] == [("knn_k",) if at_edge(t.params["knn_k"]) else () for t in trials]
    assert {t.at_edge for t in trials} == {("knn_k",), ()}  # both kinds drawn: the test tells them apart
    assert not tune.Param("norm", choices=("l2",)).at_edge("l2")


def test_a_search_is_charged_every_feature_set_it_read_not_only_the_chosen_one(features, manifest, tmp_path):
    """Its trials fit on 'aug' rows too, so a search that chose a clean head still read the augmented views."""
    search = search_of(features, manifest, tmp_path)
    aug = search.data["aug"]
    shuffled = Rows(aug.train.X, np.random.default_rng(0).permutation(aug.train.y), aug.train.sample_id)
    row, trials = run_search(dataclasses.replace(search, data={**search.data, "aug": dataclasses.replace(
        aug, train=shuffled)}), tmp_path / "out")
    assert row.feature_set == "clean" and "aug" in {t.params["feature_set"] for t in trials}
    assert row.costs.feature_s == pytest.approx(features.cost_s(np.ones(len(features.view), bool)))
    assert row.costs.feature_s > features.cost_s(features.view <= 0) > 0


def test_space_values_are_validated_with_the_key_named():
    with pytest.raises(ConfigError, match=r"tune\.head\.norm\[0\].*'l3'"):
        small_tune_config(head={"norm": ["l3"]})
    with pytest.raises(ConfigError, match=r"tune\.head\.knn_k\.low.* 0"):
        small_tune_config(head={"knn_k": {"low": 0, "high": 5}})
    with pytest.raises(ConfigError, match=r"tune\.head\.knn_k\.high.* 4\.5"):
        small_tune_config(head={"knn_k": {"low": 1, "high": 4.5}})
    with pytest.raises(ConfigError, match=r"tune\.head\.lr_C\.low.* -1"):
        small_tune_config(head={"lr_C": {"low": -1.0, "high": 1.0}})
    with pytest.raises(ConfigError, match=r"tune\.head\.lr_C.*L > 0 when log"):
        small_tune_config(head={"lr_C": {"low": 0.0, "high": 1.0, "log": True}})
    with pytest.raises(ConfigError, match=r"tune\.head\.svm_kernel\[1\].*'poly'"):
        small_tune_config(head={"svm_kernel": ["linear", "poly"]})
    with pytest.raises(ConfigError, match=r"tune\.head\.svm_C.*list of distinct choices"):
        small_tune_config(head={"svm_C": [0.1, 0.1]})
    with pytest.raises(ConfigError, match=r"classify\.heads\[1\].*'mlp'"):
        small_classify_config(heads=["lr", "mlp"])
    with pytest.raises(ConfigError, match=r"classify\.feature_sets\[0\].*'raw'"):
        small_classify_config(feature_sets=["raw"])


def test_aug_feature_set_adds_views_to_fitting_rows_only(features, manifest):
    clean = head_data(features, manifest, feature_set="clean")
    aug = head_data(features, manifest, feature_set="aug")
    assert len(clean.train) == 24 and len(aug.train) == 48  # 6 train images x 4 classes, view 0 + 1 view
    assert len(aug.val_fit) == 16 and len(aug.val) == len(clean.val) == 8
    assert np.array_equal(aug.val.X, clean.val.X) and np.array_equal(aug.test.X, clean.test.X)
    assert set(aug.train.sample_id) == set(clean.train.sample_id)


def test_fewshot_draws_k_per_class_from_train_seeded(features, manifest):
    pool = head_data(features, manifest, feature_set="clean").train
    assert len(pool) == 24 and set(pool.sample_id) == set(manifest.query("split == 'train'").sample_id)
    a, b, c = (draw_per_class(pool, k=3, seed=s) for s in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.bincount(pool.y[a]).tolist() == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="only 6 images"):
        draw_per_class(pool, k=7, seed=0)


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
    assert np.array_equal(make_power(1.0).fit_transform(X), X)
    with pytest.raises(ValueError, match=r"power 0\.0; allowed: 0 < power <= 1"):
        make_power(0.0)
    with pytest.raises(ConfigError, match=r"tune\.head\.power\[1\].*1\.5"):
        small_tune_config(head={"power": [0.5, 1.5]})


def test_power_is_an_axis_of_the_search_and_a_step_of_the_pipeline(features, manifest, tmp_path):
    cfg = small_classify_config(heads=["lr"])
    row, trials = run_search(search_of(features, manifest, tmp_path, cfg=cfg), tmp_path / "out", cfg=cfg)
    assert {t.params["power"] for t in trials} == {0.5, 1.0}
    model, meta = load_head(tmp_path / "out" / "heads" / row.keys["head_key"])
    assert meta["hyperparams"]["power"] == row.hyperparams["power"]
    assert model.named_steps["power"].kw_args == ({"power": 0.5} if row.hyperparams["power"] == 0.5 else None)
    point = {"power": 0.5, "norm": "standard", "pca": 0, "C": 1.0}
    assert make_pipeline("lr", point, seed=0, head_cfg=cfg["lr"], n_rows=10).named_steps["power"].kw_args == {
        "power": 0.5}
    # A head saved before the power axis existed (no "power" key) still builds: power 1.
    old = {k: v for k, v in point.items() if k != "power"}
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
