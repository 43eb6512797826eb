"""The one SwAV training loop: one process on CPU or one GPU, or many through torchrun.

Everything random in a step is derived from (seed, epoch) for the data order and (seed, step) for
the augmentation, drawn for the whole global batch and sliced per rank: a run resumed from a
checkpoint, or run on another number of processes with the same global batch, sees the same
images and crops.

The parts: ``swav.build`` builds the network, augmentation and optimizer; ``swav.plan.StepPlan``
says how many steps and the learning rate of each (and fits a time budget); ``swav.step.train_step``
is the step; ``swav.runstate.RunState`` owns the checkpoint and run.json. This module ties them.
"""
from __future__ import annotations

import copy
import logging
import platform
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from swav import __version__
from swav import distributed as dist_utils
from swav.build import build_learner, build_model, build_train_data, wrap_for_training
from swav.checkpoint import CHECKPOINT_NAME
from swav.config import Config, ConfigError, check_paths, save_yaml, validate
from swav.data.loader import EpochLoader
from swav.data.multicrop import slice_params
from swav.data.transfer import DeviceFeeder
from swav.device import check_precision, device_name, device_type_of, pick_device, resolve_precision, synchronize
from swav.eval.compare import Comparison, compare_features
from swav.eval.data import EvalData, knn_of_backbone
from swav.eval.features import recompute_batchnorm
from swav.eval.results import make_record, write_result
from swav.monitor import CollapseWatch, MetricsWriter, ProgressBar, assignment_stats, setup_logging
from swav.plan import CALIBRATION_STEPS, StepPlan
from swav.runrecord import RunRecord
from swav.runlock import RunLock, RunLockedError
from swav.runstate import ResumeMismatchError, RunState, open_record, read_resume_point
from swav import step as swav_step
from swav.step import Learner

__all__ = ["train", "build_model", "RunResult", "ResumeMismatchError", "knn_of_backbone"]

log = logging.getLogger("swav")


@dataclass
class RunResult:
    out_dir: Path
    epochs: int
    global_step: int
    last_loss: float
    seconds: float
    final: Comparison | None = None  # learned vs init vs raw pixels (kNN, linear) when train.final_knn
    stopped_by_signal: bool = False
    is_main: bool = True  # this process is rank 0 (prints and writes the report)


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 12345) % (2**63 - 1)


def _printable(text: str) -> str:
    """``text`` safe for every log stream: bytes of a file name that are not UTF-8 (kept by
    ``os.fsdecode`` as lone surrogates, which a UTF-8 log file cannot encode) shown as ``\\xNN``."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _SignalFlag:
    """SIGTERM / SIGUSR1 (SLURM pre-emption): finish the step, write a checkpoint, exit cleanly."""

    def __init__(self):
        self.raised: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.raised = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _WarningsToRecord(logging.Handler):
    """Keeps the run's warnings (their messages, as data) in its run record."""

    def __init__(self, record: RunRecord):
        super().__init__(level=logging.WARNING)
        self.record = record

    def emit(self, rec: logging.LogRecord) -> None:
        try:
            self.record.add_warning(_printable(rec.getMessage()))
        except Exception:  # pragma: no cover - never let bookkeeping break a run
            self.handleError(rec)


