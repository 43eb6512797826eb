"""The run state: what a checkpoint of a training run holds, how it is written and how a run resumes
from it. The checkpoint's layout (``swav-run/1``) is defined here and nowhere else."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from swav import __version__
from swav import distributed as dist_utils
from swav.checkpoint import CHECKPOINT_NAME, link_atomic, load_run_state, save_atomic
from swav.config import Config, ConfigError, diff_configs, from_dict, to_dict
from swav.optim import load_optimizer_state
from swav.plan import StepPlan
from swav.queue import FeatureQueue
from swav.runrecord import RUN_RECORD_NAME, RunRecord, RunRecordError
from swav.step import Learner

__all__ = ["RunState", "ResumeMismatchError", "CHECKPOINT_FORMAT", "read_resume_point", "open_record"]

CHECKPOINT_FORMAT = "swav-run/1"
log = logging.getLogger("swav")


class ResumeMismatchError(ConfigError):
    """The run folder holds a checkpoint made with another configuration."""


def read_resume_point(out: Path, cfg: Config) -> dict | None:
    """The checkpoint of ``out`` to resume from (None for a new run); ResumeMismatchError when it
    was written with another configuration."""
    path = out / CHECKPOINT_NAME
    if not path.exists():
        return None
    state = load_run_state(path)
    diffs = diff_configs(from_dict(state["config"]), cfg)
    if diffs:
        raise ResumeMismatchError([f"{path} was written with another configuration; resume it with the same "
                                   "settings, or choose another --out:"] + diffs)
    return state


def open_record(out: Path, resumed: bool) -> RunRecord:
    """The run record of ``out``: the previous one when resuming (first start, starts, warnings kept)."""
    if resumed and (out / RUN_RECORD_NAME).exists():
        try:
            return RunRecord.load(out)
        except RunRecordError as e:
            log.warning("%s; starting a new run record", e)
    return RunRecord(first_start=time.time())


@dataclass
class RunState:
    """Where a run stands: its step, plan, learner and counters; saved as one checkpoint file."""

    cfg: Config
    out: Path
    learner: Learner
    plan: StepPlan
    record: RunRecord
    rank: int = 0
    world: int = 1
    step: int = 0
    skipped_files: int = 0
    resumed_from: int | None = None  # the world size that wrote the checkpoint resumed from
    extra: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.out / CHECKPOINT_NAME

    def resume(self, state: dict) -> None:
        """Take over a checkpoint written by ``to_checkpoint`` (any earlier number of ranks)."""
        L = self.learner
        L.raw_model.load_state_dict(state["model"])
        load_optimizer_state(L.optimizer, state["optimizer"])
        if L.scaler is not None and state.get("scaler"):
            L.scaler.load_state_dict(state["scaler"])
        spe = self.plan.steps_per_epoch
        # stopped before the time budget was fitted (first steps): the resumed run fits it
        self.plan = StepPlan(self.cfg, spe, int(state.get("total_steps", int(state["epochs"]) * spe)),
                             budget_fitted=bool(state.get("budget_fitted", True)))
        self.step = int(state["global_step"])
        self.skipped_files = int(state.get("skipped_files", 0))
        L.nan_guard.bad_steps_total = int(state.get("nonfinite_steps", 0))
        if state.get("queue") is not None:
            L.queue = self.new_queue()
            L.queue.load_global_state_dict(state["queue"], self.rank, self.world)
        self.resumed_from = int(state.get("world_size", 1))
        rng = state.get("rng") or {}
        if isinstance(rng.get("torch"), torch.Tensor):  # drop-path and dropout draw from it: exact resume
            torch.set_rng_state(rng["torch"])

    def new_queue(self) -> FeatureQueue:
        c = self.cfg
        return FeatureQueue(len(c.swav.crops_for_assign), c.swav.queue_length // self.world, c.model.feat_dim,
                            device=self.learner.device)

    def to_checkpoint(self) -> dict:
        """The checkpoint's content (call on every rank: the queue is gathered over ranks)."""
        L, p = self.learner, self.plan
        return {
            "format": CHECKPOINT_FORMAT, "version": __version__, "config": to_dict(self.cfg), "epochs": p.epochs,
            "total_steps": p.total_steps, "budget_fitted": p.budget_fitted, "global_step": self.step,
            "world_size": self.world, "model": L.raw_model.state_dict(),
            "optimizer": L.optimizer.state_dict(), "scaler": L.scaler.state_dict() if L.scaler is not None else None,
            "queue": L.queue.global_state_dict() if L.queue is not None else None,
            "skipped_files": self.skipped_files, "nonfinite_steps": L.nan_guard.bad_steps_total,
            "rng": {"torch": torch.get_rng_state()},
        }

    def save(self, epoch_done: bool) -> None:
        """Write ``checkpoint.pt`` atomically (and at a kept epoch ``checkpoint-epochN.pt``), then run.json."""
        st = self.to_checkpoint()
        if not dist_utils.is_main():
            return
        ep = -(-self.step // self.plan.steps_per_epoch)  # epochs begun; at an epoch end the epochs done
        keep = self.out / f"checkpoint-epoch{ep}.pt" if epoch_done and (
            ep % self.cfg.train.checkpoint_every == 0 or ep == self.plan.epochs) else None
        try:
            if keep is None:
                save_atomic(st, self.path)
            else:
                # the kept copy first, then checkpoint.pt as a second name of the same file: killed in
                # between, checkpoint.pt still holds the previous save and the resumed run writes both
                save_atomic(st, keep)
                try:
                    link_atomic(keep, self.path)
                except OSError:  # a file system without hard links: write it again
                    save_atomic(st, self.path)
        except OSError as e:
            log.error("%s", e)
            raise
        self.save_record()

    def save_record(self, **changes) -> None:
        """Rewrite run.json with where the run stands (rank 0)."""
        r = self.record
        for k, v in changes.items():
            setattr(r, k, v)
        r.global_step, r.total_steps, r.epochs = self.step, self.plan.total_steps, self.plan.epochs
        r.budget_fitted, r.last_update = self.plan.budget_fitted, time.time()
        if dist_utils.is_main():
            r.save(self.out)
