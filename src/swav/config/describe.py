"""Reports on finished configs: which fields differ between two (and which may differ on resume),
and every field's type, value and help text."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from swav.config.coerce import flatten, to_dict
from swav.config.schema import TOP_LEVEL, FIELD_TYPES, SECTIONS, Config, type_name


RESUME_FREE_FIELDS: frozenset[str] = frozenset({
    "out", "preset", "data.workers", "data.root", "train.device", "train.log_every",
    "train.knn_every", "train.save_every_steps", "train.checkpoint_every",
    "train.knn_max_train", "train.final_knn", "train.final_linear_epochs",
})


def _flat_values(cfg: Config) -> dict[str, Any]:
    return flatten(to_dict(cfg))


def diff_configs(a: Config, b: Config, ignore: Iterable[str] = RESUME_FREE_FIELDS) -> list[str]:
    """``["key: a_value != b_value", ...]`` for every field that differs (ignored keys skipped)."""
    skip = set(ignore)
    fa, fb = _flat_values(a), _flat_values(b)
    return [f"{k}: {fa[k]!r} != {fb[k]!r}" for k in fa if k not in skip and fa[k] != fb[k]]


def config_help(cfg: Config | None = None) -> dict[str, tuple[str, Any, str]]:
    """Dotted key -> (type name, default, help text), in schema order.

    ``default`` is taken from ``cfg`` when given (e.g. a preset), else from the dataclasses.
    """
    values = _flat_values(cfg if cfg is not None else Config())
    out: dict[str, tuple[str, Any, str]] = {}
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            key = f"{name}.{f.name}"
            out[key] = (type_name(FIELD_TYPES[key]), values[key], f.metadata.get("help", ""))
    for f in dataclasses.fields(Config):
        if f.name in TOP_LEVEL:
            out[f.name] = (type_name(FIELD_TYPES[f.name]), values[f.name],
                           f.metadata.get("help", ""))
    return out