def train(cfg: Config, *, max_steps: int | None = None, backbone: torch.nn.Module | None = None) -> RunResult:
    """Pretrain with SwAV as ``cfg`` says, writing everything into ``cfg.out``.

    Resumes automatically from ``cfg.out/checkpoint.pt`` when it exists and its config matches
    (a mismatch raises ResumeMismatchError naming the fields). ``max_steps`` stops after that
    many steps in this call (for tests and benchmarks); the checkpoint is written first.

    ``backbone``: a module of yours instead of ``model.arch`` (it maps images (B, C, H, W) to pooled
    features (B, num_features) and has ``num_features``). The run's ``model.arch`` becomes
    ``module/<its class name>`` (unless it already names a ``module/...``); the module is copied, as
    it is now, for the run and for the final comparison with the network at initialisation (your
    object is not trained: the trained weights are in the run's checkpoint,
    ``swav.eval.weights.load_weights(run_dir, backbone=module)``). Resume by calling again with the
    same module; the command line cannot rebuild it.
    """
    if backbone is not None:
        from swav.models import MODULES

        cfg = copy.deepcopy(cfg)
        if not MODULES.owns(cfg.model.arch):
            cfg.model.arch = MODULES.arch_of(backbone)
        with MODULES.given(cfg.model.arch, backbone):
            return train(cfg, max_steps=max_steps)
    t_start = time.time()
    env = dist_utils.read_env()
    # every setting is checked before anything is started or written
    warnings = validate(cfg, world_size=env.world_size)
    if max_steps is not None and max_steps < 1:
        raise ConfigError([f"max_steps (--max-steps) = {max_steps} must be >= 1"])
    check_paths(cfg)
    device_type = device_type_of(cfg.train.device)
    if env.is_distributed and not dist_utils.is_dist():
        env = dist_utils.init_distributed(device_type)
        try:  # the group this call created is destroyed on the way out, whatever happens:
            # a gloo group left to the interpreter's exit can abort the process (SIGABRT)
            return _train_in_group(cfg, env, max_steps, t_start, warnings)
        finally:
            dist_utils.cleanup()
    return _train_in_group(cfg, env, max_steps, t_start, warnings)


def _train_in_group(cfg: Config, env, max_steps: int | None, t_start: float, warnings: list[str]) -> RunResult:
    """Prepare the run folder and its log, then run; the run's warnings go to run.json too."""
    out = Path(cfg.out)
    device = pick_device(cfg.train.device, env.local_rank if env.is_distributed else None)
    precision = resolve_precision(cfg.train.precision, device)
    check_precision(precision, device)
    lock = _lock_run_folder(out)  # one writer: before anything in the folder is read, written or removed
    try:
        if dist_utils.is_main():
            for pattern in (".checkpoint*.pt.tmp*", ".run.json.tmp*"):  # left by a process killed mid-write
                for stale in out.glob(pattern):
                    stale.unlink()
        dist_utils.barrier()
        setup_logging(out, env.rank)
        record = open_record(out, (out / CHECKPOINT_NAME).exists())
        handler = _WarningsToRecord(record)
        if dist_utils.is_main():
            log.addHandler(handler)
        try:
            for w in warnings:
                log.warning("config: %s", w)
            run = _set_up(cfg, env, device, precision, record)
            _loop(run, max_steps)
            return _finish(run, t_start)
        finally:
            log.removeHandler(handler)
    finally:
        lock.release()


def _lock_run_folder(out: Path) -> RunLock:
    """Rank 0 creates the run folder and locks it for the whole job (``swav.runlock``); every rank
    learns the outcome, so a second job on a folder in use stops on all its ranks at once."""
    lock, error, refused = RunLock(out), None, None
    if dist_utils.is_main():
        out.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire()
        except ValueError as e:  # RunLockedError, RunLockUnavailableError: a usage error (exit 2)
            error, refused = e, str(e)
    if dist_utils.get_world_size() > 1:
        refused = dist_utils.broadcast_object(refused)
    if error is not None:
        raise error
    if refused is not None:
        raise RunLockedError(refused)
    return lock


@dataclass
class _Run:
    """The parts of a run that the loop ties together."""

    cfg: Config
    state: RunState
    loader: EpochLoader
    eval_data: EvalData
    metrics: MetricsWriter
    collapse: CollapseWatch
    bar: ProgressBar
    rank: int
    world: int
    last_loss: float = float("nan")
    stopped_by_signal: bool = False
    window: dict = field(default_factory=dict)  # images, data time and start of the logging window
    refit_at: int | None = None  # time budget: timed steps at which the final fit is made
    read_at: int = -1  # the step of the last host read of the device's counters (_read_point)
    group_flags: torch.Tensor | None = None  # in a group: stop signals and unusable files since that read
    pending_skipped: list = field(default_factory=list)  # in a group: this rank's unusable files since then
    stop_signal: bool = False  # in a group: a stop signal reached some rank (known at a read point)

    @property
    def learner(self) -> Learner:
        return self.state.learner

    @property
    def plan(self) -> StepPlan:
        return self.state.plan


