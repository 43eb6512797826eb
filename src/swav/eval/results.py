"""Evaluation results: their files (read by the HTML report) and their plain-text tables.

Result files: one JSON object per command::

    {"command": "swav eval knn runs/fm", "metrics": {"knn_top1@20": 85.1, ...},
     "init_metrics": {...same names...},            # only when the initial network was evaluated
     "dataset": "fashion-mnist", "checkpoint": "/abs/runs/fm/checkpoint.pt",
     "seconds": 12.3, "version": "0.1.0"}

written to ``RUN_DIR/eval/<name>.json`` for a run checkpoint, else ``./<name>.json``; ``--out``
(a ``.json`` file or a folder) overrides both.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from swav import __version__
from swav.atomic import write_text_atomic

__all__ = ["Timer", "result_path", "make_record", "write_result", "format_table"]


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def result_path(loaded, name: str, out: str | os.PathLike | None = None) -> Path:
    """``--out`` (a .json file, or a folder to put ``<name>.json`` in); else ``RUN_DIR/eval/`` for a
    run checkpoint; else the current folder."""
    if out is not None:
        out = Path(out)
        return out if out.suffix == ".json" else out / f"{name}.json"
    if loaded.run_dir is not None:
        return loaded.run_dir / "eval" / f"{name}.json"
    return Path.cwd() / f"{name}.json"


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, torch.Tensor):
        return _clean(x.item())
    return x


def make_record(command: str, metrics: dict, init_metrics: dict | None, dataset: str, checkpoint,
                seconds: float) -> dict:
    rec = {"command": command,
           "metrics": {k: _clean(float(v)) for k, v in metrics.items()}}
    if init_metrics is not None:
        rec["init_metrics"] = {k: _clean(float(v)) for k, v in init_metrics.items()}
    rec.update({"dataset": str(dataset), "checkpoint": str(Path(checkpoint).resolve()),
                "seconds": round(float(seconds), 3), "version": __version__})
    return rec


def write_result(record: dict, path: Path) -> Path:
    """Write ``record`` as JSON atomically (a temporary file renamed over ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(record, indent=2) + "\n", durable=False)


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    v = float(v)
    if unit == "count" and v.is_integer():
        return f"{int(v)}"
    return f"{v:.2f}" if abs(v) >= 1 or unit == "%" or v == 0 else f"{v:.4f}"


def format_table(title: str, metrics: dict, init_metrics: dict | None = None, units: dict | None = None) -> str:
    """A plain-text table: one row per metric, the pretrained value and (when given) the value at
    initialisation and the difference."""
    units = units or {}
    names = list(metrics)
    w = max([len(n) + 6 for n in names] + [len("metric")])
    head = f"{'metric':<{w}} {'pretrained':>11}"
    if init_metrics is not None:
        head += f" {'at init':>11} {'gain':>9}"
    lines = [title, head, "-" * len(head)]
    for n in names:
        u = units.get(n) or ("%" if "top1" in n or "top5" in n else "")
        label = n + (f" ({u})" if u else "")
        row = f"{label:<{w}} {_fmt(metrics[n], u):>11}"
        if init_metrics is not None:
            iv = init_metrics.get(n)
            gain = None if iv is None else float(metrics[n]) - float(iv)
            row += f" {_fmt(iv, u):>11} {('+' if gain is not None and gain >= 0 else '') + _fmt(gain, u):>9}"
        lines.append(row)
    return "\n".join(lines)
