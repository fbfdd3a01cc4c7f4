"""What the report's Limitations section and per-source table read, from the rows and the manifest: fine-tunes whose
kept epoch was their last, val images per class, val saturation, sources the backbones' pre-training set holds,
near-identical classes, and each (backbone, arm)'s test accuracy per source."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from study.protocol import correct
from study.results import ResultRow

# Sources whose images are drawn from the backbones' pre-training set (ImageNet-1k for every registry backbone),
# matched by a source's name: their test images may have been seen in pre-training.
PRETRAINING_OVERLAP = {
    "imagenette": "Imagenette is a 10-class subset of ImageNet, the backbones' pre-training set: its test images may "
                  "be among the images the backbones were trained on, which flatters both arms there",
}
# Class pairs known to be the same photographs (a pair of final class names): their confusions are not the
# model's errors, and pHash (which pairs re-encodes and slight re-crops) does not pair them.
NEAR_IDENTICAL = {
    ("Faces", "Faces_easy"): "Caltech 101's `Faces` and `Faces_easy` are the same photographs at two crops",
}


@dataclass(frozen=True, eq=False)
class Limits:
    last_epoch_peaks: pd.DataFrame   # backbone, method, split_seed, best_epoch, epochs, row
    val_sizes: pd.DataFrame          # split_seed, classes, min, median, max (val images per class)
    saturated: list[str]             # units whose val score is 100%
    overlaps: dict[str, str]         # source -> why its test images may be in the pre-training set
    near_identical: list[str]        # known near-identical class pairs both present among the classes
    per_source: pd.DataFrame         # backbone, arm, chosen, then per source: mean per-class % (mean over seeds)
    sources: list[str]
    source_images: dict[str, int]    # test images per source at the first split seed

    @classmethod
    def of(cls, rows: list[ResultRow], units: list, *, card, labels_by_id: dict[str, int],
           sources_by_id: dict[str, str]) -> Limits:
        sources = sorted(set(sources_by_id.values()))
        classes = {c for r in rows for c in r.class_names}
        first = units[0].first if units else None
        images = {} if first is None else pd.Series(
            [sources_by_id.get(i, "?") for i in first.test_sample_id]).value_counts().to_dict()
        return cls(last_epoch_peaks=last_epoch_peaks(rows), val_sizes=val_sizes(rows, labels_by_id),
                   saturated=[f"{u.backbone} {u.arm}" for u in units if (u.val_score or 0) >= 1.0 - 1e-12],
                   overlaps={s: why for s in sources for key, why in PRETRAINING_OVERLAP.items() if key in s.lower()},
                   near_identical=[why for pair, why in NEAR_IDENTICAL.items() if set(pair) <= classes],
                   per_source=per_source(units, card, labels_by_id=labels_by_id, sources_by_id=sources_by_id),
                   sources=sources,
                   source_images={s: int(images.get(s, 0)) for s in sources})


def last_epoch_peaks(rows: list[ResultRow]) -> pd.DataFrame:
    """Fine-tunes whose kept epoch (best val) was the last their search trained: val was still rising, so more
    epochs might have helped."""
    records = []
    for r in rows:
        if r.kind != "finetune" or r.selection is None or not r.selection.curve or r.selection.best_epoch is None:
            continue
        last = max(int(p["epoch"]) for p in r.selection.curve)
        if int(r.selection.best_epoch) == last:
            records.append({"backbone": r.backbone, "method": r.method, "split_seed": r.split_seed,
                            "best_epoch": int(r.selection.best_epoch), "epochs": len(r.selection.curve),
                            "row": r.index})
    return pd.DataFrame.from_records(records, columns=["backbone", "method", "split_seed", "best_epoch", "epochs",
                                                       "row"])


def val_sizes(rows: list[ResultRow], labels_by_id: dict[str, int]) -> pd.DataFrame:
    """Per split seed: val images per class (fewest, median, most), from the rows' val ids."""
    records = []
    for seed in sorted({r.split_seed for r in rows if r.kind != "fewshot"}):
        ids = {i for r in rows if r.split_seed == seed and r.kind != "fewshot" for i in r.val_sample_id}
        known = [labels_by_id[i] for i in ids if i in labels_by_id]
        if not known:
            continue
        counts = np.bincount(known)
        counts = counts[counts > 0]
        records.append({"split_seed": seed, "images": len(known), "classes": len(counts), "min": int(counts.min()),
                        "median": float(np.median(counts)), "max": int(counts.max())})
    return pd.DataFrame.from_records(records, columns=["split_seed", "images", "classes", "min", "median", "max"])


def per_source(units: list, card, *, labels_by_id: dict[str, int], sources_by_id: dict[str, str]) -> pd.DataFrame:
    """Per unit: its test mean per-class accuracy over each source's test images (the classes present there), mean
    over split seeds: each row's per-image correctness grouped by the manifest's ``source``."""
    sources = sorted(set(sources_by_id.values()))
    chosen = None if card is None else card.chosen.key
    records = []
    for u in units if labels_by_id and sources else []:
        rec = {"backbone": u.backbone, "arm": u.arm, "methods": u.methods(), "chosen": u.key == chosen}
        for source in sources:
            values = []
            for r in u.rows.values():
                ids = [i for i in r.test_sample_id if sources_by_id.get(i) == source]
                if ids:
                    pred = dict(zip(r.test_sample_id, r.test_pred))
                    labels, ok = correct(ids, [pred[i] for i in ids], labels_by_id)
                    values.append(float(np.mean([ok[labels == c].mean() for c in np.unique(labels)])))
            rec[source] = float(np.mean(values)) if values else None
        records.append(rec)
    return pd.DataFrame.from_records(records, columns=["backbone", "arm", "methods", "chosen", *sources])
