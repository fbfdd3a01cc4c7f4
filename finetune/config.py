"""Schema of the ``[finetune]`` config section (see study/schema.py).

What a fine-tune tries is searched by the tuner (``[tune.finetune]``, study/tune.py): the policy among
``policies``, the learning rate, trunk multiplier, weight decay, label smoothing and epochs. The fields here are
the recipe that every trial shares. Fields marked ``keyed`` change a fit's numbers and make its cache key
(``RECIPE_KEYS``, with the searched axes); the others (which backbones, workers, ensembles) do not.
"""
from dataset.transforms import POLICIES, TTA_VIEWS
from study.schema import ConfigError, Field, float_range, int_range, is_bool, is_str, keyed_fields, list_of, one_of
from study.tune import FINETUNE_SPACE


def _unfreeze_policy(key: str, value):
    from extract.blocks import parse_policy

    is_str(key, value)
    try:
        parse_policy(value)
    except ValueError as exc:
        raise ConfigError(f"config key '{key}' has value {value!r}; allowed: 'head', 'last:k' (k >= 1), 'all', "
                          "'probe+last:k'") from exc
    return value


def _views(key: str, value):
    # One views setting for both arms by default: the store computes each view once for heads and fine-tunes.
    if value == "extract" or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 64):
        return value
    raise ConfigError(f"config key '{key}' has value {value!r}; allowed: \"extract\" (the extract.views count) "
                      "or an integer 0..64")


SCHEMA = {
    # The policies the tuner chooses among (a categorical axis of the fine-tune search space).
    "policies": Field(["head", "last:1", "probe+last:1"], list_of(_unfreeze_policy, min_len=1),
                      "unfreeze policies the tuner chooses among: 'head', 'last:k', 'probe+last:k', 'all'"),
    # The backbones to fine-tune, a subset of extract.backbones ([] = all of them): on a CPU, where a
    # fine-tune costs far more than a head, the heads can cover every backbone and fine-tuning fewer.
    "backbones": Field([], list_of(is_str), "backbones to fine-tune ([] = every extract.backbones entry)"),
    # The fine-tune arm's counterpart of classify.fusions (finetune/ensemble.py): per split seed, each listed
    # backbone's val-chosen fine-tune, their softmax outputs averaged, scored and chosen on val like any other.
    "ensembles": Field([], list_of(list_of(is_str, min_len=2)),
                       "ensembles of fine-tunes, e.g. [[\"efficientnet_lite0\", \"efficientnet_lite2\"]]"),
    "optimizer": Field("adamw", one_of("adamw", "sgd"), "the optimiser", keyed=True),
    "momentum": Field(0.9, float_range(0.0, 1.0), "SGD only", keyed=True),
    "warmup_epochs": Field(1, int_range(0), "linear warm-up epochs before the cosine schedule", keyed=True),
    "dropout": Field(0.0, float_range(0.0, 0.99), "dropout before the new linear head", keyed=True),
    "aux_weight": Field(0.4, float_range(0.0, 10.0), "Inception v3 aux-logits loss weight when its trunk trains",
                        keyed=True),
    "batch_size": Field(32, int_range(1, 4096), "images per step", keyed=True),
    "patience": Field(5, int_range(1), "early stopping: epochs without a better val mean per-class accuracy",
                      keyed=True),
    "augment": Field("light", one_of(*POLICIES), "augmentation policy of the training views", keyed=True),
    "views": Field("extract", _views, "augmented views per training image: \"extract\" (extract.views) or 0..64",
                   keyed=True),
    # Val (early stopping) and test average the logits of each image and its mirror, as the heads
    # average the two embeddings with extract.tta = "hflip": keep the two equal for a like-for-like comparison.
    "tta": Field("hflip", one_of(*TTA_VIEWS), "test-time augmentation at val/test ('none' or 'hflip')", keyed=True),
    "prefix_cache": Field(True, is_bool, "false: the naive loop (full forward, fresh augmentation every step)",
                          keyed=True),
    "num_workers": Field(2, int_range(0, 64), "image-decoding processes (naive path)"),
    "precision": Field("auto", one_of("auto", "fp32", "bf16", "fp16"), "auto: bf16 where native, else fp32",
                       keyed=True),
    "n_boot": Field(1000, int_range(0), "bootstrap resamples for test confidence intervals", keyed=True),
}

# The fields that change a fit's numbers (its cache key; a key not declared here changes no key): the recipe
# every trial shares, and the axes the tuner searches (a trial names those it drew: the trunk multiplier only
# for policies that train blocks).
FIXED_KEYS = tuple(k for k in keyed_fields(SCHEMA) if k != "n_boot")
SEARCH_AXES = tuple(FINETUNE_SPACE)
RECIPE_KEYS = (*FIXED_KEYS, *SEARCH_AXES)
# A fine-tune's row also depends on the bootstrap of its test interval.
ROW_KEYS = (*FIXED_KEYS, "n_boot")

