"""The study's whole config: every stage's section assembled, validated, and checked across sections.

Each stage package owns its section's schema (``<package>/config.py`` exports ``SCHEMA``); the top assembles
them here, so a stage adds a key in one place. The resolved config (defaults filled in) is what a run writes
next to its results. ``load_config`` also refuses values that are wrong only together (val larger than train,
one source name twice, weights for an unused backbone); ``check_before_work`` adds what needs a look beyond
the file (backbone names, source folders, --out), so ``run_study.py`` refuses all of it before any stage runs
and before a run folder exists.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from study.config import apply_overrides, config_layers, parse_override, read_config_file
from study.results import TEST_BACKBONES
from study.schema import ConfigError, Field, int_range, list_of, one_of, validate

log = logging.getLogger(__name__)

STAGES = ("dataset", "extract", "classify", "finetune", "report")


def study_schema() -> dict:
    # Imported here so that a broken stage schema is reported when a config is loaded, not on import.
    from classify.config import SCHEMA as classify_schema
    from dataset.config import SCHEMA as data_schema
    from extract.config import SCHEMA as extract_schema
    from finetune.config import SCHEMA as finetune_schema
    from reports.config import SCHEMA as report_schema
    from study.protocol import FEWSHOT_SCHEMA as fewshot_schema
    from study.tune import SCHEMA as tune_schema

    return {
        "name": Field("study", _run_name, "a short name used in the run folder (runs/<UTC time>-<name>)"),
        "seed": Field(0, int_range(0, 2**31 - 1), "the split seed when 'seeds' is empty"),
        # Several split seeds: one split per seed over the same images, every head and fine-tune per seed;
        # the report gives mean +- sd over seeds. Empty: just `seed`.
        "seeds": Field([], list_of(int_range(0, 2**31 - 1)),
                       "split seeds: one split of the same images per seed ([] = just 'seed')"),
        # Split seeds for development: search spaces, budgets and defaults are chosen on their val, and benchmarks
        # use them by default; the evaluation seeds above are kept off that loop.
        "dev_seeds": Field([100, 101], list_of(int_range(0, 2**31 - 1)),
                           "split seeds for choosing defaults and spaces (benchmarks), never the report's"),
        "device": Field("auto", one_of("auto", "cpu", "cuda", "mps"), "auto: cuda, then mps, then cpu"),
        "stages": Field(list(STAGES), _stages_check, f"the stages to run, a subset of {list(STAGES)}"),
        "data": data_schema,
        "extract": extract_schema,
        "classify": classify_schema,
        "finetune": finetune_schema,
        "report": report_schema,
        "tune": tune_schema,
        "fewshot": fewshot_schema,
    }


def _run_name(key: str, value: Any) -> str:
    """A name that is one folder-name part: no path separator, not empty, not '.' or '..'."""
    if not isinstance(value, str) or not value.strip() or value in (".", "..") or any(c in value for c in "/\\\0"):
        raise ConfigError(f"config key '{key}' has value {value!r}; allowed: a non-empty name without '/', '\\' "
                          "or NUL (it names the run folder runs/<UTC time>-<name>)")
    return value


def _stages_check(key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not value or any(v not in STAGES for v in value):
        raise ConfigError(f"config key '{key}' has value {value!r}; allowed: a non-empty list drawn from "
                          f"{list(STAGES)}")
    return [s for s in STAGES if s in value]


def load_config(path: str | Path | None = None, *, overrides: list[str] = ()) -> dict:
    config = validate(apply_overrides(read_config_file(path), list(overrides)), study_schema())
    check_config(config)
    return config


def check_config(config: dict) -> None:
    """Checks across keys of a validated config; each error names the key, the value and what is allowed."""
    from dataset.config import check_data

    # Heads and fine-tuning choose their settings on val, so an empty val is refused only when they run.
    check_data(config["data"], needs_val=bool({"classify", "finetune"} & set(config["stages"])))
    _check_seeds(config)
    _check_stages(config["stages"])
    epochs = config["tune"]["finetune"]["epochs"]
    if min(epochs if isinstance(epochs, list) else [epochs["low"]]) < 1:
        raise ConfigError(f"config key 'tune.finetune.epochs' has value {epochs!r}; allowed: whole numbers >= 1")
    backbones = config["extract"]["backbones"]
    # A fusion naming a backbone the run does not extract (say, --set extract.backbones='["efficientnet_lite0"]'
    # against the default fusions) is a recorded skip of the classify stage, not a refusal.
    for i, parts in enumerate(config["classify"]["fusions"]):
        if len(set(parts)) != len(parts):
            raise ConfigError(f"config key 'classify.fusions[{i}]' has value {parts!r}; allowed: two or more "
                              "different backbone names")
    for i, parts in enumerate(config["finetune"]["ensembles"]):
        if len(set(parts)) != len(parts):
            raise ConfigError(f"config key 'finetune.ensembles[{i}]' has value {parts!r}; allowed: two or more "
                              "different backbone names")
        # The report pairs a fused head with the ensemble of the same name: the same backbones, the same order.
        for j, fusion in enumerate(config["classify"]["fusions"]):
            if set(fusion) == set(parts) and fusion != parts:
                raise ConfigError(f"config key 'finetune.ensembles[{i}]' has value {parts!r}; allowed: the order of "
                                  f"classify.fusions[{j}] {fusion!r}, so the report pairs the two in one verdict")
    unknown = [b for b in config["finetune"]["backbones"] if b not in backbones]
    if unknown:
        raise ConfigError(f"config key 'finetune.backbones' has value {config['finetune']['backbones']!r}; allowed: "
                          f"names from extract.backbones {backbones} ({unknown} are not)")
    for name in config["extract"]["weights"]:
        if name not in backbones:
            raise ConfigError(f"config key 'extract.weights.{name}' names a backbone that is not in "
                              f"extract.backbones {backbones}; allowed: one of those; fix the name or add "
                              f"'{name}' to extract.backbones")


def _check_stages(stages: list[str]) -> None:
    # Each run has its own folder, and the classify stage reads the feature sets the extract stage of the same
    # run lists there (a run whose store holds every row computes nothing in it).
    if "classify" in stages and "extract" not in stages:
        raise ConfigError(f"config key 'stages' has value {stages!r}; allowed: 'classify' only with 'extract' (it "
                          "reads the feature sets the extract stage lists in the same run; with every row stored "
                          "the extract stage computes nothing): --stages extract,classify")


def _check_seeds(config: dict) -> None:
    seeds = config["seeds"]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"config key 'seeds' has value {seeds!r}; allowed: distinct split seeds (a repeated seed "
                          "would count its rows twice)")
    both = sorted(set(seeds or [config["seed"]]) & set(config["dev_seeds"]))
    if both:
        raise ConfigError(f"config key 'dev_seeds' has value {config['dev_seeds']!r}; allowed: split seeds that are "
                          f"not evaluation seeds ({both} are in 'seeds'/'seed'): development stays off the splits "
                          "the report scores")


def check_before_work(config: dict, *, data_root: Path, out: Path) -> None:
    """Refuse what the config shows is wrong once backbone names, source folders and ``out`` are looked at."""
    from extract.backbones import backbone_spec  # imports torch: kept out of load_config
    from study.context import check_out_dir

    for i, name in enumerate(config["extract"]["backbones"]):
        try:
            # names (and that a named weights file is allowed): no weights are resolved or read
            backbone_spec(name, pretrained=False, weights_file=config["extract"]["weights"].get(name))
        except ValueError as exc:
            raise ConfigError(f"config key 'extract.backbones[{i}]' has value {name!r}: {exc}") from exc
        if name in TEST_BACKBONES:
            log.warning("extract.backbones[%d] = %r is a random-initialised test network: its rows test the "
                        "pipeline and say nothing about pretrained transfer", i, name)
    if "dataset" in config["stages"]:
        from dataset.build import check_sources

        check_sources(config["data"], data_root=data_root, out_dir=out / "dataset")
    else:
        _check_manifests(config, data_root=data_root, out=out)
    check_out_dir(out)


def _check_manifests(config: dict, *, data_root: Path, out: Path) -> None:
    """With the dataset stage skipped, the stages read the manifests as they are: refuse one older than its images."""
    from extract.stage import check_images_unchanged
    from study.context import StudyContext

    if not {"extract", "classify", "finetune"} & set(config["stages"]):
        return
    ctx = StudyContext(config=config, data_root=data_root, out_dir=out, run_dir=out, device="cpu")
    for seed_ctx in ctx.for_seeds():
        if seed_ctx.manifest_path.is_file():
            check_images_unchanged(seed_ctx.manifest_path, data_root=data_root)


# ---------------------------------------------------------------------------------------------- --show-config


def _origins(path, overrides: list[str]) -> dict[str, str]:
    """Dotted key -> the file (or ``--set``) that set it last; a key no file sets is a built-in default."""
    origins: dict[str, str] = {}

    def walk(table: dict, prefix: str, label: str) -> None:
        for key, value in table.items():
            dotted = f"{prefix}{key}"
            origins[dotted] = label
            if isinstance(value, dict):
                walk(value, f"{dotted}.", label)
    for label, layer in config_layers(path):
        walk(layer, "", _short(label))
    for text in overrides:
        origins[".".join(parse_override(text)[0])] = "--set"
    return origins


def _short(path: str) -> str:
    """A config file's path as a user typed it: relative to the working folder where it is under it."""
    import os

    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _toml(value) -> str:
    import json

    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _table_lines(table: dict, schema: dict, *, prefix: str, origins: dict | None, arrays: dict) -> list[str]:
    """A table's keys (each with its meaning and origin above it), its arrays of tables, then its sub-tables, in
    the order TOML needs."""
    lines, arrays_of_tables, later = [], [], []
    for key, spec in schema.items():
        dotted = f"{prefix}{key}"
        if isinstance(spec, dict):
            later += ["", f"[{dotted}]"] + _table_lines(table[key], spec, prefix=f"{dotted}.", origins=origins,
                                                          arrays=arrays)
        elif dotted in arrays:
            origin = (origins or {}).get(dotted, "built-in default")
            for item in table[key]:
                arrays_of_tables += ["", f"[[{dotted}]]  # [{origin}]"] + _table_lines(
                    item, arrays[dotted], prefix=f"{dotted}.", origins=None, arrays={})
        else:
            where = "" if origins is None else f"  [{origins.get(dotted, 'built-in default')}]"
            lines += [f"# {spec.help or '(no description)'}{where}", f"{key} = {_toml(table[key])}"]
    return lines + arrays_of_tables + later


def show_config(path=None, *, overrides: list[str] = ()) -> str:
    """The resolved config as TOML: every key with its value, its meaning (the schema's help) and where its value
    came from (a config file, one it extends, ``--set``, or the built-in default)."""
    from dataset.config import SOURCE

    config = load_config(path, overrides=overrides)
    head = ["# The resolved config: every key, its value, what it means and [where the value came from].",
            "# A key no file sets takes the built-in default; `extends = \"default\"` in a config starts from",
            "# configs/default.toml instead. This output is itself a valid config file."]
    body = _table_lines(config, study_schema(), prefix="", origins=_origins(path, list(overrides)),
                        arrays={"data.sources": SOURCE})
    return "\n".join(head + body) + "\n"
