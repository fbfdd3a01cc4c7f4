"""Schema of the ``[classify]`` config section (see study/schema.py).

Which heads and feature sets the head arm's tuner chooses among (``heads``, ``feature_sets``: categorical axes
of its search space; each method's own settings are the axes of ``[tune.head]``, study/tune.py), the fused
feature sets, how the heads are scored and fitted, and the few-shot curve.
"""
from study.schema import Field, float_range, int_range, is_str, list_of, one_of

SCHEMA = {
    "heads": Field(["lr", "svm", "knn"], list_of(one_of("lr", "svm", "knn"), min_len=1),
                   "the head methods the tuner chooses among"),
    # "stages": pooled pre-logits beside the spatial mean of the last stage's input (classify/stacked.py).
    "feature_sets": Field(["clean", "aug"], list_of(one_of("clean", "aug", "stages"), min_len=1),
                          "the feature sets the tuner chooses among"),
    # Fused feature sets: each entry names backbones (of extract.backbones) whose pooled features are
    # concatenated into one more backbone, "fused:a+b", with a head search of its own.
    "fusions": Field([], list_of(list_of(is_str, min_len=2)),
                     "e.g. [[\"efficientnet_lite0\", \"efficientnet_lite2\"]]"),
    "bootstrap": Field(1000, int_range(0), "bootstrap resamples for test confidence intervals"),
    # OpenBLAS threads while fitting heads (0 = the library default). On the shared 2-core box one
    # thread fits a Caltech LR ~20x faster than two (0.6 s vs 13 s): spinning BLAS threads starve.
    "blas_threads": Field(1, int_range(0, 256), "BLAS threads per head fit (0 = the library default)"),
    # Head searches run at once, each in its own process (0 = one per usable CPU core, 1 = in this process). One by
    # default, for memory: the default study's classify stage on split seed 0 peaked at 5.44 GiB (process tree)
    # with a search per core on the 2-core CPU, against 3.4 GiB in this process (docs/benchmarks.md).
    "n_jobs": Field(1, int_range(0, 256), "head searches at once (0 = one per CPU core)"),
    # Logistic regression's solver (lbfgs, multinomial); its C is searched (tune.head.lr_C).
    "lr": {
        "max_iter": Field(300, int_range(10), "logistic regression's solver iterations"),
        "tol": Field(1e-4, float_range(1e-10, 1.0), "logistic regression's solver tolerance"),
    },
}
