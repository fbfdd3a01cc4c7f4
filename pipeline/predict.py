"""Classify images with a variant a study chose, or export it as one file: ``python -m pipeline.predict``.

    python -m pipeline.predict --run out/runs/<run> photos/                  # the run's chosen variant
    python -m pipeline.predict --run out/runs/<run> --variant 12 --topk 3 --format json --output preds.json a.jpg
    python -m pipeline.predict --run out/runs/<run> --export exported/       # model.pt + preprocessing.json
    python -m pipeline.predict --head out/heads/<key> photos/                # a saved head folder itself

Every variant predicts through the module ``--export`` saves (pipeline/variant.py): heads on clean, augmented,
``stages`` or fused features, fine-tunes of any policy, ensembles. Exit status: 0 every image predicted, 1 some
images could not be read (each is named on stderr), 2 a usage or setup error (one ``error:`` line).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.variant import SingleInput, Variant, VariantError, head_variant, load_variant
from study.errors import StudyError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FORMATS = ("csv", "json")
DEVICES = ("auto", "cpu", "cuda", "mps")
EXPORT_FORMAT = 1


class UsageError(Exception):
    """A command line this tool refuses (printed as one ``error:`` line, exit 2)."""


@dataclass(frozen=True)
class Prediction:
    path: Path
    top: list[tuple[str, float]]  # (class, probability), best first


def image_paths(inputs: list[str]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted, recursive)."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif item.is_file():
            paths.append(item)
        else:
            raise UsageError(f"{item} is neither an image file nor a folder")
    if not paths:
        raise UsageError(f"no images found in {inputs} (image files end in {', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def predict(variant: Variant, paths: list[Path], *, device: str = "cpu", topk: int = 1, batch_size: int = 32,
            progress: bool = False) -> tuple[list[Prediction], list[tuple[Path, str]]]:
    """Predictions for the readable images, and (path, reason) for those that could not be read."""
    from tqdm import tqdm

    from dataset.tensors import ImageUnreadable, ImageViews

    # One decode per image, one eval view per input (a fused variant's backbones may preprocess differently).
    inputs = [ImageViews(paths=paths, content_ids=None, views=[[0]] * len(paths), data_config=entry["data_config"],
                         policy="none", seed=0) for entry in variant.inputs]
    module = variant.module.to(device).eval()
    results, failed = [], []
    with tqdm(total=len(paths), unit="img", desc="predict", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            batch, tensors = [], []
            for i in range(start, min(start + batch_size, len(paths))):
                try:
                    img = inputs[0].load(i)
                except ImageUnreadable as exc:
                    failed.append((paths[i], f"{exc.reason}: {exc.__cause__ or exc}"))
                    continue
                tensors.append([views.view(img, i, 0) for views in inputs])
                batch.append(paths[i])
            if batch:
                xs = [torch.stack([t[i] for t in tensors]).to(device) for i in range(len(inputs))]
                with torch.inference_mode():
                    probs = module(xs).float().cpu()
                values, index = probs.topk(topk, dim=1)
                results += [Prediction(path=p, top=[(variant.class_names[int(c)], float(v)) for v, c in zip(vs, cs)])
                            for p, vs, cs in zip(batch, values, index)]
            bar.update(len(paths[start:start + batch_size]))
    return results, failed


# ---------------------------------------------------------------------------------------------- export


def describe(variant: Variant) -> dict:
    """What a prediction or an export names as its model: the run and row, and what the study measured."""
    out = {"describe": variant.describe, "artefacts": variant.artefacts}
    if variant.row is not None:
        r = variant.row
        out.update(run=str(variant.run_dir) if variant.run_dir else None, row=r.index, kind=r.kind,
                   backbone=r.backbone, method=r.method, feature_set=r.feature_set, split_seed=r.split_seed,
                   val_mean_per_class=r.val_mean_per_class, test_mean_per_class=r.metrics.mean_per_class)
    return out


def preprocessing(variant: Variant) -> dict:
    """The JSON written beside an exported model: how to turn an image into each input, and what comes out."""
    inputs = [{"backbones": e["backbones"], "resize_shorter_side": e["data_config"]["resize"],
               "centre_crop": e["data_config"]["crop_size"], "interpolation": e["data_config"]["interpolation"],
               "antialias": e["data_config"]["antialias"], "mean": e["data_config"]["mean"],
               "std": e["data_config"]["std"]} for e in variant.inputs]
    call = "probabilities = model(x)" if len(inputs) == 1 else \
        f"probabilities = model([x0, ..., x{len(inputs) - 1}])  # one tensor per entry of 'inputs', in order"
    return {"format": EXPORT_FORMAT, "model": "model.pt", "load": "model = torch.jit.load('model.pt')", "call": call,
            "input": "per input: RGB image, shorter side resized to resize_shorter_side (interpolation, antialias), "
                     "centre crop of centre_crop pixels, values scaled to [0, 1], normalised by mean and std; "
                     "a float32 tensor (N, 3, centre_crop, centre_crop)",
            "inputs": inputs,
            "output": "(N, classes) " + ("class probabilities" if variant.calibrated else
                                         "softmax of the SVM's decision values: a ranking score, not a probability"),
            "class_names": list(variant.class_names),
            "test_time_augmentation": "the mean over each image and its mirror, inside the model"
            if variant.tta == "hflip" else "none", "variant": describe(variant), "torch": torch.__version__}


def export(variant: Variant, directory: str | Path) -> list[Path]:
    """``directory/model.pt`` (TorchScript: backbone(s) and head in one file), ``preprocessing.json`` beside it."""
    from study.atomic import atomic_path, write_text_atomic

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    module = variant.module.cpu().eval()
    module = SingleInput(module) if len(variant.inputs) == 1 else module
    with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export, and still what loads
        warnings.simplefilter("ignore", FutureWarning)  # anywhere without this project (C++ and Python alike)
        scripted = torch.jit.script(module)
        with atomic_path(directory / "model.pt") as tmp:
            scripted.save(str(tmp))
    write_text_atomic(directory / "preprocessing.json", json.dumps(preprocessing(variant), indent=2))
    return [directory / "model.pt", directory / "preprocessing.json"]


# ---------------------------------------------------------------------------------------------- output


def render(results: list[Prediction], failed: list[tuple[Path, str]], *, fmt: str, topk: int,
           variant: Variant) -> str:
    if fmt == "json":
        return json.dumps({"variant": describe(variant), "calibrated": variant.calibrated,
                           "predictions": [{"path": str(r.path), "top": [{"class": c, "probability": p}
                                                                         for c, p in r.top]} for r in results],
                           "skipped": [{"path": str(p), "reason": why} for p, why in failed]}, indent=2) + "\n"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", *[f"{name}_{k}" for k in range(1, topk + 1) for name in ("class", "probability")]])
    for r in results:
        writer.writerow([str(r.path), *[x for c, p in r.top for x in (c, f"{p:.6f}")]])
    return buf.getvalue()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise UsageError(f"{message} (see python -m pipeline.predict --help)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="python -m pipeline.predict", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run folder (<out>/runs/<run>/)")
    src.add_argument("--head", help="a saved head folder (<out>/heads/<key>/), instead of a run's variant")
    p.add_argument("--variant", default="chosen", help="'chosen' (the report's choice) or a row number of "
                   "results.jsonl; default: %(default)s")
    p.add_argument("--backbone", help="with --head: the backbone to load (its spec must equal the head's)")
    p.add_argument("--weights", action="append", default=[], metavar="BACKBONE=FILE",
                   help="a local weights file for a backbone (default: the run's extract.weights)")
    p.add_argument("--format", default="csv", help=f"{' or '.join(FORMATS)}, with a header; default: %(default)s")
    p.add_argument("--topk", type=int, default=1, help="classes per image, best first; default: %(default)s")
    p.add_argument("--output", help="write the predictions to this file instead of stdout")
    p.add_argument("--export", metavar="DIR", help="write the variant as DIR/model.pt (TorchScript) and "
                   "DIR/preprocessing.json; images are optional then")
    p.add_argument("--device", default="cpu", help=f"one of {', '.join(DEVICES)}; default: %(default)s")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quiet", action="store_true", help="no progress bar or notes on stderr")
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_FOLDER")
    args = p.parse_args(argv)
    if args.format not in FORMATS:
        raise UsageError(f"--format {args.format!r}; allowed: {', '.join(FORMATS)}")
    if args.device not in DEVICES:
        raise UsageError(f"--device {args.device!r}; allowed: {', '.join(DEVICES)}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}; allowed: 1 or more")
    if args.backbone and not args.head:
        raise UsageError("--backbone goes with --head; a run's variant loads the backbones its rows name")
    if not args.inputs and not args.export:
        raise UsageError("give images or folders to classify, or --export DIR")
    if any("=" not in w for w in args.weights):
        raise UsageError(f"--weights {args.weights}; allowed: BACKBONE=FILE")
    return args


def _variant(args) -> Variant:
    weights = dict(w.split("=", 1) for w in args.weights)
    if args.head:
        return head_variant(args.head, weights=weights, backbone=args.backbone)
    return load_variant(args.run, variant=args.variant, weights=weights)


def _run(args) -> int:
    from study.context import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    paths = image_paths(args.inputs) if args.inputs else []
    variant = _variant(args)
    if not 1 <= args.topk <= len(variant.class_names):
        raise UsageError(f"--topk {args.topk}; allowed: 1..{len(variant.class_names)} (the variant's classes)")
    if args.export:
        written = export(variant, args.export)
        if not args.quiet:
            print(f"exported {variant.describe}: {', '.join(map(str, written))}", file=sys.stderr)
    if not paths:
        return 0
    results, failed = predict(variant, paths, device=device, topk=args.topk, batch_size=args.batch_size,
                              progress=not args.quiet)
    text = render(results, failed, fmt=args.format, topk=args.topk, variant=variant)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    for path, reason in failed:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if not variant.calibrated and not args.quiet:
        print("note: an SVM head: the probabilities are a softmax of its decision values (a ranking score)",
              file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(parse_args(sys.argv[1:] if argv is None else argv))
    except (UsageError, VariantError, StudyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
