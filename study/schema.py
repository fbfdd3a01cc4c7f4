"""Declarative config schemas: each stage states its keys, defaults and allowed values as data.

A schema is a dict ``key -> Field`` (or ``key -> dict`` for a nested table). ``validate``
fills defaults, refuses unknown keys and checks every value, and every error names the
dotted key, the bad value and what is allowed — before any work starts.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

from study.errors import StudyError


class ConfigError(StudyError, ValueError):
    """A config key or value that the study cannot accept."""


_REQUIRED = object()


@dataclass(frozen=True)
class Field:
    default: Any = _REQUIRED
    check: Callable[[str, Any], Any] | None = None
    help: str = ""
    # Changes the numbers of what is computed with it: part of the cache key of every artefact that reads it
    # (a key is built from the keyed fields, so a new key that is not keyed changes no key).
    keyed: bool = False


def keyed_fields(schema: dict) -> tuple[str, ...]:
    """The names of ``schema``'s keyed fields, in declaration order."""
    return tuple(k for k, f in schema.items() if isinstance(f, Field) and f.keyed)


class Section(dict):
    """A validated config table: read-only (a stage cannot change what the run recorded), its keys also
    attributes (``config.finetune.epochs``); ``{**section, key: value}`` makes a changed plain copy."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config table has no key {name!r}; it has {sorted(self)}") from None

    def _read_only(self, *args, **kwargs):
        raise TypeError("a validated config table is read-only; make a changed copy with {**table, key: value}")

    __setitem__ = __delitem__ = update = setdefault = pop = popitem = clear = _read_only

    def __reduce__(self):  # pickled (worker processes, torch.distributed) as a plain table, rebuilt read-only
        return Section, (dict(self),)


def plain(value: Any) -> Any:
    """``value`` with every Section (nested) turned back into a plain dict, e.g. to write it as TOML."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config key '{key}' has value {value!r}; allowed: {allowed}")


def one_of(*choices: Any) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        if value not in choices:
            _fail(key, value, "one of " + ", ".join(repr(c) for c in choices))
        return value
    return check


def pattern(description: str, predicate: Callable[[Any], bool]) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        if not predicate(value):
            _fail(key, value, description)
        return value
    return check


def is_bool(key: str, value: Any) -> Any:
    if not isinstance(value, bool):
        _fail(key, value, "true or false")
    return value


def is_str(key: str, value: Any) -> Any:
    if not isinstance(value, str):
        _fail(key, value, "a string")
    return value


def opt_str(key: str, value: Any) -> Any:
    if value != "" and not isinstance(value, str):
        _fail(key, value, "a string ('' for none)")
    return value


def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        ok = isinstance(value, int) and not isinstance(value, bool)
        ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi)
        if not ok:
            _fail(key, value, f"an integer in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]")
        return value
    return check


def float_range(lo: float | None = None, hi: float | None = None) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi)
        if not ok:
            _fail(key, value, f"a number in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]")
        return float(value)
    return check


def list_of(item_check: Callable[[str, Any], Any], *, min_len: int = 0) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        if not isinstance(value, list) or len(value) < min_len:
            _fail(key, value, f"a list with at least {min_len} item(s)")
        return [item_check(f"{key}[{i}]", v) for i, v in enumerate(value)]
    return check


def str_map(value_check: Callable[[str, Any], Any] = is_str) -> Callable[[str, Any], Any]:
    """A free-form table of string keys (e.g. a class rename map)."""
    def check(key: str, value: Any) -> Any:
        if not isinstance(value, dict):
            _fail(key, value, "a table of string keys")
        return {str(k): value_check(f"{key}.{k}", v) for k, v in value.items()}
    return check


def tables_of(schema: dict) -> Callable[[str, Any], Any]:
    """A TOML array of tables, each validated against ``schema``."""
    def check(key: str, value: Any) -> Any:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            _fail(key, value, "an array of tables ([[...]])")
        return [validate(v, schema, prefix=f"{key}[{i}]") for i, v in enumerate(value)]
    return check


def validate(config: dict, schema: dict, *, prefix: str = "") -> Section:
    """Return ``config`` with defaults filled in, as a read-only Section; raise ConfigError naming any bad key or
    value."""
    if not isinstance(config, dict):
        raise ConfigError(f"config key '{prefix}' must be a table, got {config!r}")
    unknown = sorted(set(config) - set(schema))
    if unknown:
        where = f"'{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key '{_join(prefix, unknown[0])}'; allowed keys in {where}: "
            + ", ".join(sorted(schema))
        )
    out = {}
    for key, spec in schema.items():
        dotted = _join(prefix, key)
        if isinstance(spec, dict):
            out[key] = validate(config.get(key, {}), spec, prefix=dotted)
            continue
        if key not in config:
            if spec.default is _REQUIRED:
                raise ConfigError(f"config key '{dotted}' is required" + (f" ({spec.help})" if spec.help else ""))
            out[key] = copy.deepcopy(spec.default)  # never the schema's own list, which a caller could change
            continue
        value = config[key]
        out[key] = spec.check(dotted, value) if spec.check else value
    return Section(out)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key
