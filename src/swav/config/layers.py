"""Builds a run's Config in layers: defaults < preset < YAML file < flags < ``--set key=value``."""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Iterable
from typing import Any

import yaml

from swav.config.coerce import apply_flat, suggest_key, flatten
from swav.config.presets import preset_overrides
from swav.config.schema import FIELD_TYPES, Config, ConfigError
from swav.config.yaml_io import read_yaml


def _parse_set(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.epochs=5")
    key, raw = item.split("=", 1)
    key = key.strip()
    parent = key.rpartition(".")[0]
    if key not in FIELD_TYPES and typing.get_origin(FIELD_TYPES.get(parent)) is dict:
        tp = Any  # one entry of a dict setting (model.kwargs.patch_size=4): read as YAML
    elif key not in FIELD_TYPES:
        raise ConfigError(suggest_key(key))
    else:
        tp = FIELD_TYPES[key]
    text = raw.strip()
    if tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                     and str in typing.get_args(tp)):
        # keep strings verbatim (paths such as "~/data" or "cuda:0"), minus surrounding quotes
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1]
        return key, text
    try:
        value = yaml.safe_load(text) if text else text
    except yaml.YAMLError:
        value = text
    return key, value


def make_config(preset: str | None = "fashion-mnist", config_file: str | os.PathLike | None = None,
                overrides: Iterable[str] = (), **flags: Any) -> Config:
    """Build a Config: defaults < preset < YAML file < flags < ``--set`` overrides.

    Args:
        preset: preset name (see :func:`list_presets`); ``""`` or None = the plain defaults
            (the official ImageNet recipe).  A ``preset:`` key inside the YAML file replaces
            this argument (the file has the higher precedence).
        config_file: YAML file with a nested mapping (``train: {epochs: 5}``) or dotted keys.
        overrides: ``"section.key=value"`` strings; values are parsed as YAML, then coerced to
            the field type (lists as ``[1,2]`` or ``1,2``).
        **flags: dotted keys, e.g. ``**{"train.epochs": 5}``; ``None`` values are ignored
            (argparse options that were not given).

    The result is not validated: call :func:`validate` with the real world size.
    """
    file_flat: dict[str, Any] = {}
    if config_file is not None:
        file_flat = flatten(read_yaml(config_file), label=str(config_file))
        if file_flat.get("preset") is not None:
            preset = str(file_flat["preset"])
    preset = preset or ""
    cfg = Config()
    if preset:
        apply_flat(cfg, flatten(preset_overrides(preset), label=f"preset {preset}"))
    cfg.preset = preset
    if file_flat:
        try:
            apply_flat(cfg, file_flat)
        except ConfigError as e:
            raise ConfigError([f"{config_file}: {p}" for p in e.problems]) from None
    apply_flat(cfg, {k: v for k, v in flags.items() if v is not None})
    problems, parsed = [], {}
    for item in overrides:
        try:
            key, value = _parse_set(item)
            parsed[key] = value
        except ConfigError as e:
            problems.extend(e.problems)
    try:
        apply_flat(cfg, parsed)
    except ConfigError as e:
        problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return cfg
