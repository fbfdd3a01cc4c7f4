"""The head arm chooses by cross-validation on train+val where val cannot: fewer than 10 val images per class, or a
val that saturates or ties across methods (issue 22: a 100% val once chose 1-NN by its meaningless log-loss)."""
import numpy as np


def test_a_saturated_val_is_reranked_by_cross_validation_and_a_small_val_chooses_by_it():
    """Val at 100% for every method cannot choose: the tied trials are re-ranked by cross-validation on train+val
    (never by log-loss across families, never by cost alone), and the row says why; with fewer than 10 val images
    per class the search scores every trial by cross-validation from the start."""
    from types import SimpleNamespace

    from classify.search import CV_BELOW, HeadJob, HeadSearch, _choose, cv_folds
    from classify.selection import HeadData, Rows

    rng = np.random.default_rng(0)

    def blobs(n, prefix, *, spread):
        y = np.repeat(np.arange(4), n)
        X = (np.eye(4, 16)[y] * 3 + spread * rng.standard_normal((4 * n, 16))).astype(np.float32)
        return Rows(X, y, np.array([f"{prefix}{i}" for i in range(4 * n)]))

    train, test = blobs(20, "t", spread=1.2), blobs(5, "x", spread=1.2)
    val = blobs(CV_BELOW, "v", spread=0.05)  # far apart: every method scores 100%
    data = HeadData(train=train, val=val, val_fit=val, test=test)
    job = HeadJob(backbone="b", fs=None, seed=0, n_boot=0, class_names=tuple("abcd"), manifest_hash="h")
    search = HeadSearch(backbone="b", data={"clean": data}, jobs={"clean": job})
    assert cv_folds(search) == 0  # 10 val images per class: choose on val
    base = {"feature_set": "clean", "norm": "standard", "power": 1.0}
    trials = [SimpleNamespace(number=0, val=1.0, seconds=0.01, params={**base, "method": "knn", "knn_k": 1,
                                                                      "knn_metric": "euclidean",
                                                                      "knn_weights": "uniform"}),
              SimpleNamespace(number=1, val=1.0, seconds=5.0, params={**base, "method": "lr", "lr_C": 1.0}),
              SimpleNamespace(number=2, val=1.0, seconds=3.0, params={**base, "method": "lr", "lr_C": 1e-5})]
    index, metric, cv = _choose(search, trials, solver={"max_iter": 300, "tol": 1e-4}, folds=0)
    assert "val saturated" in metric and set(cv) == {0, 1, 2}
    assert trials[index].number == max(cv, key=lambda n: (cv[n], -n))  # a cross-validated tie: the earlier
    assert cv[0] < cv[1]  # 1-NN on noisy train rows generalises worse than a fitted LR: the cheapest does not win
    small = HeadSearch(backbone="b", data={"clean": HeadData(train=train, val=val.take(np.arange(0, 40, 5)),
                                                             val_fit=val.take(np.arange(0, 40, 5)), test=test)},
                       jobs={"clean": job})
    assert cv_folds(small) == 5
