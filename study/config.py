"""Config files as data: where the shipped configs are, ``extends``, ``--set key=value`` overrides, and writing a
resolved config.

A config file may start from another: ``extends = "default"`` (or another shipped config's name, e.g. "quick", or a
path relative to the file) reads that config first and lays this file over it: tables merge key by key, any other
value (a list, ``[[data.sources]]`` included) replaces the base's. Keys no file sets take the schema's built-in
defaults (``run_study.py --show-config`` prints every key, its value, where it came from and what it means).

The study's whole schema is assembled by the top (``pipeline/config.py``), which owns every stage's section;
this module holds only what every package may use without knowing the stages.
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from study.schema import ConfigError, plain

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.toml"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=VALUE`` -> (['a','b','c'], value); VALUE is read as a TOML value, else as a bare string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set classify.heads=[\"lr\"]")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key {key!r} is not a dotted config key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = config
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: '{part}' is not a table")
        node[path[-1]] = value
    return config


EXTENDS = "extends"


def _read_toml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; the shipped ones are in {REPO_ROOT / 'configs'}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc


def _base_path(value: Any, *, path: Path) -> Path:
    """The file ``extends = value`` in ``path`` names: a shipped config's name, or a path relative to ``path``."""
    shipped = sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.toml"))
    if not isinstance(value, str) or not value:
        raise ConfigError(f"config key 'extends' in {str(path)!r} has value {value!r}; allowed: a shipped config's "
                          f"name ({', '.join(shipped)}) or the path of a TOML file")
    if value in shipped:
        return REPO_ROOT / "configs" / f"{value}.toml"
    base = (path.parent / value).resolve()
    if not base.is_file():
        raise ConfigError(f"config key 'extends' in {str(path)!r} has value {value!r}; allowed: a shipped config's "
                          f"name ({', '.join(shipped)}) or the path of a TOML file ({base} does not exist)")
    return base


def config_layers(path: str | Path | None) -> list[tuple[str, dict]]:
    """The files a config is made of, the base first: (path, its table without ``extends``) each."""
    layers, seen = [], []
    current = (Path(path) if path else DEFAULT_CONFIG).resolve()
    while True:
        if current in seen:
            raise ConfigError(f"config key 'extends' makes a cycle: {' -> '.join(map(str, [*seen, current]))}")
        seen.append(current)
        table = _read_toml(current)
        base = table.pop(EXTENDS, None)
        layers.insert(0, (str(current), table))
        if base is None:
            return layers
        current = _base_path(base, path=current)


def merge(base: dict, over: dict) -> dict:
    """``over`` laid over ``base``: tables merge key by key, anything else in ``over`` replaces the base's value."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config_file(path: str | Path | None) -> dict:
    """The table of ``path`` (the default config when None) over the configs it extends; a missing or invalid file
    is a ConfigError."""
    table: dict = {}
    for _, layer in config_layers(path):
        table = merge(table, layer)
    return table


def dump_config(config: dict) -> str:
    return tomli_w.dumps(plain(config))
