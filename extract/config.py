"""Schema of the ``[extract]`` config section (see study/schema.py)."""
from dataset.transforms import POLICIES, TTA_VIEWS
from study.schema import Field, int_range, is_bool, is_str, list_of, one_of, pattern, str_map

WORKERS_ALLOWED = "'auto' or an integer 0..64"


def is_workers(value) -> bool:
    """An extract.num_workers setting (the config's and the engine CLI's)."""
    return value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 64)


SCHEMA = {
    "backbones": Field(["efficientnet_lite0"], list_of(is_str, min_len=1), "frozen backbones that embed the images"),
    "weights": Field({}, str_map(), "local weights files, e.g. {resnet50 = \"/path/resnet50.pth\"}"),
    # Augmented views 1..K of each train/val image (the heads' 'aug' feature set and fine-tuning's
    # training views share them; finetune.views = "extract" reads the same K).
    "views": Field(2, int_range(0, 64), "augmented views per train/val image"),
    # Seeds the augmented views per (image content, view): independent of the split seed, so a new
    # split computes views only for the images it newly puts in train/val.
    "view_seed": Field(0, int_range(0), "seeds the augmented views (with each image's content)"),
    "policy": Field("light", one_of(*POLICIES), "augmentation policy of the views"),
    # Test-time augmentation: "hflip" also embeds every image mirrored; heads score the mean of the
    # two embeddings and fine-tuning averages the two predictions, for one more forward pass per image.
    # Not a val-chosen setting: on Lite0 / Caltech 101 the val-chosen LR head's val score was 0.9157 with
    # it and 0.9196 without (benchmarks/heads.py; 5 val images per class, so within val noise). It is
    # the default so that both arms see the same test-time views; "none" saves the extra pass.
    "tta": Field("hflip", one_of(*TTA_VIEWS), "test-time augmentation: hflip averages each image and its mirror"),
    "batch_size": Field(64, int_range(1, 4096), "images per forward"),
    # "auto": one decoding process when the forward runs on the CPU -- it decodes ~300 images/s, several times what a
    # CPU forward takes, and a second one takes a core from the forward's threads (Lite0, 2,048 Caltech images, a
    # 2-core bf16 CPU, benchmarks/extract_throughput.py: the whole pass at 0.70 of the bare forward with 2 workers,
    # 0.91 with 1) -- and up to 8 (a core left to the main process) when a GPU runs it (extract.engine.decode_workers).
    "num_workers": Field("auto", pattern(WORKERS_ALLOWED, is_workers),
                         "image-decoding processes; auto: 1 for a CPU forward, else up to 8"),
    "precision": Field("auto", one_of("auto", "fp32", "bf16", "fp16"), "auto: bf16 where native, else fp32"),
    "storage_dtype": Field("float32", one_of("float32", "float16"), "pooled features in the store"),
    "cut_dtype": Field("float16", one_of("float32", "float16"), "fine-tune cut activations in the store"),
    "channels_last": Field(True, is_bool, "channels-last memory format for the forward"),
}
