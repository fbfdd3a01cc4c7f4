"""Report rendering on generated predictions over the tiny real manifest (the e2e test covers real results)."""
import shutil

import numpy as np
import pytest

from reports.stage import build_report
from reports.stats import mcnemar
from study.metrics import evaluate
from study.results import append_rows, append_skip, read_results
from tests.conftest import make_tiny_manifest
from tests.report_checks import assert_comparison_traces, assert_pngs_valid, table_after

METHODS = [("head", "lr", "clean"), ("head", "lr", "aug"), ("head", "knn", "clean"),
           ("finetune", "ft:head", "light"), ("finetune", "ft:last:1", "light")]


def _row(*, kind, method, feature_set, y, pred, test_ids, k=None, seed=0, n_classes=4, rng):
    scores = rng.random((len(y), n_classes))
    scores[np.arange(len(y)), pred] += 1
    return {"kind": kind, "backbone": "efficientnet_lite0", "method": method, "feature_set": feature_set,
            "seed": seed, "k_per_class": k, "metrics": evaluate(y, pred, scores, n_classes=n_classes, n_boot=100),
            "test_sample_id": test_ids, "test_pred": pred.tolist(), "hyperparams": {"C": 1.0},
            "train_s": float(rng.random() * 50), "predict_s": 0.2, "cache_key": "k", "manifest_hash": "h",
            "n_train": 24, "n_val": 8, "n_test": len(y), "class_names": ["accordion", "anchor", "barrel", "crab"],
            "trainable_params": 5124, **({"tta": "hflip"} if kind == "finetune" else {})}


@pytest.fixture(scope="module")
def built(tmp_path_factory, data_root):
    """A report over generated rows, built once: each test gets a copy (run_dir), which it may change."""
    tmp_path = tmp_path_factory.mktemp("built")
    dataset_dir, run = tmp_path / "dataset", tmp_path / "run"
    run.mkdir()
    df = make_tiny_manifest(dataset_dir / "manifest.csv")
    test = df[df.split == "test"]
    y, ids = test.label.to_numpy(), test.sample_id.tolist()
    rng = np.random.default_rng(0)
    rows = []
    for kind, method, fset in METHODS:
        pred = np.where(rng.random(len(y)) < 0.75, y, rng.integers(0, 4, len(y)))
        rows.append(_row(kind=kind, method=method, feature_set=fset, y=y, pred=pred, test_ids=ids, rng=rng))
    for k in (1, 3):
        for seed in (0, 1):
            for method, fset in (("lr", "clean"), ("ft:last:1", "light")):  # both arms on the same draws
                pred = np.where(rng.random(len(y)) < 0.3 * k, y, rng.integers(0, 4, len(y)))
                rows.append(_row(kind="fewshot", method=method, feature_set=fset, y=y, pred=pred, test_ids=ids,
                                 k=k, seed=seed, rng=rng))
    append_rows(run / "results.jsonl", rows)
    append_skip(run, stage="extract", what="resnet50", reason="weights unavailable", fix="put FILE in DIR")
    build_report(run_dir=run, dataset_dir=dataset_dir, title="Test report")
    return tmp_path


@pytest.fixture
def run_dir(built, tmp_path):
    for name in ("dataset", "run"):
        shutil.copytree(built / name, tmp_path / name)
    return tmp_path / "run"


def test_every_table_number_traces_to_a_results_row(run_dir):
    assert assert_comparison_traces(run_dir) == len(METHODS)


def test_protocol_warns_when_the_arms_used_different_test_time_augmentation(run_dir):
    md = (run_dir / "report.md").read_text()
    assert "heads `none`, fine-tuning `hflip`" in md and "not like for like" in md


def test_figures_are_valid_pngs_and_tables_are_written(run_dir):
    linked = assert_pngs_valid(run_dir)
    assert {"accuracy_by_method.png", "accuracy_vs_cost.png", "confusion_best.png", "per_class_best.png",
            "fewshot.png"} <= set(linked)
    import pandas as pd
    results = pd.read_csv(run_dir / "results.csv")
    assert len(results) == len(METHODS) + 8
    per_class = pd.read_csv(run_dir / "per_class.csv")
    assert len(per_class) == 4 * len(results)


