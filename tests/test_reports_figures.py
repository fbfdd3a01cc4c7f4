"""The report's figures at the size of a large study: a generated run of 127 classes, 21 backbones (one a fused set)
x 2 arms x 3 split seeds, fine-tunes of three policies with per-epoch curves, tuner trials and few-shot pairs.
Every figure keeps its legends and labels on its canvas, and every class label names a class."""
import itertools

import numpy as np
import pytest

from reports import plots
from reports.stage import build_report, draw_figures
from reports.tables import Tables
from study.metrics import evaluate
from study.results import ResultRow, TrialRow, append_rows, append_trials
from tests.report_checks import assert_on_canvas, assert_pngs_valid, predictions, tick_labels, write_manifest_for

N_CLASSES = 127
CLASSES = [f"class_{i:03d}" for i in range(N_CLASSES - 3)] + [
    "BACKGROUND_Google", "a_rather_long_class_name_for_the_layout", "Faces_easy"]
SOURCES = ["caltech101", "flowers17", "imagenette"]
SEEDS = (0, 1, 2)
BACKBONES = [f"net_{i:02d}" for i in range(20)] + ["fused:net_00+net_01"]
POLICIES = ("ft:head", "ft:last:1", "ft:probe+last:1")


def _images(rng) -> dict:
    """Per class 8..40 images: per split seed 5 val, the rest test, re-split per seed (seeds share images)."""
    out = {"labels": {}, "sources": {}, "val": {s: [] for s in SEEDS}, "test": {s: [] for s in SEEDS}}
    for c in range(N_CLASSES):
        ids = [f"{SOURCES[c % 3]}/{CLASSES[c]}/{j}" for j in range(int(rng.integers(8, 41)))]
        for i in ids:
            out["labels"][i], out["sources"][i] = c, SOURCES[c % 3]
        for s in SEEDS:
            order = np.random.default_rng(100 + s).permutation(len(ids))
            out["val"][s] += [ids[j] for j in order[:5]]
            out["test"][s] += [ids[j] for j in order[5:]]
    return out


def _row(img, rng, *, kind, backbone, method, fset, seed, quality, index_cost, k=None, draw=None) -> dict:
    test, val = img["test"][seed], img["val"][seed]
    y = np.array([img["labels"][i] for i in test])
    pred = predictions(y, {c: int(rng.binomial(40, quality)) for c in range(N_CLASSES)}, rng)
    y_val = np.array([img["labels"][i] for i in val])
    val_pred = predictions(y_val, {c: int(rng.random() < quality * 2) for c in range(N_CLASSES)}, rng)
    val_score = float(np.mean([(val_pred[y_val == c] == c).mean() for c in range(N_CLASSES)]))
    row = {"kind": kind, "backbone": backbone, "method": method, "feature_set": fset, "split_seed": seed,
           "seed": draw if kind == "fewshot" else seed, "k_per_class": k,
           "metrics": evaluate(y, pred, n_classes=N_CLASSES, n_boot=0), "test_sample_id": test,
           "test_pred": pred.tolist(), "hyperparams": {}, "train_s": index_cost, "predict_s": 0.002 * len(test),
           "feature_s": 30.0 if method[:3] != "ft:" else None, "cache_key": "k", "manifest_hash": "h",
           "n_train": 25 * N_CLASSES, "n_test": len(test), "class_names": CLASSES, "fit_on": "train+val",
           "val_mean_per_class": None if kind == "fewshot" else val_score,
           "val_sample_id": [] if kind == "fewshot" else val, "val_pred": [] if kind == "fewshot" else
           val_pred.tolist()}
    if kind == "finetune":
        curve = [{"epoch": e, "train_loss": 2.0 / (e + 1), "val_mean_per_class": val_score - 0.02 * abs(e - 3)}
                 for e in range(6)]
        row["selection"] = {"metric": "val_mean_per_class", "best_epoch": 3, "best_score": val_score,
                            "curve": curve, "stopped_early": False}
    return row


