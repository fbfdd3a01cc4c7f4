"""Faults of issue 24 ("lean and unbreakable"), each tried as a user meets it, on small real data.

The store damaged every way it can detect (a truncated segment, garbage in its data or digest column, a spec.json
that does not hash to its key): one ``error:`` line naming the file and ``--rebuild-cache``, and the rerun with
``--rebuild-cache`` repairs it (the plan names the entry and goes on). Readers wait, and say so, while another
process replaces an entry's files. ``--stages classify`` without extract, and a manifest older than its images,
are one error line before any run folder exists. Garbage in a saved search's files is set aside and the search
done again. A kNN ``k`` larger than the training rows is recorded as used. The run records its peak memory.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import run_study
from extract.read import EntryReader
from extract.store import Store, replacing
from study.provenance import ResourceMonitor, tree_rss_bytes
from study.results import read_rows
from tests.conftest import TEST_BACKBONE
from tests.test_faults_caches import last_run, one_error_line, run_cli, same_numbers
from tests.test_faults_inputs import MINE, tiny_jpeg, user_root

pytestmark = pytest.mark.needs_data

ALL_STAGES = '"dataset", "extract", "classify", "finetune"'
SOURCES = ('[[data.sources]]\nname = "imagenette"\npath = "imagenette"\nclasses = ["golf_ball", "tench"]\n'
           "max_per_class = 6\n")


def lean_config(tmp_path: Path, *, sources: str = SOURCES, stages: str = ALL_STAGES, extra: str = "") -> Path:
    """12 images, an LR head search and a ft:head search of two trials each: seconds a run on a CPU."""
    path = tmp_path / "study.toml"
    path.write_text(f'name = "lean"\nstages = [{stages}]\n[data]\nworkers = 1\n{sources}'
                    '[data.split]\nprotocol = "fraction"\ntrain_fraction = 0.5\nval_fraction = 0.25\n'
                    # the tiny test network: these runs test faults of the store, locks and files, not transfer
                    f'[extract]\nbackbones = ["{TEST_BACKBONE}"]\nviews = 0\ntta = "none"\nprecision = "fp32"\n'
                    'num_workers = 0\nbatch_size = 8\n'
                    '[classify]\nheads = ["lr"]\nfeature_sets = ["clean"]\nbootstrap = 20\n'
                    '[fewshot]\nk = []\n[finetune]\npolicies = ["head"]\nviews = 0\ntta = "none"\n'
                    'batch_size = 8\nnum_workers = 0\nprecision = "fp32"\n'
                    f'{extra}'
                    '[tune]\ntrials = 2\nsampler = "random"\n[tune.head]\nnorm = ["l2"]\n'
                    'lr_C = {low = 0.1, high = 1.0, log = true}\n[tune.finetune]\nepochs = [1]\n')
    return path


@pytest.fixture(scope="module")
def clean(tmp_path_factory, data_root):
    """The run that never failed: its config, --out, rows and the pooled store entry."""
    tmp = tmp_path_factory.mktemp("lean_clean")
    config, out = lean_config(tmp), tmp / "out"
    assert run_study.main(["--config", str(config), "--data-root", str(data_root), "--out", str(out)]) == 0
    run = last_run(out)
    (entry,) = json.loads((run / "features.json").read_text())
    return {"config": config, "out": out, "run": run, "rows": read_rows(run / "results.jsonl"),
            "entry": entry["store"]}


def copy_out(clean: dict, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(clean["out"], out, ignore=shutil.ignore_patterns("runs"))
    return out


def equal_rows(out: Path, clean: dict) -> None:
    rows = read_rows(last_run(out) / "results.jsonl")
    assert [(r["kind"], r["method"]) for r in rows] == [(r["kind"], r["method"]) for r in clean["rows"]]
    assert all(same_numbers(a, b) for a, b in zip(rows, clean["rows"]))


# ====================================================================== 1. memory and time recorded


def test_the_run_records_its_peak_memory_wall_and_stage_seconds_and_load(clean):
    prov = json.loads((clean["run"] / "provenance.json").read_text())
    own = tree_rss_bytes(os.getpid())
    # This process ran the study: its own resident memory now is a floor of the run's peak; 24 GB is the machine.
    assert own <= prov["peak_rss_bytes"] < 24 * 2**30 and prov["peak_rss_sampled"] is True
    assert set(prov["stage_seconds"]) == {"dataset", "extract", "classify", "finetune"}
    assert all(s > 0 for s in prov["stage_seconds"].values())
    assert sum(prov["stage_seconds"].values()) <= prov["wall_s"]
    assert all(isinstance(prov["load_avg"][k], float) for k in ("start", "end"))


@pytest.mark.slow  # several processes or a large generated run: the full suite runs it
def test_the_peak_counts_child_processes(tmp_path):
    """A child holding 300 MB (a DataLoader or joblib worker's share) is in the sampled peak of its parent."""
    code = "import sys, numpy as np\na = np.ones(300 * 2**20 // 8)\nprint('ready', flush=True)\nsys.stdin.read()\n"
    monitor = ResourceMonitor(interval_s=0.05).start()
    before = tree_rss_bytes()
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        record = monitor.stop()
    finally:
        child.communicate("")
    assert record["peak_rss_bytes"] >= before + 300 * 2**20


# ====================================================================== 2. --rebuild-cache repairs every damage


def damage_column(seg: Path, column: str) -> None:
    """Garbage over the first chunk of one column of a segment, in place (its fletcher32 checksum no longer holds)."""
    with h5py.File(seg, "r") as f:
        info = f[column].id.get_chunk_info(0)
    with open(seg, "r+b") as fh:
        fh.seek(info.byte_offset + min(16, info.size // 2))
        fh.write(np.random.default_rng(0).integers(0, 256, 32, dtype=np.uint8).tobytes())


def damage(entry: Path, how: str) -> Path:
    """Damage the entry ``how``; returns the file damaged."""
    seg = max(entry.glob("seg-*.h5"), key=lambda p: p.stat().st_size)
    if how == "truncated segment":
        seg.write_bytes(seg.read_bytes()[: seg.stat().st_size // 2])
    elif how in ("data", "digest"):
        damage_column(seg, how)
    else:  # another precision written into spec.json: valid JSON, not what hashes to the folder's name
        spec = entry / "spec.json"
        spec.write_text(spec.read_text().replace('"fp32"', '"bf16"'))
        return spec
    return seg


@pytest.mark.parametrize("how", ["truncated segment", "data", "digest", "altered spec.json"])
def test_each_store_damage_is_named_and_rebuild_cache_repairs_it(clean, tmp_path, data_root, capsys, how):
    out = copy_out(clean, tmp_path)
    damaged = damage(out / clean["entry"], how)
    err = one_error_line(*run_cli(capsys, clean["config"], out, data_root))
    assert str(damaged) in err and "--rebuild-cache" in err
    rc, err = run_cli(capsys, clean["config"], out, data_root, "--rebuild-cache")
    assert rc == 0, err[-3000:]
    equal_rows(out, clean)
    rc, _ = run_cli(capsys, clean["config"], out, data_root)  # and the repaired store reads without a rebuild
    assert rc == 0


def test_the_plan_names_a_damaged_entry_and_goes_on(clean, tmp_path, data_root, capsys, caplog):
    out = copy_out(clean, tmp_path)
    damage(out / clean["entry"], "digest")
    with caplog.at_level(logging.WARNING):
        rc, _ = run_cli(capsys, clean["config"], out, data_root, "--plan")
    assert rc == 0
    assert any("is damaged" in r.message and Path(clean["entry"]).name[:12] in r.message for r in caplog.records)
    assert "--rebuild-cache" in caplog.text


# ====================================================================== 3. readers never take a replaced file for damage


def entry_rows(clean: dict, tmp_path: Path) -> tuple[Store, list, np.ndarray]:
    entry = tmp_path / "store" / Path(clean["entry"]).name
    shutil.copytree(clean["out"] / clean["entry"], entry)
    store = Store.open(entry)
    keys = sorted(store.index().rows)
    return store, keys, store.read(keys)


def test_a_reader_waits_while_another_process_rebuilds_the_entry_and_says_so(clean, tmp_path, caplog):
    store, keys, rows = entry_rows(clean, tmp_path)
    held, done = threading.Event(), threading.Event()

    def rebuild():  # what --rebuild-cache does: every file removed, the rows written again
        with store.lock(), replacing(store.dir):
            held.set()
            segs = {p: p.read_bytes() for p in store.segments()}
            for p in segs:
                p.unlink()
            time.sleep(1.0)
            for p, data in segs.items():
                p.write_bytes(data)
        done.set()

    thread = threading.Thread(target=rebuild)
    thread.start()
    held.wait()
    with caplog.at_level(logging.WARNING):
        got = EntryReader(Store.open(store.dir)).array(keys)
    thread.join()
    assert done.is_set() and np.array_equal(got, rows)
    assert "another process is rebuilding or pruning the store entry" in caplog.text


def test_a_reader_whose_segments_were_replaced_reads_the_new_ones_when_their_bytes_are_equal(clean, tmp_path):
    store, keys, rows = entry_rows(clean, tmp_path)
    reader = EntryReader(store)
    identity = reader.identity(keys)  # indexed: the old segment files
    half = len(keys) // 2
    for p in store.segments():  # another process rebuilt it in two segments (other files, the same bytes)
        p.unlink()
    store.write_segment(keys[:half], rows[:half], compute_s=1.0)
    store.write_segment(keys[half:], rows[half:], compute_s=1.0)
    assert np.array_equal(reader.array(keys), rows) and reader.identity(keys) == identity


def test_a_reader_waits_for_a_writer_computing_the_rows_it_lacks(clean, tmp_path, caplog):
    store, keys, rows = entry_rows(clean, tmp_path)
    for p in store.segments():
        p.unlink()
    held = threading.Event()

    def write():
        with store.lock():
            held.set()
            time.sleep(1.0)
            store.write_segment(keys, rows, compute_s=1.0)

    thread = threading.Thread(target=write)
    thread.start()
    held.wait()
    with caplog.at_level(logging.WARNING):
        got = EntryReader(store).array(keys)
    thread.join()
    assert np.array_equal(got, rows) and "another process is writing the store entry" in caplog.text


# ====================================================================== 4. one error line, nothing left behind


def test_classify_without_extract_is_one_error_line_before_any_run_folder(clean, tmp_path, data_root, capsys):
    out = copy_out(clean, tmp_path)
    err = one_error_line(*run_cli(capsys, clean["config"], out, data_root, "--stages", "classify"))
    assert "'stages'" in err and "--stages extract,classify" in err
    assert not (out / "runs").exists()


def test_a_manifest_older_than_its_images_is_refused_whichever_stages_run(tmp_path, capsys):
    root = user_root(tmp_path, n=6)
    config = lean_config(tmp_path, sources=MINE, stages='"dataset", "extract", "classify"')
    out = tmp_path / "out"
    rc, err = run_cli(capsys, config, out, root.parent)
    assert rc == 0, err[-3000:]
    runs = sorted((out / "runs").iterdir())
    image = root / "dog" / "2.jpg"
    os.utime(root / "cat" / "1.jpg")  # touched, the same bytes: not a change
    stat = image.stat()
    tiny_jpeg(image, seed=999)  # re-encoded in place, its mtime put back as a copy tool would
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    for stages in ("extract,classify", "extract", "finetune"):
        err = one_error_line(*run_cli(capsys, config, out, root.parent, "--stages", stages))
        assert str(image) in err and "rerun the dataset stage" in err
    assert sorted((out / "runs").iterdir()) == runs  # nothing left behind
    rc, err = run_cli(capsys, config, out, root.parent)  # with the dataset stage: the manifest is rebuilt
    assert rc == 0, err[-3000:]


@pytest.mark.parametrize("what", ["head rows.jsonl", "head trials.json", "finetune trials.json",
                                  "finetune rows.json"])
@pytest.mark.parametrize("garbage", [b"\x00\xff garbage", b'{"valid": "json, wrong shape"}', b"[1, 2]"])
def test_garbage_in_a_saved_search_is_set_aside_and_the_rerun_ends_equal(clean, tmp_path, data_root, capsys, what,
                                                                         garbage, caplog):
    out = copy_out(clean, tmp_path)
    arm, name = what.split()
    (folder,) = [p.parent for p in (out / ("heads" if arm == "head" else "finetune")).glob(f"*/{name}")
                 if (p.parent / "trials.json").is_file()]
    (folder / name).write_bytes(garbage)
    with caplog.at_level(logging.WARNING):
        rc, err = run_cli(capsys, clean["config"], out, data_root)
    assert rc == 0 and "Traceback" not in err, err[-3000:]
    assert str(folder) in caplog.text  # said, not silent
    equal_rows(out, clean)


def test_a_rerun_with_nothing_to_fit_starts_no_worker_pool_and_loads_no_pretrained_model(clean, tmp_path, data_root,
                                                                                          capsys, monkeypatch):
    import classify.stage
    import extract.engine

    out = copy_out(clean, tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("a worker pool or a forward pass on a rerun with nothing to do")

    monkeypatch.setattr(classify.stage, "Parallel", refuse)
    monkeypatch.setattr(extract.engine, "PassRunner", refuse)
    rc, err = run_cli(capsys, clean["config"], out, data_root, "--set", "classify.n_jobs=2")
    assert rc == 0, err[-3000:]
    equal_rows(out, clean)


def test_used_settings_are_what_the_fitted_pipeline_honoured():
    from classify.heads import make_pipeline, used_settings

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(9, 16)), np.arange(9) % 3
    point = {"power": 1.0, "norm": "standard", "pca": 50, "k": 40, "metric": "euclidean", "weights": "uniform"}
    model = make_pipeline("knn", point, seed=0, head_cfg={}, n_rows=len(X)).fit(X, y)
    assert used_settings(point, model) == {**point, "k": 9, "pca": 9}
    small = {**point, "k": 3, "pca": 0}
    assert used_settings(small, make_pipeline("knn", small, seed=0, head_cfg={}, n_rows=9).fit(X, y)) == small


def test_a_knn_k_larger_than_the_training_rows_is_recorded_as_used(clean, tmp_path, data_root, capsys):
    out = copy_out(clean, tmp_path)
    config = lean_config(tmp_path, stages='"extract", "classify"')
    text = config.read_text().replace('heads = ["lr"]', 'heads = ["knn"]').replace(
        'lr_C = {low = 0.1, high = 1.0, log = true}', "knn_k = {low = 20, high = 30}")
    config.write_text(text)
    rc, err = run_cli(capsys, config, out, data_root)
    assert rc == 0, err[-3000:]
    (row,) = read_rows(last_run(out) / "results.jsonl")
    chosen = row["selection"]["points"][row["selection"]["chosen"]]["params"]
    assert chosen["knn_k"] >= 20  # asked for
    assert row["hyperparams"]["k"] == row["n_fit_rows"] < 20  # used: every training row


def test_a_manifest_another_run_rebuilds_mid_run_stops_the_later_stages(tmp_path, capsys, monkeypatch, data_root):
    """Two runs on one --out with other split settings share its dataset folder: when the other rebuilds the
    manifest while this run is between stages, this run stops with one error line instead of training the
    fine-tunes (or writing the report) on other splits than its heads used."""
    import classify.stage
    from dataset.manifest import read_manifest, write_manifest

    config = lean_config(tmp_path)
    out = tmp_path / "out"
    original = classify.stage.run

    def classify_then_resplit(ctx):  # what the other run's dataset stage does meanwhile
        original(ctx)
        df = read_manifest(ctx.manifest_path)
        train, test = df.index[df.split == "train"][0], df.index[df.split == "test"][0]
        df.loc[[train, test], "split"] = ["test", "train"]
        write_manifest(df, ctx.manifest_path)
    monkeypatch.setattr(classify.stage, "run", classify_then_resplit)
    err = one_error_line(*run_cli(capsys, config, out, data_root))
    assert "changed while this run was going" in err and "own --out" in err
    run = next((out / "runs").iterdir())
    assert {r["kind"] for r in map(json.loads, (run / "results.jsonl").read_text().splitlines())} == {"head"}
