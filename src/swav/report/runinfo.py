"""What a run folder says about its run: metrics, log facts, checkpoint facts, evaluation results.

Everything here reads files and tolerates their absence: a run killed in its first epoch has a
config and a log but no checkpoint; a run on another machine may lack ``log.txt``. Each reader
returns what it found and, where something is missing or unreadable, a note saying so.
"""
from __future__ import annotations

import json
import math
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunFacts", "EvalResult", "merge_metrics", "read_run", "read_evaluations", "report_environment",
           "format_seconds"]

# "swav 0.1.0 | host | 1 process(es) on cpu (bf16) | fashion-mnist: 60000 images, 234 steps/epoch of 256 ..."
_START_RE = re.compile(
    r"swav (?P<version>\S+) \| (?P<host>[^|]+?) \| (?P<procs>\d+) process\(es\) on (?P<device>\S+) "
    r"\((?P<precision>[^)]+)\) \| (?P<source>.+?): (?P<images>\d+) images, (?P<spe>\d+) steps/epoch of "
    r"(?P<batch>\d+).*?\| (?P<arch>\S+) (?P<params>[\d.]+)M parameters")
_BUDGET_RE = re.compile(r"time budget .*?: training (?P<epochs>\d+) epoch\(s\) \((?P<steps>\d+) steps[,)]")
_STAMP_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (\w+) ")


@dataclass
class EvalResult:
    """One ``RUN_DIR/eval/<name>.json`` file (written by the ``swav eval`` commands)."""

    file: str
    command: str = ""
    metrics: dict[str, float | None] = field(default_factory=dict)  # None: written as null (non-finite)
    init_metrics: dict[str, float | None] = field(default_factory=dict)
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
    log: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # WARNING lines of log.txt (first ones)
    evaluations: list[EvalResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def steps_per_epoch(self) -> int | None:
        return self.log.get("steps_per_epoch")

    @property
    def global_step(self) -> int | None:
        if self.checkpoint is not None:
            return int(self.checkpoint.get("global_step", 0))
        steps = [r["step"] for r in self.metrics if isinstance(r.get("step"), (int, float))]
        return int(max(steps)) if steps else None

    @property
    def total_steps(self) -> int | None:
        spe = self.steps_per_epoch
        if self.checkpoint is not None and spe:
            return int(self.checkpoint.get("total_steps", int(self.checkpoint["epochs"]) * spe))
        if "budget_steps" in self.log:
            return int(self.log["budget_steps"])
        if self.config and spe:
            return int(self.config.get("train", {}).get("epochs", 0)) * spe
        return None

    @property
    def finished(self) -> bool | None:
        total, step = self.total_steps, self.global_step
        if total is None or step is None:
            return None
        return step >= total


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


def _read_log(path: Path) -> tuple[dict[str, Any], list[str]]:
    facts: dict[str, Any] = {}
    warnings: list[str] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return facts, warnings
    starts = 0
    for line in text.splitlines():
        m = _START_RE.search(line)
        if m:
            starts += 1
            stamp = _STAMP_RE.match(line)
            if stamp and "first_start" not in facts:
                facts["first_start"] = stamp.group(1)
            facts.update(version=m["version"], host=m["host"].strip(), processes=int(m["procs"]),
                         device=m["device"], precision=m["precision"], source=m["source"],
                         images=int(m["images"]), steps_per_epoch=int(m["spe"]), batch=int(m["batch"]),
                         arch=m["arch"], params_millions=float(m["params"]))
            continue
        m = _BUDGET_RE.search(line)
        if m:
            facts["budget_epochs"], facts["budget_steps"] = int(m["epochs"]), int(m["steps"])
            continue
        stamp = _STAMP_RE.match(line)
        if stamp and stamp.group(2) == "WARNING" and len(warnings) < 20:
            warnings.append(line[stamp.end():].strip())
    facts["starts"] = starts
    return facts, warnings


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
    for key, target in (("metrics", res.metrics), ("init_metrics", res.init_metrics)):
        got = data.get(key) or {}
        if isinstance(got, dict):
            for name, value in got.items():
                v = _number(value)
                if v is not None or value is None:  # null: a non-finite result, shown as blank
                    target[str(name)] = v
    res.dataset = str(data.get("dataset", "") or "")
    res.checkpoint = str(data.get("checkpoint", "") or "")
    res.seconds = _number(data.get("seconds"))
    res.version = str(data.get("version", "") or "")
    if not any(v is not None for v in res.metrics.values()):
        res.error = "no numeric 'metrics' in the file"
    return res


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
    markers = ("config.yaml", CHECKPOINT_NAME, "metrics.jsonl", "log.txt")
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
    facts.log, facts.warnings = _read_log(run / "log.txt")
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