def large_run(seed: int = 0) -> tuple[list[dict], list[TrialRow], dict]:
    rng = np.random.default_rng(seed)
    img = _images(rng)
    raw, trials = [], []
    for b, backbone in enumerate(BACKBONES):
        for arm in ("head", "finetune"):
            quality = rng.uniform(0.04, 0.12)
            for s in SEEDS:
                method = ("ft:ensemble" if backbone.startswith("fused:") else POLICIES[(b + s) % 3]) \
                    if arm == "finetune" else ("lr", "svm", "knn")[(b + s) % 3]
                cost = float(rng.uniform(2, 60) if arm == "head" else rng.uniform(300, 5000))
                raw.append(_row(img, rng, kind=arm, backbone=backbone, method=method,
                                fset="light" if arm == "finetune" else "clean", seed=s, quality=quality,
                                index_cost=cost))
                trials += [TrialRow(arm=arm, backbone=backbone, split_seed=s, number=n, state="COMPLETE", params={},
                                    val_mean_per_class=float(rng.uniform(0.5, 0.95)), seconds=cost / 12, study="x")
                           for n in range(12)]
    for backbone, k, draw in itertools.product(BACKBONES[:3], (1, 5, 10, 20), (0, 1, 2)):
        for arm, method in (("head", "lr"), ("finetune", "ft:last:1")):
            raw.append(_row(img, rng, kind="fewshot", backbone=backbone, method=method, fset="clean", seed=0,
                            quality=0.5 / k, index_cost=1.0, k=k, draw=draw))
    return raw, trials, img


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    raw, trials, img = large_run()
    tables = Tables.from_rows([ResultRow.from_dict(r, index=i) for i, r in enumerate(raw)], labels_by_id=img["labels"],
                              sources_by_id=img["sources"], trials=trials, n_boot=200)
    return tables, raw, trials, img, tmp_path_factory.mktemp("large")


@pytest.mark.slow  # several processes or a large generated run: the full suite runs it
def test_the_generated_run_is_as_large_as_promised(large):
    tables = large[0]
    assert len(tables.variants) == 2 * len(BACKBONES) == 42
    assert len(tables.main) == 126 and len(tables.rows) > 190
    assert len(tables.chosen.class_names) == N_CLASSES


@pytest.mark.slow  # several processes or a large generated run: the full suite runs it
def test_every_figure_keeps_its_labels_and_legends_on_the_canvas(large):
    figures = draw_figures(large[0])
    assert set(figures) == {"accuracy_by_method", "accuracy_vs_cost", "confusion", "per_class", "anytime",
                            "training_curves", "fewshot"}
    try:
        for key, (fig, _) in figures.items():
            assert assert_on_canvas(fig) > 3, key
            if key != "confusion":  # its two panels are titled instead
                assert fig.legends or any(ax.get_legend() for ax in fig.axes), f"{key}: no legend"
    finally:
        for fig, _ in figures.values():
            plots.plt.close(fig)


@pytest.mark.slow  # several processes or a large generated run: the full suite runs it
def test_class_figures_name_the_20_worst_classes_of_both_arms(large):
    tables = large[0]
    figures = draw_figures(tables)
    worst = list(tables.chosen.per_class.class_name.head(20))
    try:
        confusion, _ = figures["confusion"]
        panels = [ax for ax in confusion.axes if ax.get_images()]
        assert len(panels) == 2  # the val-chosen model and the other arm's choice
        for ax in panels:
            labels = tick_labels(ax)
            assert set(labels) <= set(CLASSES), f"not a class: {set(labels) - set(CLASSES)}"
            assert labels == worst[::1] + worst  # x then y: the same classes, worst first
            counts = [t.get_text() for t in ax.texts]
            assert counts and all(c.isdigit() for c in counts)  # every cell states its count
        per_class, _ = figures["per_class"]
        (ax,) = per_class.axes
        assert tick_labels(ax)[-20:] == worst
        assert {t.get_text().split("/")[1] for t in ax.texts} <= {str(n) for n in range(1, 200)}
        assert len(per_class.legends[0].get_texts()) == 2
    finally:
        for fig, _ in figures.values():
            plots.plt.close(fig)


