#!/usr/bin/env python
"""Run the transfer-learning study: frozen features + classical heads vs partial fine-tuning.

    python run_study.py                                   # the default study (configs/default.toml)
    python run_study.py --config configs/quick.toml --out out/quick
    python run_study.py --stages dataset --set data.split.train_per_class=20
    python run_study.py --config mine.toml --show-config   # every key: value, meaning, where it came from
    python run_study.py --config mine.toml --plan          # what it would compute, and how long
    python run_study.py --config mine.toml --worker        # help the run going on this --out: take its trials

Each stage lives in its package (``<stage>/stage.py`` exposes ``run(ctx)``); this file only parses,
loads and validates the config, makes the run folder, records provenance and calls the stages.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pipeline.config import STAGES, check_before_work, load_config, show_config
from study import console, distributed
from study.atomic import file_lock, write_text_atomic
from study.config import DEFAULT_CONFIG, REPO_ROOT, dump_config
from study.context import StudyContext, resolve_device
from study.errors import StudyError, WriteFailed, is_write_fault
from study.provenance import ResourceMonitor, end_provenance, start_provenance, utc_now
from study.schema import Section

# Under torchrun these run on rank 0 while the other ranks wait; extract and finetune shard across ranks.
MAIN_RANK_STAGES = {"dataset", "classify", "report"}
STAGE_MODULES = {"dataset": "dataset.stage", "extract": "extract.stage", "classify": "classify.stage",
                 "finetune": "finetune.stage", "report": "reports.stage"}
log = logging.getLogger("study")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="study config (TOML); default: %(default)s")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set extract.views=4 (repeatable)")
    p.add_argument("--stages", default=None,
                   help=f"comma-separated subset of {','.join(STAGES)} (default: the config's stages)")
    p.add_argument("--data-root", default=str(REPO_ROOT.parent / "shared" / "datasets"),
                   help="folder holding the image sources; default: %(default)s")
    p.add_argument("--out", default=str(REPO_ROOT / "out"), help="artefacts and runs go here; default: %(default)s")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda", "mps"], help="overrides config 'device'")
    p.add_argument("--rebuild-cache", action="store_true",
                   help="recompute every store entry this run reads (once per run) and refit what read it")
    p.add_argument("--plan", action="store_true",
                   help="build (or reuse) the dataset, print what the study would compute and how long, then exit "
                   "(no run folder)")
    p.add_argument("--worker", action="store_true",
                   help="help the study another process runs on this --out (and its tune.storage): run the same "
                   "stages but the report, taking trials from each fine-tune search's shared budget (a head "
                   "search, short, is run whole by the process that starts it, the other reuses it); the "
                   "leading run reports")
    p.add_argument("--show-config", action="store_true",
                   help="print the resolved config (every key: value, meaning, where it came from), then exit")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only: no progress bars or INFO "
                   "lines (the run's log.txt still has them)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def overrides_of(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if args.stages:
        overrides.append("stages=[" + ",".join(f'"{s.strip()}"' for s in args.stages.split(",")) + "]")
    if args.device:
        overrides.append(f'device="{args.device}"')
    return overrides


def resolve(args: argparse.Namespace) -> dict:
    return load_config(args.config, overrides=overrides_of(args))


def make_run_dir(out: Path, name: str) -> Path:
    """A new folder ``runs/<UTC time>-<name>[-n]``; ``mkdir`` without ``exist_ok`` is atomic, so two runs started
    in the same second (two processes on one ``--out``) never share one."""
    stamp = utc_now().replace(":", "").replace("-", "")
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
        for n in range(1, 10_000):
            run_dir = out / "runs" / (f"{stamp}-{name}" if n == 1 else f"{stamp}-{name}-{n}")
            try:
                run_dir.mkdir()
                return run_dir
            except FileExistsError:  # another run started within this second: take the next name
                continue
    except OSError as exc:
        if is_write_fault(exc):
            raise WriteFailed(exc.filename or out / "runs", exc) from exc
        raise
    raise StudyError(f"{out / 'runs'} already holds 9999 runs named {stamp}-{name}*; pass another --out")


@contextlib.contextmanager
def stage_lock(ctx: StudyContext, stage: str):
    """The dataset stage rewrites files under ``<out>/dataset/`` that every study on this ``--out`` reads: one
    study at a time builds it, a second waits and then reuses the finished build. (The store and the heads
    lock or write atomically themselves.)"""
    if stage != "dataset":
        yield
        return
    with file_lock(Path(ctx.out_dir) / "dataset" / ".lock", what="building the dataset"):
        yield


def _run_stage(ctx: StudyContext, stage: str, *, monitor: ResourceMonitor) -> None:
    t0 = time.perf_counter()
    if distributed.is_main() or stage not in MAIN_RANK_STAGES:
        log.info("stage %s (split seed %d) ...", stage, ctx.seed)
        with stage_lock(ctx, stage), monitor.stage(stage):
            importlib.import_module(STAGE_MODULES[stage]).run(ctx)
        log.info("stage %s done in %.1fs", stage, time.perf_counter() - t0)
    distributed.barrier()


def _log_plan(seeds: list[StudyContext], *, show: bool) -> None:
    """Log (or, with --plan, print) what the study is about to compute, before it computes anything."""
    from pipeline.plan import make_plan

    if not distributed.is_main() or not all(c.manifest_path.is_file() for c in seeds):
        return
    for line in make_plan(seeds, calibrate=show).lines():
        print(line) if show else log.info(line)


def _configure(args: argparse.Namespace) -> tuple[dict, str, Path, Path]:
    """The validated config, device, data root and --out; everything checked before any stage or run folder."""
    data_root, out = Path(args.data_root).resolve(), Path(args.out).resolve()
    config = resolve(args)
    if args.worker:  # a worker's trials and fits are the leader's (one storage, one --out): the leader reports
        stages = [s for s in config["stages"] if s != "report"]
        if not {"extract", "classify", "finetune"} & set(stages):
            raise StudyError(f"--worker with stages {config['stages']} leaves nothing to help with; a worker runs "
                             "extract, classify or finetune (the leading run reports)")
        config = Section({**config, "stages": stages})
    device = resolve_device(config["device"])
    check_before_work(config, data_root=data_root, out=out)
    return config, device, data_root, out


class DatasetFault(StudyError):
    """The dataset stage refused the data (too few images, ...): the run ends before any other work."""


def _run_stages(ctx: StudyContext, *, plan_only: bool, monitor: ResourceMonitor) -> str:
    """Every stage but the report once per split seed (the store is shared, so a later seed computes only the
    views no earlier one did), then the report over all seeds' rows; the datasets come first, so that the plan
    covers every seed's images. Returns the run's status."""
    seeds = ctx.for_seeds()
    stages = [s for s in ctx.config["stages"] if s != "report"]
    if "dataset" in stages:
        for seed_ctx in seeds:
            try:
                _run_stage(seed_ctx, "dataset", monitor=monitor)
            except StudyError as exc:
                raise DatasetFault(str(exc)) from exc
    if plan_only or {"extract", "finetune"} & set(stages):
        _log_plan(seeds, show=plan_only)
        if plan_only:
            return "planned"
    splits = {seed_ctx.seed: _splits_of(seed_ctx) for seed_ctx in seeds}
    for seed_ctx in seeds:
        for stage in stages:
            if stage != "dataset":
                _check_splits(seed_ctx, splits[seed_ctx.seed])
                _run_stage(seed_ctx, stage, monitor=monitor)
    if "report" in ctx.config["stages"]:  # the dataset summary shown is the first seed's (same images)
        for seed_ctx in seeds:
            _check_splits(seed_ctx, splits[seed_ctx.seed])
        _run_stage(seeds[0], "report", monitor=monitor)
    return "ok"


def _splits_of(ctx: StudyContext) -> tuple | None:
    """A split seed's manifest as this run's stages read it: (the file's identity, the hash of its images, labels
    and splits); None where there is none."""
    from dataset.manifest import manifest_hash, read_manifest

    path = ctx.manifest_path
    return (_file_identity(path), manifest_hash(read_manifest(path))) if path.is_file() else None


def _file_identity(path: Path) -> tuple:
    st = path.stat()  # a rebuild writes a new file (atomic rename): another inode, times and maybe size
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _check_splits(ctx: StudyContext, expected: tuple | None) -> None:
    """Refuse to go on when another run on this --out rebuilt the manifest since this run's dataset stage: the
    later stages would read other splits than the earlier ones (one arm's test images the other's train). The
    same file is not read again (before every stage of every seed, that would slow a rerun that has nothing to
    do); a replaced file is compared by content, so a rebuild that wrote the same splits is no change."""
    path = ctx.manifest_path
    if expected is not None and path.is_file() and _file_identity(path) == expected[0]:
        return
    now = _splits_of(ctx)
    if (now and now[1]) != (expected and expected[1]):
        raise StudyError(f"{ctx.manifest_path} changed while this run was going (another run on this --out rebuilt "
                         f"split seed {ctx.seed}'s dataset with other data or split settings), so its later stages "
                         "would read other splits than its earlier ones: give studies with different data or "
                         "splits their own --out, and rerun this one")


def _record_end(run_dir: Path, prov: dict, status: str, *, monitor: ResourceMonitor) -> None:
    try:
        end_provenance(run_dir=run_dir, prov=prov, status=status, monitor=monitor)
        if (run_dir / "report.md").is_file():  # written before the end: now say how the run ended
            importlib.import_module("reports.stage").record_end(run_dir=run_dir)
    except StudyError as exc:  # a full disk: the run's own error (if any) was already printed
        log.warning("could not record the end of the run: %s", exc)


def _start_run(config: dict, out: Path, *, worker: bool = False) -> Path:
    """The run folder (rank 0 makes it and writes the resolved config; every rank gets its path)."""
    name = f"{config['name']}-worker" if worker else config["name"]
    run_dir = make_run_dir(out, name) if distributed.is_main() else None
    if distributed.is_main():
        write_text_atomic(run_dir / "config.resolved.toml", dump_config(config))
    return distributed.broadcast_object(run_dir)  # one run folder, however many ranks


def _error(exc: BaseException) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def _log_config_origin(config_path: str) -> None:
    from study.config import config_layers

    files = [label for label, _ in config_layers(config_path)]
    log.info("config %s%s", files[-1], f" (extends {' <- '.join(reversed(files[:-1]))})" if len(files) > 1 else
             " (keys it does not set take the built-in defaults; --show-config lists every key and its origin)")


def _plan(config: dict, *, device: str, data_root: Path, out: Path, rebuild: bool) -> int:
    """Build (or reuse) the datasets and print the plan; the run folder is a temporary one, removed after."""
    with tempfile.TemporaryDirectory(prefix="study-plan-") as tmp:
        ctx = StudyContext(config=config, data_root=data_root, out_dir=out, run_dir=Path(tmp), device=device,
                           rebuild_cache=rebuild)
        try:
            _run_stages(ctx, plan_only=True, monitor=ResourceMonitor())
        except StudyError as exc:
            return _error(exc)
    return 0


def _study(args: argparse.Namespace, argv: list[str], *, config: dict, device: str, data_root: Path, out: Path,
           run_dir: Path) -> tuple[int, bool]:
    """Run the stages in ``run_dir``: (exit status, whether the run folder should go: the data was refused)."""
    prov = start_provenance(run_dir=run_dir, repo=REPO_ROOT, argv=[sys.argv[0], *argv], device=device,
                            write=distributed.is_main())
    log.info("run %s: git %s%s, device %s, stages %s", run_dir.name, prov["git"]["sha"],
             " (dirty)" if prov["git"]["dirty"] else "", device, ",".join(config["stages"]))
    _log_config_origin(args.config)
    ctx = StudyContext(config=config, data_root=data_root, out_dir=out, run_dir=run_dir, device=device,
                       rebuild_cache=args.rebuild_cache)
    status, refused = "failed", False
    monitor = ResourceMonitor().start()  # peak memory of the process tree, stage seconds: provenance.json
    try:
        status = _run_stages(ctx, plan_only=False, monitor=monitor)
    except DatasetFault as exc:  # nothing was computed: no run folder is left for it
        refused = True
        monitor.stop()
        return _error(exc), refused
    except StudyError as exc:
        return _error(exc), refused
    except OSError as exc:  # a write no stage wrapped (e.g. a results.jsonl append) on a full disk
        if not is_write_fault(exc):
            raise
        return _error(WriteFailed(exc.filename, exc)), refused
    except KeyboardInterrupt:
        status = "interrupted"
        print(f"\ninterrupted; rerun the same command to resume (completed work is cached under {out})",
              file=sys.stderr)
        return 130, refused
    finally:
        if distributed.is_main() and not refused:
            _record_end(run_dir, prov, status, monitor=monitor)
    if distributed.is_main():
        print(f"run folder: {run_dir}")
        if args.worker:
            print("worker: no report here; the leading run on this --out writes it (or rerun without --worker)")
        if (run_dir / "report.md").is_file():
            print(f"report: {run_dir / 'report.md'}")
        if {"classify", "finetune"} & set(config["stages"]) and not args.worker:
            from study.commands import export_command, predict_command

            print(f"use the chosen model: {predict_command(run_dir)}\n           export it: {export_command(run_dir)}")
    return 0, refused


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    console.setup(quiet=args.quiet, verbose=args.verbose)
    try:
        if args.show_config:
            print(show_config(args.config, overrides=overrides_of(args)), end="")
            return 0
        config, device, data_root, out = _configure(args)
    except (StudyError, ValueError) as exc:
        return _error(exc)
    distributed.init_from_env()
    if args.plan:
        return _plan(config, device=device, data_root=data_root, out=out, rebuild=args.rebuild_cache)
    try:
        run_dir = _start_run(config, out, worker=args.worker)
    except StudyError as exc:  # a full disk or a folder turned read-only since the check
        return _error(exc)
    log_file = console.log_to(run_dir) if distributed.is_main() else None
    try:
        rc, refused = _study(args, argv, config=config, device=device, data_root=data_root, out=out,
                             run_dir=run_dir)
    finally:
        console.stop_logging(log_file)
    if refused and distributed.is_main():
        shutil.rmtree(run_dir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