def test_skips_and_augmentation_effect_are_reported(run_dir):
    md = (run_dir / "report.md").read_text()
    skipped = table_after(md, "## Skipped")
    assert skipped == [{"stage": "extract", "what": "resnet50", "reason": "weights unavailable",
                        "fix": "put FILE in DIR"}]
    aug = table_after(md, "### Effect of the feature sets")
    assert [a["head"] for a in aug] == ["lr"]
    # The deltas are the rows' own figures: aug minus clean, on val and on test.
    pick = {r.feature_set: r for r in read_results(run_dir / "results.jsonl") if r.kind == "head" and r.method == "lr"}
    dtest = 100 * (pick["aug"].metrics.mean_per_class - pick["clean"].metrics.mean_per_class)
    assert pick["aug"].val_mean_per_class is None  # these hand-made rows carry no val score: shown as a dash
    assert aug[0]["+ augmented views: Δ val / Δ test pts"] == f"– / {dtest:+.1f}"


def test_mcnemar_counts_discordant_pairs():
    from types import SimpleNamespace as Row  # McNemar reads only these three fields of a ResultRow
    labels = {"a": 0, "b": 1, "c": 2, "d": 0}
    row_a = Row(method="x", test_sample_id=["a", "b", "c", "d"], test_pred=[0, 1, 2, 1])
    row_b = Row(method="y", test_sample_id=["d", "c", "b", "a"], test_pred=[0, 0, 0, 0])
    t = mcnemar(row_a, row_b, labels_by_id=labels)
    assert (t.n_common, t.only_a, t.only_b) == (4, 2, 1)
    assert 0 < t.p_value <= 1
    with pytest.raises(ValueError, match="share no test sample"):
        mcnemar(row_a, Row(method="z", test_sample_id=["q"], test_pred=[0]), labels_by_id=labels)


def test_csv_cells_cannot_run_as_formulas_and_markdown_cells_stay_in_their_table(tmp_path, data_root):
    """A class folder named like a formula, or holding a pipe and a line break: every CSV the report writes holds
    it as text (a leading apostrophe), reading back gives the name, and the markdown tables keep their columns."""
    import pandas as pd

    from study.cells import restore_frame
    dataset_dir, run = tmp_path / "dataset", tmp_path / "run"
    df = make_tiny_manifest(dataset_dir / "manifest.csv")
    test = df[df.split == "test"]
    y, ids = test.label.to_numpy(), test.sample_id.tolist()
    names = ["=HYPERLINK(\"http://x\")", "+1", "a|b\nc", "@SUM(A1)"]
    rng = np.random.default_rng(1)
    rows = [{**_row(kind=kind, method=method, feature_set=fset, y=y, pred=np.where(rng.random(len(y)) < 0.5, y, 0),
                    test_ids=ids, rng=rng), "class_names": names} for kind, method, fset in METHODS]
    append_rows(run / "results.jsonl", rows)
    build_report(run_dir=run, dataset_dir=dataset_dir, title="Injection", n_boot=100)
    per_class = pd.read_csv(run / "per_class.csv", keep_default_na=False)
    assert set(per_class.class_name) == {"'=HYPERLINK(\"http://x\")", "'+1", "a|b\nc", "'@SUM(A1)"}
    assert set(restore_frame(per_class).class_name) == set(names)
    for name in ("results.csv", "summary.csv", "per_class.csv"):
        text = (run / name).read_text()
        assert not any(cell.startswith(("=", "+", "@")) for line in text.splitlines() for cell in line.split(","))
    md = (run / "report.md").read_text()
    worst = table_after(md, "Worst classes")  # every row has as many cells as the header (checked there)
    assert "a\\|b c" in md and "a|b c" in {r["class"] for r in worst}


def test_the_manifest_opens_as_text_and_reads_back_exactly(tmp_path):
    """The dataset stage's manifest is opened by people and read back by the study: a class named like a formula is
    written as text, and reading it gives every cell back exactly (the manifest hash included)."""
    import pandas as pd

    from dataset.manifest import manifest_hash, read_manifest, write_manifest
    names = ["=cmd|' /C calc'!A0", "'quoted", "-minus", "plain", "@at", "+plus"]
    df = pd.DataFrame({"sample_id": [f"src/{n}/1.jpg" for n in names], "path": [f"src/{n}/1.jpg" for n in names],
                       "source": "src", "label": range(len(names)), "class_name": names, "split": "test",
                       "sha256": [str(i) for i in range(len(names))], "width": 1, "height": 1, "mode": "RGB"})
    written = write_manifest(df, tmp_path / "manifest.csv")
    raw = pd.read_csv(tmp_path / "manifest.csv", dtype=str, keep_default_na=False)
    assert [n for n in raw.class_name if n[:1] in "=+-@"] == []  # no cell a spreadsheet would run
    assert list(raw.class_name) == ["'" + n if n != "plain" else n for n in names]
    back = read_manifest(tmp_path / "manifest.csv")
    assert list(back.class_name) == names and manifest_hash(back) == written
    pd.testing.assert_frame_equal(back, df.astype(back.dtypes.to_dict()))


