#!/usr/bin/env python
"""The linear SVM's test prediction two ways, side by side on a study's stored features: libsvm on a
precomputed test Gram matrix (the former GramSVC path) and the primal one-vs-one weights (GramSVC now).

    python benchmarks/svm_predict.py --out out [--manifest out/dataset/seed-0/manifest.csv]
                                     [--backbone efficientnet_lite0] [--C 0.003]

Reads the backbone's pooled rows from ``<out>/store`` (run the study's extract stage first), fits one
GramSVC (signed square root, StandardScaler, one BLAS thread, clean view + mirror averaged as the heads
read them) on the train rows, then predicts and scores the test rows both ways. Prints the seconds of
each, their ratio and how many test predictions and argmax scores agree.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out"))
    ap.add_argument("--manifest", type=Path, default=None, help="default: <out>/dataset/seed-0/manifest.csv")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--C", type=float, default=0.003)
    args = ap.parse_args()

    from classify.features import head_data
    from classify.heads import GramSVC, blas_threads, make_preprocessor
    from dataset.manifest import read_manifest
    from extract.cache import load_feature_set
    from extract.store import Store

    manifest = read_manifest(args.manifest or args.out / "dataset" / "seed-0" / "manifest.csv")
    entry = next((p for p in sorted((args.out / "store").iterdir()) if p.is_dir() and _is_pooled(p, args.backbone)),
                 None)
    if entry is None:
        raise SystemExit(f"no pooled store entry of {args.backbone} under {args.out / 'store'}: run the extract stage")
    fs = load_feature_set(Store.open(entry), manifest=manifest, views=2, tta="hflip", policy="light", view_seed=0)
    data = head_data(fs, manifest, feature_set="clean")
    with blas_threads(1):
        prep = make_preprocessor({"power": 0.5, "norm": "standard", "pca": 0}, n_rows=len(data.train), seed=0)
        X, X_test = prep.fit_transform(data.train.X), prep.transform(data.test.X)
        t0 = time.perf_counter()
        svm = GramSVC(C=args.C).fit(X, data.train.y)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        gram = svm.svc_.predict(svm._test_gram(X_test)), svm.svc_.decision_function(svm._test_gram(X_test))
        gram_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        primal = svm.predict(X_test), svm.decision_function(X_test)
        primal_s = time.perf_counter() - t0
    n = len(X_test)
    same_pred = int((gram[0] == primal[0]).sum())
    same_top = int((gram[1].argmax(1) == primal[1].argmax(1)).sum())
    print(f"{args.backbone}: {len(X)} train rows, {n} test rows, {len(svm.classes_)} classes, "
          f"{len(svm.support_vectors_)} support vectors, fit {fit_s:.1f} s")
    print(f"predict + decision_function: test Gram + libsvm {gram_s:.2f} s, primal weights {primal_s:.2f} s "
          f"(x{gram_s / primal_s:.1f})")
    print(f"agreement: predictions {same_pred}/{n}, argmax of the scores {same_top}/{n}, "
          f"max |score difference| {np.abs(gram[1] - primal[1]).max():.2e} "
          f"(entries off by > 1e-3: {int((np.abs(gram[1] - primal[1]) > 1e-3).sum())} of {gram[1].size}: a pair's "
          "value next to 0 votes the other way in float32)")


def _is_pooled(entry: Path, backbone: str) -> bool:
    from extract.store import Store

    try:
        spec = Store.open(entry).spec
    except Exception:  # noqa: BLE001 (a foreign or half-written folder is not this backbone's entry)
        return False
    return spec.get("backbone", {}).get("name") == backbone and spec.get("layer", {}).get("kind") == "pooled"


if __name__ == "__main__":
    main()