@pytest.mark.slow  # several processes or a large generated run: the full suite runs it
def test_the_val_chosen_variant_is_marked_on_every_figure(large):
    tables = large[0]
    chosen = tables.card.chosen
    figures = draw_figures(tables)
    try:
        texts = {key: " ".join(t.get_text() for t in fig.findobj(plots.matplotlib.text.Text))
                 for key, (fig, _) in figures.items()}
        assert "val-chosen" in texts["accuracy_by_method"] and "(val-chosen)" in texts["accuracy_by_method"]
        assert f"{chosen.backbone}: {plots.ARM_NAMES[chosen.arm]} (val-chosen)" in texts["accuracy_by_method"]
        for key in ("accuracy_vs_cost", "confusion", "per_class", "anytime", "training_curves"):
            assert "val-chosen" in texts[key], key
    finally:
        for fig, _ in figures.values():
            plots.plt.close(fig)


@pytest.mark.slow  # several processes or a large generated run: the full suite runs it
@pytest.mark.parametrize("seed", [0, 1])
def test_cost_figure_names_the_front_and_each_arms_choice_without_overlapping_names(seed):
    raw, trials, img = large_run(seed)
    tables = Tables.from_rows([ResultRow.from_dict(r, index=i) for i, r in enumerate(raw)], labels_by_id=img["labels"],
                              n_boot=100)
    units = tables.variants
    ringed = units[[(b, a) in {u.key for u in tables.arm_choices.values()} for b, a in zip(units.backbone, units.arm)]]
    fig, ax, texts = plots.cost_figure(units, ringed)
    try:
        front = plots.pareto_front(units)
        expected = {plots.unit_label(r) for r in (*front.itertuples(), *ringed.itertuples())}
        names = [t.get_text() for t in texts]
        assert sorted(names) == sorted(expected) and len(names) < len(units) and len(ringed) == 2
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        boxes = [t.get_window_extent(renderer) for t in texts]
        for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
            assert not a.overlaps(b), f"labels {names[i]!r} and {names[j]!r} overlap"
        assert assert_on_canvas(fig) > len(texts)
        assert {lg.get_title().get_text() for lg in fig.legends} == {"arm", "backbone"}
    finally:
        plots.plt.close(fig)


def test_backbones_get_fixed_distinct_markers_and_fused_sets_their_own():
    names = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
             "fused:efficientnet_lite0+efficientnet_lite2"]
    markers = plots.backbone_markers(reversed(names))
    assert len(set(markers.values())) == len(names)
    assert markers[names[3]] in plots.FUSED_MARKERS
    assert not {markers[b] for b in names[:3]} & set(plots.FUSED_MARKERS)
    assert markers == plots.backbone_markers(names)


@pytest.mark.slow  # several processes or a large generated run: the full suite runs it
def test_the_large_run_renders_a_report_with_valid_pngs(large):
    _, raw, trials, img, tmp = large
    run_dir = tmp / "run"
    append_rows(run_dir / "results.jsonl", raw)
    append_trials(run_dir, trials)
    write_manifest_for(tmp / "dataset" / "manifest.csv", img["labels"], CLASSES, sources_by_id=img["sources"])
    build_report(run_dir=run_dir, dataset_dir=tmp / "dataset", title="Large", n_boot=200)
    linked = assert_pngs_valid(run_dir)
    assert {"confusion_best.png", "per_class_best.png", "training_curves.png", "anytime.png",
            "fewshot.png"} <= set(linked)
    md = (run_dir / "report.md").read_text()
    assert md.index("## Decision") < md.index("## Dataset") and "## Limitations" in md
    assert "Near-identical classes" not in md  # Faces_easy without Faces: no known pair is present