def _open_data(cfg: Config, rank: int, world: int, device: torch.device):
    """The training data set and its loader; a source that cannot be used is a configuration error."""
    try:
        dataset, loader = build_train_data(cfg, rank, world, device)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"data.source = {str(cfg.data.source)!r}: {e}") from None
    eval_data = EvalData.from_config(cfg)
    if (cfg.train.knn_every or cfg.train.final_knn) and not dataset.in_memory:
        try:  # the kNN monitor needs labelled train and test splits: fail now, not after training
            for split in ("train", "test"):
                eval_data.labelled(split)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"train.knn_every / train.final_knn need labelled train and test splits of "
                              f"data.source: {e}; for unlabelled images set train.final_knn=false and "
                              "train.knn_every=0") from None
    return dataset, loader, eval_data


def _set_up(cfg: Config, env, device: torch.device, precision: str, record: RunRecord) -> _Run:
    """Resume or start: data, learner, plan and run state, the run's facts in run.json."""
    rank, world = env.rank, env.world_size
    out = Path(cfg.out)
    resume_point = read_resume_point(out, cfg)
    if dist_utils.is_main():
        save_yaml(cfg, out / "config.yaml")
    dataset, loader, eval_data = _open_data(cfg, rank, world, device)
    learner = build_learner(cfg, device, world, precision, init_weights=resume_point is None)
    model = learner.raw_model
    state = RunState(cfg, out, learner, StepPlan.start(cfg, loader.steps_per_epoch), record, rank, world)
    if resume_point is not None:
        state.resume(resume_point)
        log.info("resumed from %s at step %d (epoch %d); it was written by %d process(es), now %d",
                 state.path, state.step, state.step // state.plan.steps_per_epoch, state.resumed_from, world)
        del resume_point
    learner.model = wrap_for_training(model, device, world, learner.compile)
    _describe(state, dataset, device, precision)
    nmb = model.prototypes.nmb_prototypes
    run = _Run(cfg, state, loader, eval_data, MetricsWriter(out, enabled=dist_utils.is_main()),
               CollapseWatch(nmb[0] if isinstance(nmb, list) else nmb),
               ProgressBar(state.plan.total_steps, enabled=dist_utils.is_main(), every=cfg.train.log_every),
               rank, world)
    state.save_record(finished=False, stopped_by_signal=False)  # this call's, until it ends
    return run


def _describe(state: RunState, dataset, device: torch.device, precision: str) -> None:
    """The run's facts: into its record (run.json) and, for people, one log line."""
    cfg, r, spe = state.cfg, state.record, state.plan.steps_per_epoch
    n_params = sum(p.numel() for p in state.learner.raw_model.parameters())
    crops = " + ".join(f"{n}x{s}" for n, s in zip(cfg.augment.nmb_crops, cfg.augment.size_crops))
    r.version, r.torch, r.python = __version__, torch.__version__, platform.python_version()
    r.host = socket.gethostname()
    r.device, r.device_name, r.precision, r.world_size = str(device), device_name(device), precision, state.world
    r.data_source, r.images, r.global_batch = str(cfg.data.source), len(dataset), cfg.train.batch_size
    r.steps_per_epoch, r.arch, r.parameters, r.crops = spe, cfg.model.arch, n_params, crops
    r.budget_minutes, r.starts = float(cfg.train.time_budget_minutes), r.starts + 1
    log.info("swav %s | %s | %d process(es) on %s (%s) | %s: %d images, %d steps/epoch of %d (per process %d) "
             "| %s %.1fM parameters | crops %s", __version__, r.host, state.world, device, precision,
             cfg.data.source, len(dataset), spe, cfg.train.batch_size, cfg.train.batch_size // state.world,
             cfg.model.arch, n_params / 1e6, crops)


def _loop(run: _Run, max_steps: int | None) -> None:
    """Epochs of steps until the plan is done, a signal arrives or ``max_steps`` are taken. The
    device's counters (NaN guard, in a group the stop signals and unusable files) are read on the
    host only where a log line or a checkpoint is due (``_read_point``): in between, the host
    queues steps without waiting for the device."""
    cfg, state = run.cfg, run.state
    spe, steps_this_call, calib_t0 = run.plan.steps_per_epoch, 0, None
    run.window = {"t": time.perf_counter(), "images": 0, "data_time": 0.0}
    with _SignalFlag() as sig:
        while state.step < run.plan.total_steps:
            epoch, it = divmod(state.step, spe)
            if run.learner.queue is None and cfg.swav.queue_length // run.world > 0 \
                    and epoch >= cfg.swav.epoch_queue_starts:
                run.learner.queue = state.new_queue()
            run.loader.set_epoch(epoch, it)
            t_data = time.perf_counter()
            for batch in DeviceFeeder(run.loader, run.learner.device):
                run.window["data_time"] += time.perf_counter() - t_data
                outcome = _step(run, batch, it, sig)
                it += 1
                steps_this_call += 1
                if not run.plan.budget_fitted:  # time budget: fit the step count once the speed is known
                    calib_t0 = _calibrate(run, steps_this_call, calib_t0)
                if state.step % cfg.train.log_every == 0 or it == spe or state.step >= run.plan.total_steps:
                    _log_step(run, outcome, epoch)
                stop = run.stop_signal or outcome.signalled or (max_steps is not None and steps_this_call >= max_steps)
                if cfg.train.save_every_steps and state.step % cfg.train.save_every_steps == 0 and it < spe:
                    _read_point(run)
                    stop = stop or run.stop_signal
                    state.save(epoch_done=False)
                run.stopped_by_signal = run.stop_signal or outcome.signalled
                if it == spe or state.step >= run.plan.total_steps or stop:
                    break
                t_data = time.perf_counter()
            _read_point(run)  # the checkpoint below holds the counts of every step so far
            run.stopped_by_signal = run.stopped_by_signal or run.stop_signal
            _end_of_epoch_or_stop(run, epoch_done=it == spe or state.step >= run.plan.total_steps)
            if run.stopped_by_signal:
                log.warning("received signal %s: checkpoint written to %s, exiting; rerun the same command to "
                            "resume", sig.raised if sig.raised is not None else "(on another rank)", state.path)
                break
            if max_steps is not None and steps_this_call >= max_steps:
                break
    run.bar.close()


def _step(run: _Run, batch, it: int, sig: _SignalFlag):
    """One training step on a batch of the loader (its images on the device, the rest on the
    host): its augmentation parameters, drawn on the host, then ``train_step``."""
    cfg, state, L = run.cfg, run.state, run.learner
    if batch.skipped and run.world == 1:
        state.skipped_files += len(batch.skipped)
        for s in batch.skipped:
            log.warning("skipped %s: %s", _printable(s.path), _printable(s.reason))
    rank_idx = run.loader.rank_batch_indices(it)
    if len(batch) == 0:
        raise RuntimeError(f"every image of step {state.step} on rank {run.rank} was unusable; "
                           "clean the data source (see the warnings above)")
    # augmentation parameters of the whole global batch, this rank's slice (host tensors: the
    # crops are planned on the host from them and the images' sizes)
    gb, b = cfg.train.batch_size, cfg.train.batch_size // run.world
    gen = torch.Generator().manual_seed(_step_seed(cfg.train.seed, state.step))
    params = slice_params(L.multicrop.sample_params(gb, gen), run.rank * b, (run.rank + 1) * b)
    if len(batch) != len(rank_idx):
        keep = torch.isin(rank_idx, batch.indices)
        params = {k: v[keep] for k, v in params.items()}
    outcome = swav_step.train_step(L, batch.images, batch.sizes, params, run.plan.lr(state.step),
                                   freeze_prototypes=run.plan.freezes_prototypes(state.step),
                                   signalled=sig.raised is not None, skipped_files=len(batch.skipped),
                                   step=state.step)
    if outcome.group_flags is not None:  # in a group: summed over ranks on the device, read at _read_point
        run.group_flags = outcome.group_flags if run.group_flags is None else run.group_flags + outcome.group_flags
        run.pending_skipped.extend(batch.skipped)
    state.step += 1
    run.window["images"] += outcome.batch_size * run.world
    return outcome


def _read_point(run: _Run) -> None:
    """The host reads of the steps since the last one (once per step at most): the NaN guard's
    count (a warning per skipped step; NonFiniteError after ``train.nan_patience`` in a row), and
    in a group every rank's stop signals and unusable files (each rank reads at the same steps, so
    all stop at the same one)."""
    state = run.state
    if run.read_at == state.step:
        return
    run.read_at = state.step
    try:
        n_bad, last, causes = run.learner.nan_guard.read()
    finally:
        if run.world > 1:
            _read_group_flags(run)
    if n_bad:
        others = f"; {n_bad - 1} more since the last log line" if n_bad > 1 else ""
        log.warning("step %d: non-finite %s, step skipped and undone (%d in a row%s)", last + 1,
                    " and ".join(causes) or "value on another rank", run.learner.nan_guard.consecutive, others)


def _read_group_flags(run: _Run) -> None:
    """In a group: stop signals and unusable files of every rank since the last read."""
    state = run.state
    signals, n_skipped = (0, 0) if run.group_flags is None else (int(v) for v in run.group_flags.cpu())
    run.group_flags = None
    run.stop_signal = run.stop_signal or signals > 0
    if n_skipped > 0:  # every rank's skipped files go to rank 0's log
        state.skipped_files += n_skipped
        for s in (r for recs in dist_utils.gather_objects(run.pending_skipped) for r in recs):
            log.warning("skipped %s: %s", _printable(s.path), _printable(s.reason))
    run.pending_skipped = []


def _calibrate(run: _Run, steps_this_call: int, t0: float | None) -> float | None:
    """Time budget: after 2 warm-up steps, time ``CALIBRATION_STEPS`` steps and fit the step count
    provisionally (so the learning-rate schedule is the fitted one almost from the start), then time
    the whole ``refit_window()`` (data loading and logging included) and fit it for good. Every rank
    refits at the same step (the window comes from the agreed count). Returns the timer's start."""
    if steps_this_call == 2:
        run.refit_at = None
        synchronize(run.learner.device)  # the device may run behind the host: time what it did
        return time.perf_counter()
    if t0 is None:
        return None
    timed = steps_this_call - 2
    if timed in (CALIBRATION_STEPS, run.refit_at):
        synchronize(run.learner.device)
    if timed == CALIBRATION_STEPS:
        _fit_budget(run, (time.perf_counter() - t0) / timed, timed, final=False)
        run.refit_at = run.plan.refit_window()
        if run.state.step + run.refit_at - timed >= run.plan.total_steps:
            run.plan.budget_fitted = True  # too short a run to time it again: the first fit is final
    elif timed == run.refit_at:
        _fit_budget(run, (time.perf_counter() - t0) / timed, timed, final=True)
    return t0


def _fit_budget(run: _Run, seconds_per_step: float, timed: int, final: bool) -> None:
    plan = run.plan
    agree = dist_utils.broadcast_object if run.world > 1 else (lambda n: n)
    plan.fit(seconds_per_step, agree, final=final)
    run.bar.total = plan.total_steps
    run.state.record.seconds_per_step = seconds_per_step
    log.info("time budget %.1f min at %.3f s/step (%s, over %d steps): training %d epoch(s) (%d steps, "
             "%.2f epochs)", run.cfg.train.time_budget_minutes, seconds_per_step,
             "final" if final else "first fit", timed,
             plan.epochs, plan.total_steps, plan.total_steps / plan.steps_per_epoch)


def _log_step(run: _Run, outcome, epoch: int) -> None:
    """A metrics record, the progress bar and the collapse watch: with ``_read_point``, the only
    host reads of device values in training."""
    _read_point(run)
    state, w = run.state, run.window
    run.last_loss = float(dist_utils.all_reduce_mean(outcome.loss).item())  # over ranks
    now = time.perf_counter()
    dt = max(now - w["t"], 1e-9)
    stats = assignment_stats(outcome.codes[0][0][-outcome.batch_size:], as_float=True)
    queue = run.learner.queue
    rec = {"epoch": state.step / run.plan.steps_per_epoch, "loss": run.last_loss,
           "lr": float(run.plan.schedule[state.step - 1]), "images_per_s": w["images"] / dt,
           "data_time_fraction": w["data_time"] / dt, "prototype_usage": stats["prototype_usage"],
           "assignment_entropy": stats["assignment_entropy"], "usage_entropy": stats["usage_entropy"],
           "queue_in_use": int(queue is not None and queue.in_use), "skipped_files": state.skipped_files,
           "nonfinite_steps": run.learner.nan_guard.bad_steps_total}
    run.metrics.write(state.step, **rec)
    run.bar.update(state.step, epoch=epoch + 1, loss=run.last_loss, img_s=w["images"] / dt)
    warn = run.collapse.update(state.step, run.last_loss, stats["prototype_usage"])
    if warn:
        log.warning(warn)
    run.window = {"t": now, "images": 0, "data_time": 0.0}


def _end_of_epoch_or_stop(run: _Run, epoch_done: bool) -> None:
    """The checkpoint; at an epoch's end the log line and the online kNN."""
    state, cfg = run.state, run.cfg
    if state.step >= run.plan.total_steps and cfg.train.recompute_bn_images > 0:
        _recompute_batchnorm(run)
    state.save(epoch_done=epoch_done)
    if not epoch_done:
        return
    ep_done = -(-state.step // run.plan.steps_per_epoch)  # a cut-short last epoch counts as done
    log.info("epoch %d/%d done: loss %.4f", ep_done, run.plan.epochs, run.last_loss)
    if cfg.train.knn_every and ep_done % cfg.train.knn_every == 0 and dist_utils.is_main():
        res = knn_of_backbone(run.learner.raw_model.backbone, run.eval_data, run.learner.device,
                              cfg.train.knn_max_train, cfg.train.knn_k)
        run.metrics.write(state.step, **{k: v for k, v in res.items() if isinstance(v, float)})
        log.info("online kNN: %s", res)


def _recompute_batchnorm(run: _Run) -> None:
    """After the last step, before the final checkpoint: the backbone's BatchNorm statistics from
    ``train.recompute_bn_images`` training images under the evaluation transform (built-ins whole,
    image files resized and centre-cropped), chosen by the run's seed. Every rank takes the same
    images, so a synchronised BatchNorm agrees."""
    cfg, L = run.cfg, run.learner
    dataset = run.loader.dataset
    n = min(cfg.train.recompute_bn_images, len(dataset))
    idx = np.sort(np.random.default_rng(cfg.train.seed).permutation(len(dataset))[:n])
    t0 = time.perf_counter()
    seen = recompute_batchnorm(L.raw_model.backbone, run.eval_data.batches(dataset, idx),
                               run.eval_data.transform(dataset).to(L.device), L.device)
    log.info("BatchNorm statistics of the backbone recomputed on %d whole training images (%.1f s)",
             seen, time.perf_counter() - t0)


FINAL_NAME = "final"  # RUN/eval/final.json: the closing comparison


def _final_comparison(run: _Run) -> Comparison:
    """Learned backbone, the same network at initialisation and the raw pixels under one protocol
    (kNN and a linear probe on frozen features), saved as RUN/eval/final.json and in metrics.jsonl."""
    cfg, state, device = run.cfg, run.state, run.learner.device
    t0 = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    init = build_model(cfg).backbone.to(device)
    c = compare_features(run.learner.raw_model.backbone, init, run.eval_data, device, k=cfg.train.knn_k,
                         max_train=cfg.train.knn_max_train, linear_epochs=cfg.train.final_linear_epochs,
                         seed=cfg.train.seed)
    knn, lin = f"knn_top1@{c.k}", "linear_top1"
    pick = {s: {knn: c.knn[s], **({lin: c.linear[s]} if s in c.linear else {})} for s in c.knn}
    record = make_record(f"swav pretrain (final comparison, train.final_knn: kNN k={c.k}, linear probe "
                         f"{c.linear_epochs} epochs on frozen features)", pick["learned"], pick["init"],
                         f"{cfg.data.source} test split", state.path, time.perf_counter() - t0)
    record.update(baseline="raw pixels", baseline_metrics=pick["pixels"], verdict=c.verdict)
    write_result(record, state.out / "eval" / f"{FINAL_NAME}.json")
    run.metrics.write(state.step, **{f"final_{k}": v for k, v in pick["learned"].items()},
                      **{f"init_{k}": v for k, v in pick["init"].items()},
                      **{f"pixels_{k}": v for k, v in pick["pixels"].items()})
    return c


def _finish(run: _Run, t_start: float) -> RunResult:
    """The final comparison of a finished run, then the result."""
    cfg, state = run.cfg, run.state
    final = None
    finished = state.step >= run.plan.total_steps
    if finished and cfg.train.final_knn and dist_utils.is_main():
        final = _final_comparison(run)
    run.metrics.close()
    state.save_record(finished=finished, stopped_by_signal=run.stopped_by_signal)
    dist_utils.barrier()
    return RunResult(state.out, run.plan.epochs, state.step, run.last_loss, time.time() - t_start, final,
                     run.stopped_by_signal, is_main=dist_utils.is_main())
