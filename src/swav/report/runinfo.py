"""What a run folder says about its run: run record, metrics, checkpoint facts, evaluation results.

Everything here reads files as data and tolerates their absence: a run killed in its first steps has
a config but no checkpoint; a run folder from an older swav has no ``run.json``. The human log
(``log.txt``) is never read: its wording is free to change. Each reader returns what it found and,
where something is missing or unreadable, a note saying so.
"""
from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from swav.runrecord import RUN_RECORD_NAME, RunRecord, RunRecordError

__all__ = ["RunFacts", "EvalResult", "merge_metrics", "read_run", "read_record", "read_evaluations",
           "report_environment", "format_seconds"]


@dataclass
class EvalResult:
    """One ``RUN_DIR/eval/<name>.json`` file (written by the ``swav eval`` commands)."""

    file: str
    command: str = ""
    metrics: dict[str, float | None] = field(default_factory=dict)  # None: written as null (non-finite)
    init_metrics: dict[str, float | None] = field(default_factory=dict)
    baseline: str = ""  # what baseline_metrics measured (the final comparison: "raw pixels")
    baseline_metrics: dict[str, float | None] = field(default_factory=dict)
    verdict: str = ""
    dataset: str = ""
    checkpoint: str = ""
    seconds: float | None = None
    version: str = ""
    error: str = ""  # why the file could not be used


