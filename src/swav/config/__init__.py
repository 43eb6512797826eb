"""Typed configuration for SwAV pretraining: dataclasses, presets, YAML and validation.

A run's configuration is built in layers (later layers win)::

    defaults (the official ImageNet recipe)  <  preset  <  YAML file  <  flags  <  --set key=value

Every field carries a help string (``config_help()``) with the paper's advice where it gives
one.  ``validate(cfg, world_size)`` collects every problem at once and raises a single
:class:`ConfigError` that says what is wrong and what to do about it.

The package's modules, lowest first (each imports only those above it):

- ``schema``: the section dataclasses, field help, allowed values and ConfigError;
- ``presets``: the named presets;
- ``coerce``: values to field types, dotted keys, to_dict/from_dict;
- ``yaml_io``: reading, loading and saving YAML files;
- ``layers``: make_config (defaults < preset < file < flags < --set);
- ``describe``: diff_configs and config_help;
- ``validation``: validate.
"""

from __future__ import annotations

# Every public name of the former single module swav/config.py is importable from here; ALL_KEYS,
# FIELD_TYPES, SECTIONS, OPTIMIZER_NAMES and MAX_YAML_BYTES are public too, though not in __all__.
from swav.config.coerce import flatten, from_dict, to_dict
from swav.config.describe import RESUME_FREE_FIELDS, config_help, diff_configs
from swav.config.layers import make_config
from swav.config.presets import PRESET_DESCRIPTIONS, PRESETS, list_presets
from swav.config.schema import (
    ALL_KEYS,
    BUILTIN_SOURCES,
    FIELD_TYPES,
    OPTIMIZER_NAMES,
    PRECISIONS,
    SECTIONS,
    AugmentConfig,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    SwAVConfig,
    TrainConfig,
)
from swav.config.validation import check_paths, validate
from swav.config.yaml_io import MAX_YAML_BYTES, load_yaml, read_yaml, save_yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "AugmentConfig",
    "ModelConfig",
    "SwAVConfig",
    "OptimConfig",
    "TrainConfig",
    "Config",
    "PRESETS",
    "PRESET_DESCRIPTIONS",
    "list_presets",
    "make_config",
    "validate",
    "check_paths",
    "to_dict",
    "from_dict",
    "save_yaml",
    "load_yaml",
    "read_yaml",
    "diff_configs",
    "RESUME_FREE_FIELDS",
    "config_help",
    "flatten",
    "BUILTIN_SOURCES",
    "PRECISIONS",
]
