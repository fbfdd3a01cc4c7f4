"""Config files as data: where the shipped configs are, ``--set key=value`` overrides, and writing a resolved config.

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


def read_config_file(path: str | Path | None) -> dict:
    """The TOML table of ``path`` (the default config when None); a missing or invalid file is a ConfigError."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; the shipped ones are in {REPO_ROOT / 'configs'}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc


def dump_config(config: dict) -> str:
    return tomli_w.dumps(plain(config))
