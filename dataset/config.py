"""Schema of the ``[data]`` config section (see study/schema.py)."""
from study.schema import Field, int_range, is_bool, is_str, list_of, one_of, opt_str, str_map, tables_of

SOURCE = {
    "name": Field(help="a short source name, e.g. 'caltech101'"),
    "kind": Field("folder", one_of("caltech101", "folder")),
    "path": Field(help="folder of class sub-folders, relative to --data-root or absolute"),
    "url": Field("", opt_str),
    "sha256": Field("", opt_str),
    "include_background": Field(True, is_bool),
    "classes": Field([], list_of(is_str)),
    "max_per_class": Field(0, int_range(0)),
}

SCHEMA = {
    "sources": Field([], tables_of(SOURCE)),
    "rename": Field({}, str_map()),
    "drop": Field([], list_of(is_str)),
    "split": {
        "protocol": Field("per_class", one_of("per_class", "fraction")),
        "train_per_class": Field(30, int_range(1)),
        "val_per_class": Field(5, int_range(0)),
        "too_few": Field("error", one_of("error", "drop")),
    },
}
