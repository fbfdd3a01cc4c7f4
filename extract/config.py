"""Schema of the ``[extract]`` config section (see study/schema.py)."""
from dataset.transforms import POLICIES, TTA_VIEWS
from study.schema import Field, int_range, is_bool, is_str, list_of, one_of, str_map

SCHEMA = {
    "backbones": Field(["efficientnet_lite0"], list_of(is_str, min_len=1)),
    "weights": Field({}, str_map()),
    "views": Field(2, int_range(0, 64)),
    "policy": Field("light", one_of(*POLICIES)),
    # Test-time augmentation: "hflip" also embeds every image mirrored; heads score the mean of the
    # two embeddings and fine-tuning averages the two predictions. On Lite0 / Caltech 101 it raised
    # LR test mean per-class accuracy by 0.3-0.5 pts at every C (benchmarks/heads.py), for one more
    # forward pass per image.
    "tta": Field("hflip", one_of(*TTA_VIEWS)),
    "batch_size": Field(64, int_range(1, 4096)),
    "num_workers": Field(2, int_range(0, 64)),
    "precision": Field("auto", one_of("auto", "fp32", "bf16", "fp16")),
    "storage_dtype": Field("float32", one_of("float32", "float16")),
    "channels_last": Field(True, is_bool),
}