def test_a_rerun_with_the_same_rows_copies_the_figures_and_other_rows_or_damage_redraw_them(run_dir, tmp_path,
                                                                                           monkeypatch, caplog):
    import tempfile

    from reports import plots

    drawn = []
    real_save = plots.save
    monkeypatch.setattr(plots, "save", lambda fig, path: drawn.append(path.name) or real_save(fig, path))
    cache, dataset_dir = tmp_path / "figures", tmp_path / "dataset"

    def rerun(name: str) -> tuple[list[str], dict[str, bytes]]:
        drawn.clear()
        run = tmp_path / name
        shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("*.png", "*.md", "*.csv"))
        build_report(run_dir=run, dataset_dir=dataset_dir, title="Test report", figure_cache=cache)
        assert_pngs_valid(run)
        return list(drawn), {p.name: p.read_bytes() for p in run.glob("*.png")}

    first_drawn, first = rerun("a")
    assert first_drawn and sorted(first_drawn) == sorted(first)
    again_drawn, again = rerun("b")
    assert again_drawn == [] and again == first  # nothing drawn: the same bytes, copied
    assert [(tmp_path / r / "report.md").read_text().count(".png") for r in "ab"] == [len(first)] * 2
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    png = next(entry.glob("*.png"))
    png.write_bytes(png.read_bytes()[:-10])  # a damaged cached figure is never copied
    with caplog.at_level("WARNING"):
        damaged_drawn, damaged = rerun("c")
    assert sorted(damaged_drawn) == sorted(first_drawn) and "unusable" in caplog.text
    assert png.read_bytes() == first[png.name]  # the set was kept again, whole
    (entry / "figures.json").write_text("[]")  # parses, but is no figure list: drawn again, not a crash
    assert sorted(rerun("c2")[0]) == sorted(first_drawn)
    rows = (run_dir / "results.jsonl").read_text().splitlines()
    (run_dir / "results.jsonl").write_text("\n".join(rows[:-1]) + "\n")  # other rows: other figures
    other_drawn, other = rerun("d")
    assert sorted(other_drawn) == sorted(first_drawn)
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tempfile, "mkdtemp", full_disk)
    shutil.rmtree(cache)
    full_drawn, full = rerun("c3")  # a cache that cannot be written costs nothing but the keeping
    assert sorted(full_drawn) == sorted(first_drawn) and full == other and (tmp_path / "c3" / "report.md").is_file()


def test_rows_of_a_random_test_network_are_said_to_say_nothing_about_transfer(run_dir, tmp_path):
    assert "Random networks" not in (run_dir / "report.md").read_text()  # Lite0 rows: nothing to say
    rows = (run_dir / "results.jsonl").read_text().replace('"efficientnet_lite0"',
                                                           '"fused:efficientnet_lite0+test_efficientnet_gn"', 1)
    (run_dir / "results.jsonl").write_text(rows)
    build_report(run_dir=run_dir, dataset_dir=tmp_path / "dataset", title="Test report")
    (line,) = [x for x in (run_dir / "report.md").read_text().splitlines() if "Random networks" in x]
    assert "`test_efficientnet_gn` are random-initialised test networks" in line and "lite0" not in line


def test_prune_keeps_a_figure_set_while_a_run_holds_its_figures(run_dir, tmp_path):
    from pipeline.prune import unused

    out = tmp_path / "out"
    runs = [out / "runs" / name for name in ("a", "b")]
    for run in runs:
        shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("*.png", "*.md", "*.csv"))
        build_report(run_dir=run, dataset_dir=tmp_path / "dataset", title="Test report", figure_cache=out / "figures")
    (figure_set,) = (out / "figures").iterdir()
    left = out / "figures" / ".tmp-killed"
    left.mkdir()  # what a report killed while keeping its set leaves
    assert unused(out) == [left]
    shutil.rmtree(runs[0])
    assert unused(out) == [left]  # run b still holds the set's files
    next(runs[1].glob("*.png")).write_bytes(b"edited")
    assert unused(out) == [left, figure_set]  # no run holds the very files any more
    shutil.rmtree(runs[1])
    assert unused(out) == [left, figure_set]
