"""Conversion between plain data and a typed Config: coercion of values to the field types,
dotted keys (flatten/apply) with did-you-mean suggestions, and to_dict/from_dict."""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import typing
from collections.abc import Mapping
from typing import Any

import yaml

from swav.config.schema import (
    TOP_LEVEL,
    ALL_KEYS,
    FIELD_TYPES,
    SECTIONS,
    Config,
    ConfigError,
    type_name,
)


class _CoerceError(Exception):
    pass


def _coerce_scalar(value: Any, tp: type) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise _CoerceError
    if tp is int:
        if isinstance(value, bool):
            raise _CoerceError
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    value = float(value.strip())
                except ValueError:
                    raise _CoerceError from None
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise _CoerceError
    if tp is float:
        if isinstance(value, bool):
            raise _CoerceError
        if isinstance(value, str):
            try:
                value = float(value.strip())  # YAML reads "1e-6" as a string
            except ValueError:
                raise _CoerceError from None
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
        raise _CoerceError
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _CoerceError
    raise _CoerceError


def _coerce_dict(value: Any) -> dict:
    """A mapping of names to plain values: a dict, or YAML flow text such as ``{patch_size: 4}``."""
    if isinstance(value, str):
        value = yaml.safe_load(value) if value.strip() else {}
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _CoerceError
    return {k: _plain(v) for k, v in value.items()}


def _plain(value: Any) -> Any:
    """A value YAML and JSON can hold (what a run's config records), else _CoerceError."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _plain(v) for k, v in value.items()}
    raise _CoerceError


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` to the field type ``tp`` or raise a ConfigError naming the key."""
    try:
        origin = typing.get_origin(tp)
        if origin is dict:
            return _coerce_dict(value)
        if origin is list:
            (elem,) = typing.get_args(tp)
            if isinstance(value, str):
                text = value.strip()
                if text.startswith("[") and text.endswith("]"):
                    text = text[1:-1]
                parts = [p.strip() for p in text.split(",")] if text else []
                value = [yaml.safe_load(p) if p else p for p in parts]
            elif not isinstance(value, (list, tuple)):
                value = [value]  # a scalar for a one-element list, e.g. mean=0.5
            return [_coerce_scalar(v, elem) for v in value]
        args = typing.get_args(tp)
        if type(None) in args:  # Optional[X]
            if value is None or (isinstance(value, str)
                                 and value.strip().lower() in ("", "none", "null")):
                return None
            (inner,) = [a for a in args if a is not type(None)]
            return _coerce_scalar(value, inner)
        for member in args:  # a union such as int | str ("auto" or a number): the first that fits
            try:
                return _coerce_scalar(value, member)
            except _CoerceError:
                continue
        return _coerce_scalar(value, tp)
    except (_CoerceError, yaml.YAMLError):
        raise ConfigError(f"{key}: cannot use {reprlib.repr(value)} ({type(value).__name__}); expected "
                          f"{type_name(tp)}") from None


def suggest_key(key: str) -> str:
    close = difflib.get_close_matches(key, ALL_KEYS, n=1, cutoff=0.5)
    if not close and "." in key:  # e.g. 'lrr' in a wrong section: match on the leaf name
        leaf = key.rsplit(".", 1)[1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in ALL_KEYS}
        hit = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        close = [leaves[hit[0]]] if hit else []
    if close:
        return f"unknown key {key!r}; did you mean {close[0]!r}?"
    return f"unknown key {key!r}; valid sections are {', '.join(SECTIONS)} (see config_help())"


def _set(cfg: Config, key: str, value: Any) -> None:
    parent, _, entry = key.rpartition(".")
    if key not in FIELD_TYPES and typing.get_origin(FIELD_TYPES.get(parent)) is dict and entry:
        # one entry of a dict setting: model.kwargs.patch_size=4 (the value read as YAML)
        section, name = parent.split(".", 1)
        try:
            item = _plain(yaml.safe_load(value) if isinstance(value, str) else value)
        except (_CoerceError, yaml.YAMLError):
            raise ConfigError(f"{key}: cannot use {reprlib.repr(value)}; expected a plain value") from None
        getattr(getattr(cfg, section), name)[entry] = item
        return
    if key not in FIELD_TYPES:
        raise ConfigError(suggest_key(key))
    value = _coerce(key, value, FIELD_TYPES[key])
    if "." in key:
        section, name = key.split(".", 1)
        setattr(getattr(cfg, section), name, value)
    else:
        setattr(cfg, key, value)


def flatten(mapping: Mapping[str, Any], label: str = "config") -> dict[str, Any]:
    """Nested ``{section: {key: value}}`` (or dotted keys) -> ``{"section.key": value}``.

    Unknown sections are kept as dotted keys so that the caller reports them with a
    suggestion.  Raises ConfigError when a section is not a mapping.
    """
    flat: dict[str, Any] = {}
    for k, v in mapping.items():
        k = str(k)
        if k in SECTIONS:
            if v is None:
                continue
            if not isinstance(v, Mapping):
                raise ConfigError(f"{label}: section {k!r} must be a mapping of keys to values, "
                                  f"got {type(v).__name__}")
            for sub, val in v.items():
                flat[f"{k}.{sub}"] = val
        elif isinstance(v, Mapping) and "." not in k and k not in TOP_LEVEL:
            for sub, val in v.items():  # unknown section: report each key with a suggestion
                flat[f"{k}.{sub}"] = val
        else:
            flat[k] = v
    return flat


def apply_flat(cfg: Config, flat: Mapping[str, Any]) -> None:
    """Set every dotted key; report all unknown keys and bad values at once."""
    problems = []
    for key, value in flat.items():
        try:
            _set(cfg, key, value)
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as a nested plain dict (YAML/JSON friendly)."""
    return dataclasses.asdict(cfg)


def from_dict(d: Mapping[str, Any]) -> Config:
    """Build a Config from a nested dict.

    Strict: unknown sections or keys and values of the wrong type raise ConfigError.
    Keys that are absent keep the dataclass defaults (so configs saved by older versions load).
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"a config must be a mapping, got {type(d).__name__}")
    cfg = Config()
    apply_flat(cfg, flatten(d))
    return cfg
