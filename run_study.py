#!/usr/bin/env python
"""Run the transfer-learning study: frozen features + classical heads vs partial fine-tuning.

    python run_study.py                                   # the default study (configs/default.toml)
    python run_study.py --config configs/quick.toml --out out/quick
    python run_study.py --stages dataset --set data.split.train_per_class=20

Each stage lives in its package (``<stage>/stage.py`` exposes ``run(ctx)``); this file only parses,
loads and validates the config, makes the run folder, records provenance and calls the stages.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
import time
from pathlib import Path

from pipeline.config import STAGES, check_before_work, load_config
from study import distributed
from study.atomic import file_lock, write_text_atomic
from study.config import DEFAULT_CONFIG, REPO_ROOT, dump_config
from study.context import StudyContext, resolve_device
from study.errors import StudyError, WriteFailed, is_write_fault
from study.provenance import ResourceMonitor, end_provenance, start_provenance, utc_now

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
                   help="build (or reuse) the dataset, print what the study would compute and how long, then exit")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> dict:
    overrides = list(args.overrides)
    if args.stages:
        overrides.append("stages=[" + ",".join(f'"{s.strip()}"' for s in args.stages.split(",")) + "]")
    if args.device:
        overrides.append(f'device="{args.device}"')
    return load_config(args.config, overrides=overrides)


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
    for line in make_plan(seeds).lines():
        print(line) if show else log.info(line)


def _configure(args: argparse.Namespace) -> tuple[dict, str, Path, Path]:
    """The validated config, device, data root and --out; everything checked before any stage or run folder."""
    data_root, out = Path(args.data_root).resolve(), Path(args.out).resolve()
    config = resolve(args)
    device = resolve_device(config["device"])
    check_before_work(config, data_root=data_root, out=out)
    return config, device, data_root, out


def _run_stages(ctx: StudyContext, *, plan_only: bool, monitor: ResourceMonitor) -> str:
    """Every stage but the report once per split seed (the store is shared, so a later seed computes only the
    views no earlier one did), then the report over all seeds' rows; the datasets come first, so that the plan
    covers every seed's images. Returns the run's status."""
    seeds = ctx.for_seeds()
    stages = [s for s in ctx.config["stages"] if s != "report"]
    if "dataset" in stages:
        for seed_ctx in seeds:
            _run_stage(seed_ctx, "dataset", monitor=monitor)
    if plan_only or {"extract", "finetune"} & set(stages):
        _log_plan(seeds, show=plan_only)
        if plan_only:
            return "planned"
    for seed_ctx in seeds:
        for stage in stages:
            if stage != "dataset":
                _run_stage(seed_ctx, stage, monitor=monitor)
    if "report" in ctx.config["stages"]:  # the dataset summary shown is the first seed's (same images)
        _run_stage(seeds[0], "report", monitor=monitor)
    return "ok"


def _record_end(run_dir: Path, prov: dict, status: str, *, monitor: ResourceMonitor) -> None:
    try:
        end_provenance(run_dir=run_dir, prov=prov, status=status, monitor=monitor)
        if (run_dir / "report.md").is_file():  # written before the end: now say how the run ended
            importlib.import_module("reports.stage").record_end(run_dir=run_dir)
    except StudyError as exc:  # a full disk: the run's own error (if any) was already printed
        log.warning("could not record the end of the run: %s", exc)


def _start_run(config: dict, out: Path) -> Path:
    """The run folder (rank 0 makes it and writes the resolved config; every rank gets its path)."""
    run_dir = make_run_dir(out, config["name"]) if distributed.is_main() else None
    if distributed.is_main():
        write_text_atomic(run_dir / "config.resolved.toml", dump_config(config))
    return distributed.broadcast_object(run_dir)  # one run folder, however many ranks


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        config, device, data_root, out = _configure(args)
    except (StudyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    distributed.init_from_env()
    try:
        run_dir = _start_run(config, out)
    except StudyError as exc:  # a full disk or a folder turned read-only since the check
        print(f"error: {exc}", file=sys.stderr)
        return 2
    prov = start_provenance(run_dir=run_dir, repo=REPO_ROOT, argv=[sys.argv[0], *argv], device=device,
                            write=distributed.is_main())
    log.info("run %s: git %s%s, device %s, stages %s", run_dir.name, prov["git"]["sha"],
             " (dirty)" if prov["git"]["dirty"] else "", device, ",".join(config["stages"]))
    ctx = StudyContext(config=config, data_root=data_root, out_dir=out, run_dir=run_dir, device=device,
                       rebuild_cache=args.rebuild_cache)
    status = "failed"
    monitor = ResourceMonitor().start()  # peak memory of the process tree, stage seconds: provenance.json
    try:
        status = _run_stages(ctx, plan_only=args.plan, monitor=monitor)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a write no stage wrapped (e.g. a results.jsonl append) on a full disk
        if not is_write_fault(exc):
            raise
        print(f"error: {WriteFailed(exc.filename, exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        status = "interrupted"
        print(f"\ninterrupted; rerun the same command to resume (completed work is cached under {out})",
              file=sys.stderr)
        return 130
    finally:
        if distributed.is_main():
            _record_end(run_dir, prov, status, monitor=monitor)
    if not distributed.is_main() or status == "planned":
        return 0
    report = run_dir / "report.md"
    print(f"run folder: {run_dir}")
    if report.is_file():
        print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
