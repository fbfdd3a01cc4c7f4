"""Schema of the ``[finetune]`` config section (see study/schema.py)."""
from study.schema import Field, int_range, is_str, list_of

SCHEMA = {
    "policies": Field(["head", "last:1", "last:2"], list_of(is_str)),
    "epochs": Field(15, int_range(1)),
}
