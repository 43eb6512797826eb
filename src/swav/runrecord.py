"""``run.json``: the facts of a training run, written by the trainer and read by the report.

The report states a run's device, precision, steps per epoch, fitted budget, warnings and so on from
this file and the checkpoint, never from the human log lines (which are free to change wording).
The file is rewritten atomically at the start of every call of ``train``, at every checkpoint and at
the end.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from swav.atomic import write_text_atomic

__all__ = ["RunRecord", "RunRecordError", "RUN_RECORD_NAME", "RUN_RECORD_FORMAT", "MAX_WARNINGS"]

RUN_RECORD_NAME = "run.json"
RUN_RECORD_FORMAT = "swav-run-record/1"
MAX_WARNINGS = 20  # the first warnings of a run are kept (a bad data folder can warn thousands of times)


class RunRecordError(ValueError):
    """run.json cannot be read or is not a swav run record."""


@dataclass
class RunRecord:
    """What a run is and where it stands. Times are unix seconds."""

    version: str = ""            # swav
    torch: str = ""
    python: str = ""
    host: str = ""
    device: str = ""             # "cpu", "cuda:0"
    device_name: str = ""        # the CPU model or the GPU name
    precision: str = ""          # resolved: fp32, bf16, fp16
    world_size: int = 1
    data_source: str = ""
    images: int = 0              # training images
    global_batch: int = 0
    steps_per_epoch: int = 0
    arch: str = ""
    parameters: int = 0
    crops: str = ""              # "2x28 + 4x16"
    budget_minutes: float = 0.0  # 0: no time budget
    budget_fitted: bool = True
    seconds_per_step: float | None = None  # measured when the budget was fitted
    total_steps: int = 0
    epochs: int = 0
    global_step: int = 0
    finished: bool = False
    stopped_by_signal: bool = False
    first_start: float = 0.0
    starts: int = 0              # calls of train() on this folder (1 + resumes)
    last_update: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def add_warning(self, message: str) -> None:
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(message)

    def to_json(self) -> str:
        d = {"format": RUN_RECORD_FORMAT, **asdict(self)}
        if d["seconds_per_step"] is not None and not math.isfinite(d["seconds_per_step"]):
            d["seconds_per_step"] = None
        return json.dumps(d, indent=2, sort_keys=False) + "\n"

    def save(self, run_dir: str | os.PathLike) -> Path:
        return write_text_atomic(Path(run_dir) / RUN_RECORD_NAME, self.to_json())

    @classmethod
    def from_mapping(cls, d: dict[str, Any], what: str = RUN_RECORD_NAME) -> "RunRecord":
        if not isinstance(d, dict) or d.get("format") != RUN_RECORD_FORMAT:
            raise RunRecordError(f"{what} is not a swav run record (format {RUN_RECORD_FORMAT!r})")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except TypeError as e:  # pragma: no cover - dataclass init with known names only
            raise RunRecordError(f"{what}: {e}") from None

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> "RunRecord":
        """The record of ``run_dir``; RunRecordError when it is missing, unreadable or not one."""
        path = Path(run_dir) / RUN_RECORD_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise RunRecordError(f"cannot read {path}: {e.strerror or e}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise RunRecordError(f"{path} is not valid JSON ({e})") from None
        return cls.from_mapping(d, str(path))
