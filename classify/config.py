"""Schema of the ``[classify]`` config section (see study/schema.py)."""
from study.schema import Field, int_range, list_of, one_of

SCHEMA = {
    "heads": Field(["lr", "svm", "knn"], list_of(one_of("lr", "svm", "knn"), min_len=1)),
    "feature_sets": Field(["clean", "aug"], list_of(one_of("clean", "aug"), min_len=1)),
    "bootstrap": Field(1000, int_range(0)),
}
