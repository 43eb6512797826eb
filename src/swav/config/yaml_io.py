"""Config YAML files: a size-limited safe read, a strict load and an atomic save."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from swav.atomic import write_text_atomic
from swav.config.coerce import from_dict, to_dict
from swav.config.schema import Config, ConfigError


MAX_YAML_BYTES = 1 << 20  # 1 MB


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load`` (files over 1 MB are refused)."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(p)!r}: {e.strerror or e}") from None
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"config file {str(p)!r} is {size} bytes; refusing files over "
                          f"{MAX_YAML_BYTES} bytes (is it really a config?)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"config file {str(p)!r} is nested too deeply to be a config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping (section: {{key: value}}) "
                          f"at the top level, got {type(data).__name__}")
    return data


def load_yaml(path: str | os.PathLike) -> Config:
    """Load a config saved by :func:`save_yaml` (strict, see :func:`from_dict`)."""
    try:
        return from_dict(read_yaml(path))
    except ConfigError as e:
        if all(str(path) in p for p in e.problems):
            raise
        raise ConfigError([f"{path}: {p}" for p in e.problems]) from None


def save_yaml(cfg: Config, path: str | os.PathLike) -> None:
    """Write the config as YAML atomically (temporary file in the same folder + os.replace)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
    write_text_atomic(p, text)
