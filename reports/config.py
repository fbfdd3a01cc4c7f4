"""Schema of the ``[report]`` config section (see study/schema.py)."""
from study.schema import Field, int_range, is_str

SCHEMA = {
    "title": Field("Frozen features + classical heads vs partial fine-tuning", is_str, "the report's title"),
    "worst_classes": Field(10, int_range(1), "classes listed as the chosen model's worst"),
    # Resamples of every bootstrap the report computes (intervals, paired differences, the decision's val noise).
    "bootstrap": Field(1000, int_range(100, 100000),
                       "resamples of the report's bootstraps (intervals, paired differences, val noise)"),
}
