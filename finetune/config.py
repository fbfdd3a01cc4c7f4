"""Schema of the ``[finetune]`` config section (see study/schema.py)."""
from dataset.transforms import POLICIES, TTA_VIEWS
from study.schema import ConfigError, Field, keyed_fields, float_range, int_range, is_bool, is_str, list_of, one_of


def _unfreeze_policy(key: str, value):
    from extract.blocks import parse_policy

    is_str(key, value)
    try:
        parse_policy(value)
    except ValueError as exc:
        raise ConfigError(f"config key '{key}' has value {value!r}; allowed: 'head', 'last:k' (k >= 1), 'all', "
                          "'probe+last:k'") from exc
    return value


# The hyperparameters a fine-tune's grid may sweep: each axis is a list of values of that [finetune] key.
GRID_AXES = {
    "lr": float_range(1e-7, 10.0),
    "backbone_lr_mult": float_range(0.0, 10.0),
    "weight_decay": float_range(0.0, 1.0),
    "label_smoothing": float_range(0.0, 0.99),
    "dropout": float_range(0.0, 0.99),
}


def _grid(key: str, value):
    """A table of axes (``lr = [...]``, ``backbone_lr_mult = [...]``...); the grid is their cartesian product."""
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{key}' has value {value!r}; allowed: a table of lists, e.g. "
                          "{ lr = [1e-3, 3e-3], backbone_lr_mult = [0.1, 0.3] }")
    out = {}
    for axis, values in value.items():
        if axis not in GRID_AXES:
            raise ConfigError(f"unknown config key '{key}.{axis}'; a fine-tune grid sweeps: {', '.join(GRID_AXES)}")
        out[axis] = list_of(GRID_AXES[axis], min_len=1)(f"{key}.{axis}", values)
        if len(set(out[axis])) != len(out[axis]):
            raise ConfigError(f"config key '{key}.{axis}' has value {values!r}; allowed: distinct values")
    return out


def _views(key: str, value):
    # One views setting for both arms by default: the store computes each view once for heads and fine-tunes.
    if value == "extract" or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 64):
        return value
    raise ConfigError(f"config key '{key}' has value {value!r}; allowed: \"extract\" (the extract.views count) "
                      "or an integer 0..64")


SCHEMA = {
    "policies": Field(["head", "last:1", "last:2"], list_of(_unfreeze_policy, min_len=1),
                      "unfreeze policies: 'head', 'last:k', 'all'"),
    # The backbones to fine-tune, a subset of extract.backbones ([] = all of them): on a CPU, where a
    # fine-tune costs far more than a head, the heads can cover every backbone and fine-tuning fewer.
    "backbones": Field([], list_of(is_str), "backbones to fine-tune ([] = every extract.backbones entry)"),
    # The fine-tune arm's counterpart of classify.fusions (finetune/ensemble.py): per split seed, each listed
    # backbone's val-chosen fine-tune, their softmax outputs averaged, scored and chosen on val like any other.
    "ensembles": Field([], list_of(list_of(is_str, min_len=2)),
                       "ensembles of fine-tunes, e.g. [[\"efficientnet_lite0\", \"efficientnet_lite2\"]]"),
    "epochs": Field(15, int_range(1), keyed=True),
    "optimizer": Field("adamw", one_of("adamw", "sgd"), keyed=True),
    "lr": Field(1e-3, float_range(1e-7, 10.0), "head learning rate (peak, after warm-up); a grid axis overrides it", keyed=True),
    "backbone_lr_mult": Field(0.1, float_range(0.0, 10.0), "unfrozen blocks train at lr * this; a grid axis overrides it", keyed=True),
    # Every grid point trains on train and is scored on val (its best epoch); the best val score is chosen
    # (ties: lower val log-loss, then the earlier point) and refit on train+val for its epoch count.
    # The default is the former single recipe (lr 1e-3, mult 0.1) and one step up on each axis; axes a
    # policy does not use (backbone_lr_mult for 'head') are not swept for it. {} = the one recipe above.
    "grid": Field({"lr": [1e-3, 3e-3], "backbone_lr_mult": [0.1, 0.3]}, _grid,
                  "hyperparameter grid chosen on val: a table of lists over " + ", ".join(GRID_AXES)),
    "weight_decay": Field(0.01, float_range(0.0, 1.0), keyed=True),
    "momentum": Field(0.9, float_range(0.0, 1.0), "SGD only", keyed=True),
    "warmup_epochs": Field(1, int_range(0), keyed=True),
    "label_smoothing": Field(0.1, float_range(0.0, 0.99), keyed=True),
    "dropout": Field(0.0, float_range(0.0, 0.99), "dropout before the new linear head", keyed=True),
    "aux_weight": Field(0.4, float_range(0.0, 10.0), "Inception v3 aux-logits loss weight when its trunk trains", keyed=True),
    "batch_size": Field(32, int_range(1, 4096), keyed=True),
    "patience": Field(5, int_range(1), "early stopping: epochs without a better val mean per-class accuracy", keyed=True),
    "augment": Field("light", one_of(*POLICIES), "augmentation policy of the training views", keyed=True),
    "views": Field("extract", _views, "augmented views per training image: \"extract\" (extract.views) or 0..64", keyed=True),
    # Val (early stopping) and test average the logits of each image and its mirror, as the heads
    # average the two embeddings with extract.tta = "hflip": keep the two equal for a like-for-like comparison.
    "tta": Field("hflip", one_of(*TTA_VIEWS), "test-time augmentation at val/test ('none' or 'hflip')", keyed=True),
    "prefix_cache": Field(True, is_bool, "false: the naive loop (full forward, fresh augmentation every step)", keyed=True),
    "num_workers": Field(2, int_range(0, 64)),
    "precision": Field("auto", one_of("auto", "fp32", "bf16", "fp16"), keyed=True),
    "n_boot": Field(1000, int_range(0), keyed=True),
    # The val-chosen fine-tune retrained on k images per class (k: classify.fewshot.k, drawn from
    # classify.fewshot.pool like the heads' draws, same seeds): draws per split seed; 0 turns it off.
    "fewshot_draws": Field(1, int_range(0, 100), "few-shot draws per k of the val-chosen fine-tune (0: none)"),
}


# The fields that change a fit's numbers (its cache key; a key not declared here changes no key).
RECIPE_KEYS = tuple(k for k in keyed_fields(SCHEMA) if k != "n_boot")
# A fine-tune's row depends on its fits and on the bootstrap of its test interval.
ROW_KEYS = keyed_fields(SCHEMA)
