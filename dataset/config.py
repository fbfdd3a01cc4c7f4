"""Schema of the ``[data]`` config section (see study/schema.py).

Class names in ``rename`` and ``drop`` are either ``"<source>/<folder>"`` (one source's folder)
or a bare ``"<folder>"`` (that folder in every source). Two folders whose final names are equal
become one class (e.g. Caltech's and Flowers' ``sunflower``).
"""
from study.schema import (
    ConfigError,
    Field,
    float_range,
    int_range,
    is_bool,
    is_str,
    list_of,
    one_of,
    opt_str,
    str_map,
    tables_of,
)

SOURCE = {
    "name": Field(help="a short source name, e.g. 'caltech101'"),
    "kind": Field("folder", one_of("caltech101", "folder"), "folder: one sub-folder per class; caltech101: its layout"),
    "path": Field(help="folder of class sub-folders, relative to --data-root or absolute"),
    "url": Field("", opt_str, "where to download the source when its folder is missing ('' = never)"),
    "sha256": Field("", opt_str, "the download's sha256 (required with url)"),
    "include_background": Field(True, is_bool, "caltech101: keep BACKGROUND_Google as a class"),
    "classes": Field([], list_of(is_str), "only these class folders ([] = all)"),
    "max_per_class": Field(0, int_range(0), "at most this many images per class (0 = all)"),
}

SCHEMA = {
    "sources": Field([], tables_of(SOURCE), "the image sources ([[data.sources]] tables)"),
    "rename": Field({}, str_map(), "class renames, e.g. {\"flowers17/sunflower\" = \"sunflower\"}"),
    "drop": Field([], list_of(is_str), "classes to leave out ('<source>/<folder>' or '<folder>')"),
    # Where a source with a ``url`` is downloaded when its folder is absent ('' = <out>/downloads,
    # beside the dataset folder: the data root may be read-only).
    "download_dir": Field("", opt_str, "where downloads go ('' = <out>/downloads)"),
    "small_class_threshold": Field(100, int_range(0), "the summary flags classes with fewer images"),
    "workers": Field(2, int_range(1, 64), "processes that hash and decode images"),
    "dedup": {
        # Two images are near-copies when their 64-bit perceptual hashes differ in <= near_distance bits
        # AND their 256-bit ones in <= confirm_distance bits (-1: no confirmation). near_distance = -1
        # turns near-duplicate detection off; exact (sha256) copies are always found.
        # Tuned on Caltech 101 (see dataset/dedup.py): 64-bit distances of 2-4 already pair different
        # motorbikes on white backgrounds; the 256-bit confirmation at 16 keeps only true re-crops/re-encodes.
        "near_distance": Field(6, int_range(-1, 64), "near-copies: 64-bit pHash distance <= this (-1: off)"),
        "confirm_distance": Field(16, int_range(-1, 256), "...confirmed by 256-bit pHash <= this (-1: none)"),
        # "drop": keep one copy per group, drop the others before splitting. "same_split": keep every
        # copy but put each group in one split (for a published protocol defined on the raw files).
        # Either way no image and its copy land in two splits.
        "policy": Field("drop", one_of("drop", "same_split"), "drop: keep one copy; same_split: copies share a split"),
    },
    "split": {
        "protocol": Field("per_class", one_of("per_class", "fraction"),
                          "per_class: a fixed count of training images per class; fraction: shares of each class"),
        "train_per_class": Field(30, int_range(1), "per_class: training images per class, val included; the rest "
                                 "is test (a class needs at least this + 1)"),
        "val_per_class": Field(5, int_range(0), "per_class: of those, held out to choose settings on"),
        "train_fraction": Field(0.6, float_range(0.0, 1.0), "fraction: share of each class to train on"),
        "val_fraction": Field(0.1, float_range(0.0, 1.0), "fraction: share held out to choose settings on;"
                              " the rest is test"),
        "too_few": Field("error", one_of("error", "drop"), "a class too small for the split: stop (error) or drop it"),
    },
}


def check_data(data_cfg: dict, *, needs_val: bool) -> None:
    """Checks that span keys of a validated ``[data]`` section: unique source names, a usable split protocol."""
    from dataset.splits import check_split_config

    first_of: dict[str, int] = {}
    for i, src in enumerate(data_cfg["sources"]):
        if src["name"] in first_of:
            raise ConfigError(f"config key 'data.sources[{i}].name' has value {src['name']!r}; allowed: a name no "
                              f"other source has (data.sources[{first_of[src['name']]}] is also named "
                              f"{src['name']!r}): sample ids and class keys are '<source>/<folder>'")
        first_of[src["name"]] = i
    check_split_config(data_cfg["split"], needs_val=needs_val)
