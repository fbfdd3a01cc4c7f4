"""Schema of the ``[classify]`` config section (see study/schema.py).

Every head's hyperparameter grid is data here: each list is one axis, and the grid a head sweeps
is their cartesian product (``classify.heads.head_grid``). ``power`` is the signed power applied to
every feature first (1 = unchanged, 0.5 = signed square root; see classify/heads.py). ``norm`` is
the feature normalisation fitted on training rows ("standard" = StandardScaler, "l2" = unit-length
rows, "none"); ``pca`` is the number of PCA components (0 = no PCA). The defaults are the ones ``benchmarks/heads.py``
measured on EfficientNet-Lite0 features of Caltech 101 (see classify/heads.py).
"""
from study.schema import Field, float_range, int_range, is_str, list_of, one_of

NORMS = ("standard", "l2", "none")
# A 1-2-5 log grid of C over five decades. Both normalisations put features on a unit per-coordinate
# scale ("l2" rescales unit rows by sqrt(D)), so one grid serves both; on Caltech the val optimum
# sits at 5e-4..1e-3 (standard) and 0.05..1 (l2), well inside the grid.
LR_C_GRID = [m * 10.0 ** e for e in range(-4, 1) for m in (1, 2, 5)] + [10.0]

_C_LIST = list_of(float_range(1e-8, 1e8), min_len=1)
_NORM_LIST = list_of(one_of(*NORMS), min_len=1)
_PCA_LIST = list_of(int_range(0), min_len=1)
_POWER_LIST = list_of(float_range(0.01, 1.0), min_len=1)

SCHEMA = {
    "heads": Field(["lr", "svm", "knn"], list_of(one_of("lr", "svm", "knn"), min_len=1)),
    # "stages": pooled pre-logits beside the spatial mean of the last stage's input (classify/stages.py).
    "feature_sets": Field(["clean", "aug"], list_of(one_of("clean", "aug", "stages"), min_len=1)),
    # Fused feature sets: each entry names backbones (of extract.backbones) whose pooled features are
    # concatenated into one more feature set, "fused:a+b", offered to every head and chosen on val.
    "fusions": Field([], list_of(list_of(is_str, min_len=2)), "e.g. [[\"efficientnet_lite0\", \"efficientnet_lite2\"]]"),
    "bootstrap": Field(1000, int_range(0)),
    # OpenBLAS threads while fitting heads (0 = the library default). On the shared 2-core box one
    # thread fits a Caltech LR ~20x faster than two (0.6 s vs 13 s): spinning BLAS threads starve.
    "blas_threads": Field(1, int_range(0, 256)),
    # Heads fitted at once, each in its own process (0 = one per usable CPU core, 1 = in this process).
    "n_jobs": Field(0, int_range(0, 256)),
    "lr": {
        "C": Field(LR_C_GRID, _C_LIST, "inverse regularisation strengths, swept in ascending order with warm starts"),
        "power": Field([0.5], _POWER_LIST, "signed power per feature, before norm (1 = unchanged)"),
        "norm": Field(["standard", "l2"], _NORM_LIST),
        "pca": Field([0], _PCA_LIST),
        "max_iter": Field(300, int_range(10)),
        # 1e-3 lets a warm start stop at once (the previous C's solution already passes), so C would not move.
        "tol": Field(1e-4, float_range(1e-10, 1.0)),
    },
    "svm": {
        "kernel": Field(["linear"], list_of(one_of("linear", "rbf"), min_len=1)),
        "C": Field([0.0001, 0.0003, 0.001, 0.003, 0.01, 0.1], _C_LIST),
        "power": Field([0.5], _POWER_LIST, "signed power per feature, before norm (1 = unchanged)"),
        "norm": Field(["standard", "l2"], _NORM_LIST),
        "pca": Field([0], _PCA_LIST),
    },
    "knn": {
        "k": Field([1, 3, 5, 10, 20], list_of(int_range(1), min_len=1)),
        "metric": Field(["cosine", "euclidean"], list_of(one_of("cosine", "euclidean"), min_len=1)),
        "weights": Field(["uniform", "distance"], list_of(one_of("uniform", "distance"), min_len=1)),
        "power": Field([0.5], _POWER_LIST, "signed power per feature, before norm (1 = unchanged)"),
        "norm": Field(["standard", "l2"], _NORM_LIST),
        "pca": Field([0], _PCA_LIST),
    },
    "fewshot": {
        "k": Field([1, 5, 10, 20, 30], list_of(int_range(1), min_len=0),
                   "images per class; [] turns the few-shot curve off"),
        "seeds": Field(3, int_range(1, 100), "draws per k (seed, seed+1, ...)"),
        # The few-shot heads reuse the full set's val-chosen hyperparameters, so val is not needed
        # for selection and may join the pool; that makes k = 30 the standard Caltech protocol.
        "pool": Field("train+val", one_of("train", "train+val"), "the labelled images the k per class are drawn from"),
        # Both arms' curves retrain per k and draw; a fine-tune's costs as much as its full refit (its steps
        # are matched), so on a CPU drawing them on the first split seed only is most of a study's saving.
        "split_seeds": Field("all", one_of("all", "first"), "the split seeds that draw few-shot curves (both arms)"),
    },
}