@dataclass
class RunFacts:
    """Everything the report states about a run, gathered from its folder."""

    run_dir: Path
    config: dict[str, Any] | None = None
    config_source: str = ""
    metrics: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: dict[str, Any] | None = None  # the loaded run state (model weights included)
    checkpoint_note: str = ""
    record: RunRecord | None = None  # run.json; None where it is missing or unusable
    record_note: str = ""  # why there is no record, or which of its values were ignored
    evaluations: list[EvalResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        """The run's first warnings, as run.json keeps them."""
        return list(self.record.warnings) if self.record is not None else []

    @property
    def steps_per_epoch(self) -> int | None:
        if self.record is not None and self.record.steps_per_epoch > 0:
            return self.record.steps_per_epoch
        return _steps_per_epoch_of(self.metrics)

    @property
    def global_step(self) -> int | None:
        if self.checkpoint is not None:
            return int(self.checkpoint.get("global_step", 0))
        steps = [r["step"] for r in self.metrics if isinstance(r.get("step"), (int, float))]
        if steps:
            return int(max(steps))
        return self.record.global_step if self.record is not None and self.record.starts else None

    @property
    def total_steps(self) -> int | None:
        spe = self.steps_per_epoch
        if self.checkpoint is not None:
            if _number(self.checkpoint.get("total_steps")) is not None:
                return int(self.checkpoint["total_steps"])
            if spe and _number(self.checkpoint.get("epochs")) is not None:
                return int(self.checkpoint["epochs"]) * spe
        if self.record is not None and self.record.total_steps > 0:
            return self.record.total_steps
        if self.config and spe:
            return int(self.config.get("train", {}).get("epochs", 0)) * spe
        return None

    @property
    def finished(self) -> bool | None:
        total, step = self.total_steps, self.global_step
        if total is None or step is None:
            return None
        return step >= total


def _steps_per_epoch_of(metrics: list[dict[str, Any]]) -> int | None:
    """Steps per epoch from the metrics records (each has ``epoch`` = step / steps per epoch)."""
    for rec in reversed(metrics):
        step, epoch = _number(rec.get("step")), _number(rec.get("epoch"))
        if step is not None and epoch is not None and step > 0 and 0 < epoch < math.inf:
            spe = round(step / epoch)
            return spe if spe >= 1 else None
    return None


def merge_metrics(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per step, in step order: records of the same step are merged, later values winning.

    After a resume, steps after the last checkpoint are logged twice (the second time is the run
    that continued); the online kNN writes its own record at the step of its epoch's last step.
    """
    by_step: dict[int, dict[str, Any]] = {}
    for rec in records:
        step = rec.get("step")
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            continue
        by_step.setdefault(int(step), {}).update(rec)
    return [by_step[s] for s in sorted(by_step)]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _read_eval_file(path: Path) -> EvalResult:
    res = EvalResult(file=path.name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        res.error = f"unreadable: {e}"
        return res
    if not isinstance(data, dict):
        res.error = f"expected a JSON object, found {type(data).__name__}"
        return res
    res.command = str(data.get("command", ""))
    for key, target in (("metrics", res.metrics), ("init_metrics", res.init_metrics),
                        ("baseline_metrics", res.baseline_metrics)):
        got = data.get(key) or {}
        if isinstance(got, dict):
            for name, value in got.items():
                v = _number(value)
                if v is not None or value is None:  # null: a non-finite result, shown as blank
                    target[str(name)] = v
    res.baseline = str(data.get("baseline", "") or "")
    res.verdict = str(data.get("verdict", "") or "")
    res.dataset = str(data.get("dataset", "") or "")
    res.checkpoint = str(data.get("checkpoint", "") or "")
    res.seconds = _number(data.get("seconds"))
    res.version = str(data.get("version", "") or "")
    if not any(v is not None for v in res.metrics.values()):
        res.error = "no numeric 'metrics' in the file"
    return res


_RECORD_MISSING_TAIL = ("the training device, precision and host, the image and parameter counts, the number "
                        "of starts and the run's warnings are not known; what this page shows comes from "
                        "checkpoint.pt, config.yaml and metrics.jsonl")


def _field_default(f) -> Any:
    return f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]


def _checked_value(value: Any, default: Any) -> tuple[bool, Any]:
    """(ok, value) for one run.json value against its field's default (which gives the type)."""
    if isinstance(default, bool):
        return isinstance(value, bool), value
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool), value
    if isinstance(default, float) or default is None:  # None: an optional number (seconds_per_step)
        if value is None and default is None:
            return True, None
        v = _number(value)
        return v is not None and math.isfinite(v), v
    if isinstance(default, str):
        return isinstance(value, str), value
    if isinstance(default, list):
        return isinstance(value, list), [str(x) for x in value] if isinstance(value, list) else value
    return True, value  # pragma: no cover - every field has one of the types above


def read_record(run_dir: str | Path) -> tuple[RunRecord | None, str]:
    """``RUN_DIR/run.json`` and a note: why it is missing or unusable, or which values were ignored.

    A value of the wrong type (a hand-edited or damaged file) is replaced by the field's default
    and named in the note, so one bad value does not cost the report the others.
    """
    path = Path(run_dir) / RUN_RECORD_NAME
    if not path.exists():
        return None, (f"{RUN_RECORD_NAME} is missing (a run folder from an older swav, or a run stopped before "
                      f"training began): {_RECORD_MISSING_TAIL}.")
    try:
        record = RunRecord.load(run_dir)
    except RunRecordError as e:
        return None, f"{RUN_RECORD_NAME} could not be used ({e}): {_RECORD_MISSING_TAIL}."
    bad = []
    for f in fields(RunRecord):
        default = _field_default(f)
        ok, value = _checked_value(getattr(record, f.name), default)
        if ok:
            setattr(record, f.name, value)
        else:
            bad.append(f.name)
            setattr(record, f.name, default)
    note = (f"{RUN_RECORD_NAME}: ignored value(s) of unexpected type: {', '.join(bad)}." if bad else "")
    return record, note


def read_evaluations(run_dir: Path) -> list[EvalResult]:
    """Every ``RUN_DIR/eval/*.json``, sorted by file name."""
    folder = Path(run_dir) / "eval"
    if not folder.is_dir():
        return []
    return [_read_eval_file(p) for p in sorted(folder.glob("*.json")) if p.is_file() and not p.name.startswith(".")]


def read_run(run_dir: str | Path, *, load_checkpoint: bool = True) -> RunFacts:
    """Gather the facts of ``run_dir``; raise FileNotFoundError only when it is not a run folder at all."""
    from swav.checkpoint import CHECKPOINT_NAME, CheckpointError, load_run_state
    from swav.config import ConfigError, read_yaml
    from swav.monitor import read_metrics

    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {str(run)!r} does not exist")
    # log.txt only marks a run folder (its first lines are written before anything else); it is not read
    markers = ("config.yaml", CHECKPOINT_NAME, "metrics.jsonl", RUN_RECORD_NAME, "log.txt")
    if not any((run / m).exists() for m in markers):
        raise FileNotFoundError(f"{str(run)!r} is not a swav run folder: it holds none of {', '.join(markers)}")
    facts = RunFacts(run_dir=run)

    ckpt = run / CHECKPOINT_NAME
    if load_checkpoint and ckpt.exists():
        try:
            facts.checkpoint = load_run_state(ckpt)
        except (CheckpointError, OSError) as e:
            facts.checkpoint_note = f"checkpoint.pt could not be used: {e}"
    elif load_checkpoint:
        facts.checkpoint_note = "no checkpoint.pt yet (the run has not finished its first epoch)"

    if facts.checkpoint is not None and isinstance(facts.checkpoint.get("config"), dict):
        facts.config, facts.config_source = facts.checkpoint["config"], "checkpoint.pt"
    elif (run / "config.yaml").exists():
        try:
            facts.config, facts.config_source = read_yaml(run / "config.yaml"), "config.yaml"
        except ConfigError as e:
            facts.notes.append(str(e))

    if (run / "metrics.jsonl").exists():
        try:
            facts.metrics = merge_metrics(read_metrics(run / "metrics.jsonl"))
        except (OSError, ValueError) as e:
            facts.notes.append(f"metrics.jsonl could not be read: {e}")
    facts.record, facts.record_note = read_record(run)
    facts.evaluations = read_evaluations(run)
    return facts


def report_environment() -> dict[str, str]:
    """The machine the report is generated on (not necessarily the one that trained)."""
    import os

    import torch

    from swav import __version__

    env = {
        "swav": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "CPU cores": str(os.cpu_count() or "?"),
    }
    if torch.cuda.is_available():
        env["GPUs"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        env["CUDA"] = str(torch.version.cuda)
    else:
        env["GPUs"] = "none visible"
    return env


def format_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h} h {m:02d} min"
    if m:
        return f"{m} min {s:02d} s"
    return f"{s} s"
