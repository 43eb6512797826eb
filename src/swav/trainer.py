"""The one SwAV training loop: one process on CPU or one GPU, or many through torchrun.

Everything random in a step is derived from (seed, epoch) for the data order and (seed, step) for
the augmentation, drawn for the whole global batch and sliced per rank: a run resumed from a
checkpoint, or run on another number of processes with the same global batch, sees the same
images and crops.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from swav import __version__
from swav import distributed as dist_utils
from swav.config import Config, ConfigError, diff_configs, from_dict, save_yaml, to_dict, validate
from swav.data.datasets import build_dataset
from swav.data.loader import EpochLoader
from swav.data.multicrop import EvalTransform, MultiCrop, slice_params
from swav.loss import swav_loss
from swav.models import SwAVModel, create_backbone
from swav.monitor import (CollapseWatch, MetricsWriter, NaNGuard, ProgressBar, assignment_stats,
                          setup_logging)
from swav.optim import build_optimizer, cosine_schedule, set_lr
from swav.queue import FeatureQueue
from swav.checkpoint import CHECKPOINT_NAME, link_atomic, load_run_state, save_atomic

__all__ = ["train", "build_model", "RunResult", "ResumeMismatchError", "knn_of_backbone"]

log = logging.getLogger("swav")

CALIBRATION_STEPS = 8  # steps timed before fitting the epoch count to a time budget


class ResumeMismatchError(ConfigError):
    """The run folder holds a checkpoint made with another configuration."""


@dataclass
class RunResult:
    out_dir: Path
    epochs: int
    global_step: int
    last_loss: float
    seconds: float
    knn: dict | None = None  # {"learned": {...}, "init": {...}} when train.final_knn
    stopped_by_signal: bool = False
    is_main: bool = True  # this process is rank 0 (prints and writes the report)


def build_model(cfg: Config) -> SwAVModel:
    """The SwAV network of a config (deterministic given torch's RNG state)."""
    m = cfg.model
    backbone = create_backbone(m.arch, width_per_group=m.width_per_group, widen=m.widen,
                               in_chans=m.in_chans, small_stem=m.small_stem)
    return SwAVModel(backbone, hidden_mlp=m.hidden_mlp, feat_dim=m.feat_dim, nmb_prototypes=m.nmb_prototypes)


def build_multicrop(cfg: Config) -> MultiCrop:
    """The configured multi-crop augmentation (on CPU; move it with ``.to(device)``)."""
    a = cfg.augment
    return MultiCrop(a.size_crops, a.nmb_crops, a.min_scale_crops, a.max_scale_crops, a.flip_prob,
                     a.jitter_strength, a.jitter_prob, a.grayscale_prob, a.blur_prob, tuple(a.blur_sigma),
                     tuple(a.mean), tuple(a.std), in_chans=cfg.model.in_chans,
                     channels_last=cfg.train.channels_last)


def check_precision(precision: str, device: torch.device) -> None:
    """Raise ConfigError when ``precision`` (resolved) cannot run on ``device``."""
    if precision == "fp16" and device.type != "cuda" and not hasattr(torch.amp, "GradScaler"):
        raise ConfigError([f"train.precision = fp16 off a CUDA GPU needs torch >= 2.3 (a CPU GradScaler; this is "
                           f"{torch.__version__}); use bf16 or fp32"])


def build_training_state(cfg: Config, device: torch.device, world: int, precision: str):
    """``(model, optimizer, scaler)`` of a run, seeded: the model on ``device`` (SyncBatchNorm
    over ``world`` > 1 processes, channels_last as configured), the configured optimizer, and a
    GradScaler for fp16 (else None)."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    if world > 1 and cfg.model.sync_bn:
        model = dist_utils.convert_sync_batchnorm(model, device.type)
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim.optimizer, cfg.optim.lr, cfg.optim.weight_decay,
                                cfg.optim.momentum, cfg.optim.lars_eta, cfg.optim.exclude_bias_and_bn)
    scaler = None
    if precision == "fp16":  # loss scaling; torch < 2.3 has only the CUDA one
        scaler = torch.amp.GradScaler(device.type) if hasattr(torch.amp, "GradScaler") else torch.cuda.amp.GradScaler()
    return model, optimizer, scaler


def pick_device(spec: str, env: dist_utils.DistEnv) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device = {spec!r} but no CUDA GPU is visible; use --device cpu")
        if spec == "cuda":
            return torch.device("cuda", env.local_rank if env.is_distributed else torch.cuda.current_device())
    return torch.device(spec)


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 12345) % (2**63 - 1)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the hardware computes it natively, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    if device.type == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "fp32"
        return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"
    return "fp32"


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _eval_transform(cfg: Config, dataset) -> EvalTransform:
    """Resize + center-crop for image folders; the native size for fixed-size built-ins."""
    size = cfg.augment.size_crops[0]
    fixed = hasattr(dataset, "get_batch")  # in-memory built-in of one image size
    return EvalTransform(size, cfg.augment.mean, cfg.augment.std, resize=not fixed)


def _features(backbone, dataset, cfg: Config, device, limit: int = 0):
    from swav.eval.features import extract_features

    if limit and len(dataset) > limit:
        dataset = dataset.subset(limit)
    loader = EpochLoader(dataset, min(256, len(dataset)), seed=0, epoch=0, shuffle=False, drop_last=False,
                         workers=cfg.data.workers)
    return extract_features(backbone, loader, _eval_transform(cfg, dataset).to(device), device)


def knn_of_backbone(backbone, cfg: Config, device, train_set=None, test_set=None, ks=None) -> dict:
    """Weighted kNN top-1/top-5 of ``backbone`` features: train split as memory, test split as queries."""
    from swav.eval.knn import knn_accuracy

    if train_set is None:
        train_set = _labelled_split(cfg, "train")
    if test_set is None:
        test_set = _labelled_split(cfg, "test")
    ftr, ltr, _ = _features(backbone, train_set, cfg, device, cfg.train.knn_max_train)
    fte, lte, _ = _features(backbone, test_set, cfg, device)
    num_classes = int(max(ltr.max(), lte.max())) + 1
    return knn_accuracy(ftr, ltr, fte, lte, num_classes, ks=ks or (cfg.train.knn_k,))


def _labelled_split(cfg: Config, split: str):
    ds = build_dataset(cfg.data.source, split, in_chans=cfg.model.in_chans, root=cfg.data.root,
                       download=cfg.data.download, min_size=cfg.data.min_size, max_side=cfg.data.max_side)
    if not getattr(ds, "has_labels", False):
        raise ValueError(f"kNN needs labels, and the {split} split of {cfg.data.source!r} has none")
    return ds


def _printable(text: str) -> str:
    """``text`` safe for every log stream: bytes of a file name that are not UTF-8 (kept by
    ``os.fsdecode`` as lone surrogates, which a UTF-8 log file cannot encode) shown as ``\\xNN``."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _preflight(cfg: Config, max_steps: int | None) -> None:
    """Checks that need the file system or the call, done before anything is written."""
    from swav.data import builtin

    problems = []
    if max_steps is not None and max_steps < 1:
        problems.append(f"max_steps (--max-steps) = {max_steps} must be >= 1")
    if cfg.model.in_chans not in (1, 3):
        problems.append(f"model.in_chans = {cfg.model.in_chans} must be 1 (grey) or 3 (colour)")
    src = str(cfg.data.source)
    if src.strip() and builtin.canonical_name(src) is None and not os.path.exists(src):
        problems.append(f"data.source = {src!r} is neither a built-in data set ({', '.join(builtin.BUILTIN_NAMES)}) "
                        "nor an existing folder of images or file list")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        problems.append(f"out = {str(out)!r} exists and is not a folder")
    if problems:
        raise ConfigError(problems)


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


def _fit_steps_to_budget(cfg: Config, seconds_per_step: float, steps_per_epoch: int) -> int:
    """Optimisation steps that fit ``train.time_budget_minutes`` at the measured speed: at least
    one whole epoch, at most ``train.epochs``; the last epoch may be cut short, so a recipe whose
    epoch takes a third of the budget still trains for the whole budget (not two thirds of it)."""
    budget = cfg.train.time_budget_minutes * 60.0
    fitted = int(budget // max(seconds_per_step, 1e-9))
    return max(steps_per_epoch, min(cfg.train.epochs * steps_per_epoch, fitted))


def _stretch(cfg: Config, total_steps: int, steps_per_epoch: int) -> float:
    """Fraction of the configured length that is trained: 1 without a time budget. When a budget
    fits fewer steps, warmup and prototype freezing shrink in proportion (the recipe's shape is
    kept; a 1-epoch warmup in a 2-epoch run would leave no time to learn)."""
    return min(1.0, total_steps / (cfg.train.epochs * steps_per_epoch))


def _schedule(cfg: Config, total_steps: int, steps_per_epoch: int):
    o = cfg.optim
    epochs = total_steps / steps_per_epoch  # fractional when a budget cuts the last epoch short
    warmup = min(o.warmup_epochs * _stretch(cfg, total_steps, steps_per_epoch), epochs)
    return cosine_schedule(o.lr, o.final_lr, epochs, steps_per_epoch, warmup, o.start_warmup)


def _freeze_steps(cfg: Config, total_steps: int, steps_per_epoch: int) -> int:
    return int(round(cfg.swav.freeze_prototypes_epochs * _stretch(cfg, total_steps, steps_per_epoch)
                     * steps_per_epoch))


def train(cfg: Config, *, max_steps: int | None = None) -> RunResult:
    """Pretrain with SwAV as ``cfg`` says, writing everything into ``cfg.out``.

    Resumes automatically from ``cfg.out/checkpoint.pt`` when it exists and its config matches
    (a mismatch raises ResumeMismatchError naming the fields). ``max_steps`` stops after that
    many steps in this call (for tests and benchmarks); the checkpoint is written first.
    """
    t_start = time.time()
    env = dist_utils.read_env()
    # every setting is checked before anything is started or written
    warnings = validate(cfg, world_size=env.world_size)
    _preflight(cfg, max_steps)
    device_type = "cuda" if (cfg.train.device.startswith("cuda") or
                             (cfg.train.device == "auto" and torch.cuda.is_available())) else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {cfg.train.device!r} but no CUDA GPU is visible; use --device cpu")
    if env.is_distributed and not dist_utils.is_dist():
        env = dist_utils.init_distributed(device_type)
        try:  # the group this call created is destroyed on the way out, whatever happens:
            # a gloo group left to the interpreter's exit can abort the process (SIGABRT)
            return _train_in_group(cfg, env, max_steps, t_start, warnings)
        finally:
            dist_utils.cleanup()
    return _train_in_group(cfg, env, max_steps, t_start, warnings)


def _train_in_group(cfg: Config, env, max_steps: int | None, t_start: float, warnings: list[str]) -> RunResult:
    rank, world = env.rank, env.world_size
    device = pick_device(cfg.train.device, env)
    out = Path(cfg.out)
    precision = resolve_precision(cfg.train.precision, device)
    check_precision(precision, device)
    if dist_utils.is_main():
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".checkpoint*.pt.tmp*"):  # left by a process killed mid-write
            stale.unlink()
    dist_utils.barrier()
    logger = setup_logging(out, rank)
    for w in warnings:
        logger.warning("config: %s", w)

    # ---- resume or start -------------------------------------------------------------
    ckpt_path = out / CHECKPOINT_NAME
    state = load_run_state(ckpt_path) if ckpt_path.exists() else None
    if state is not None:
        saved = from_dict(state["config"])
        diffs = diff_configs(saved, cfg)
        if diffs:
            raise ResumeMismatchError(
                [f"{ckpt_path} was written with another configuration; resume it with the same settings, "
                 "or choose another --out:"] + diffs)
    if dist_utils.is_main():
        save_yaml(cfg, out / "config.yaml")

    # ---- data ------------------------------------------------------------------------
    gb = cfg.train.batch_size
    b = gb // world
    try:  # a source that cannot be used is a configuration error (exit code 2), named as such
        dataset = build_dataset(cfg.data.source, "train", in_chans=cfg.model.in_chans, root=cfg.data.root,
                                download=cfg.data.download, subset=cfg.data.subset, min_size=cfg.data.min_size,
                                max_side=cfg.data.max_side)
        loader = EpochLoader(dataset, gb, seed=cfg.train.seed, epoch=0, rank=rank, world_size=world,
                             workers=cfg.data.workers, pin_memory=device.type == "cuda")
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"data.source = {str(cfg.data.source)!r}: {e}") from None
    if (cfg.train.knn_every or cfg.train.final_knn) and not hasattr(dataset, "get_batch"):
        try:  # the kNN monitor needs labelled train and test splits: fail now, not after training
            for split in ("train", "test"):
                _labelled_split(cfg, split)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"train.knn_every / train.final_knn need labelled train and test splits of "
                              f"data.source: {e}; for unlabelled images set train.final_knn=false and "
                              "train.knn_every=0") from None
    spe = loader.steps_per_epoch
    multicrop = build_multicrop(cfg).to(device)

    # ---- model, optimizer, queue -----------------------------------------------------
    model, optimizer, scaler = build_training_state(cfg, device, world, precision)
    epochs = cfg.train.epochs
    total_steps = epochs * spe  # a time budget may lower it, and cut the last epoch short
    start_step = 0
    queue = None
    nan_guard = NaNGuard(cfg.train.nan_patience)
    skipped_total = 0
    n_assign = len(cfg.swav.crops_for_assign)
    q_local = cfg.swav.queue_length // world if cfg.swav.queue_length > 0 else 0
    budget_fitted = cfg.train.time_budget_minutes <= 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epochs = int(state["epochs"])
        total_steps = int(state.get("total_steps", epochs * spe))
        start_step = int(state["global_step"])
        # stopped before the time budget was fitted (first steps): the resumed run fits it
        budget_fitted = bool(state.get("budget_fitted", True))
        skipped_total = int(state.get("skipped_files", 0))
        nan_guard.bad_steps_total = int(state.get("nonfinite_steps", 0))
        if state.get("queue") is not None:
            queue = FeatureQueue(n_assign, q_local, cfg.model.feat_dim, device=device)
            queue.load_global_state_dict(state["queue"], rank, world)
        logger.info("resumed from %s at step %d (epoch %d); it was written by %d process(es), now %d",
                    ckpt_path, start_step, start_step // spe, int(state.get("world_size", 1)), world)
        del state
    raw_model = model
    # A skipped (non-finite) step must leave the state as it was; BatchNorm running statistics are
    # updated during the forward pass, before the loss is known, so they are copied before each
    # step and put back when the step is skipped (a few KB per step, no host sync).
    buffers = list(raw_model.buffers())
    float_buffers = [t for t in buffers if t.is_floating_point()]
    buffer_copy = [t.detach().clone() for t in buffers]
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        broadcast_buffers=False)
    if cfg.train.compile:
        model = torch.compile(model)
    freeze_steps = _freeze_steps(cfg, total_steps, spe)
    schedule = _schedule(cfg, total_steps, spe)

    metrics = MetricsWriter(out, enabled=dist_utils.is_main())
    nmb = raw_model.prototypes.nmb_prototypes
    collapse = CollapseWatch(nmb[0] if isinstance(nmb, list) else nmb)
    n_params = sum(p.numel() for p in raw_model.parameters())
    logger.info("swav %s | %s | %d process(es) on %s (%s) | %s: %d images, %d steps/epoch of %d (per process %d) "
                "| %s %.1fM parameters | crops %s", __version__, socket.gethostname(), world, device,
                precision, cfg.data.source, len(dataset), spe, gb, b, cfg.model.arch, n_params / 1e6,
                " + ".join(f"{n}x{s}" for n, s in zip(cfg.augment.nmb_crops, cfg.augment.size_crops)))

    step = start_step
    last_loss = float("nan")
    t_window, imgs_window, data_time_window = time.perf_counter(), 0, 0.0
    calib_t0 = None
    bar = ProgressBar(total_steps, enabled=dist_utils.is_main(), every=cfg.train.log_every)
    stopped_by_signal = False
    signal_stop = False
    steps_this_call = 0

    def save(epoch_done: bool):
        qstate = queue.global_state_dict() if queue is not None else None
        if not dist_utils.is_main():
            return
        st = {
            "format": "swav-run/1", "version": __version__, "config": to_dict(cfg), "epochs": epochs,
            "total_steps": total_steps, "budget_fitted": budget_fitted, "global_step": step,
            "world_size": world, "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
            "queue": qstate, "skipped_files": skipped_total, "nonfinite_steps": nan_guard.bad_steps_total,
            "rng": {"torch": torch.get_rng_state()},
        }
        ep = -(-step // spe)  # epochs begun; at an epoch end (a cut-short last one too) the epochs done
        keep = out / f"checkpoint-epoch{ep}.pt" if epoch_done and (
            ep % cfg.train.checkpoint_every == 0 or ep == epochs) else None
        try:
            if keep is None:
                save_atomic(st, ckpt_path)
            else:
                # the kept copy first, then checkpoint.pt as a second name of the same file: killed in
                # between, checkpoint.pt still holds the previous save and the resumed run writes both
                save_atomic(st, keep)
                try:
                    link_atomic(keep, ckpt_path)
                except OSError:  # a file system without hard links: write it again
                    save_atomic(st, ckpt_path)
        except OSError as e:
            logger.error("%s", e)
            raise

    with _SignalFlag() as sig:
        while step < total_steps:
            epoch, it = divmod(step, spe)
            if queue is None and q_local > 0 and epoch >= cfg.swav.epoch_queue_starts:
                queue = FeatureQueue(n_assign, q_local, cfg.model.feat_dim, device=device)
            loader.set_epoch(epoch, it)
            t_data = time.perf_counter()
            for batch in loader:
                data_time_window += time.perf_counter() - t_data
                if batch.skipped and world == 1:
                    skipped_total += len(batch.skipped)
                    for s in batch.skipped:
                        logger.warning("skipped %s: %s", _printable(s.path), _printable(s.reason))
                rank_idx = loader.rank_batch_indices(it)
                if len(batch) == 0:
                    raise RuntimeError(f"every image of step {step} on rank {rank} was unusable; "
                                       "clean the data source (see the warnings above)")
                # augmentation parameters of the whole global batch, this rank's slice
                gen = torch.Generator().manual_seed(_step_seed(cfg.train.seed, step))
                params = slice_params(multicrop.sample_params(gb, gen), rank * b, (rank + 1) * b)
                if len(batch) != len(rank_idx):
                    keep = torch.isin(rank_idx, batch.indices)
                    params = {k: v[keep] for k, v in params.items()}
                params = {k: v.to(device, non_blocking=True) for k, v in params.items()}
                images = batch.images.to(device, non_blocking=True)
                sizes = batch.sizes.to(device, non_blocking=True)
                bl = images.shape[0]

                crops = multicrop(images, sizes, params)
                set_lr(optimizer, float(schedule[step]))
                raw_model.prototypes.normalize_()
                torch._foreach_copy_(buffer_copy, buffers)
                queue_tail = (queue.buffer[:, -bl:].clone(), queue.in_use) if queue is not None else None
                with _autocast(device, precision):
                    z, scores = model(crops)
                loss, full = swav_loss(scores, z.detach().float(), raw_model.prototypes.weights()
                                       if raw_model.prototypes.multi else raw_model.prototypes.weight,
                                       bl, cfg.swav.crops_for_assign, temperature=cfg.swav.temperature,
                                       epsilon=cfg.swav.epsilon, iterations=cfg.swav.sinkhorn_iterations,
                                       queue=queue)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if step < freeze_steps:
                    raw_model.prototypes.drop_grad_()
                # non-finite BatchNorm statistics make the step bad too; in a process group every
                # rank must take the same decisions (step or skip, stop on a signal), so the flags
                # are summed over ranks (one small all-reduce, read at the NaN guard's host sync)
                buffers_ok = torch.isfinite(torch.stack(torch._foreach_norm(float_buffers, math.inf))).all() \
                    if float_buffers else torch.ones((), dtype=torch.bool, device=device)
                guard_loss = loss.detach().float()
                if world > 1:
                    flags = dist_utils.all_reduce_sum(torch.stack([
                        (~(torch.isfinite(guard_loss) & buffers_ok)).float(),
                        torch.full((), float(sig.raised is not None), device=device),
                        torch.full((), float(len(batch.skipped)), device=device)]))
                    guard_loss = guard_loss + torch.where(flags[0] > 0, float("nan"), 0.0)
                else:
                    guard_loss = guard_loss + torch.where(buffers_ok, 0.0, float("nan"))
                # fp16 loss scaling: non-finite gradients under a finite loss are an overflow of the
                # scale, which GradScaler handles (scaler.step skips the update, update() halves the
                # scale), as apex does: not a bad step. Only once the scale is below 1 do non-finite
                # gradients mean the gradients themselves overflow.
                grads_to_check = () if scaler is not None and scaler.get_scale() >= 1.0 else raw_model
                if nan_guard.check(guard_loss, grads_to_check):
                    if scaler is not None:
                        scaler.step(optimizer)
                    else:
                        optimizer.step()
                else:
                    causes = [name for name, ok in (("loss", torch.isfinite(loss.detach()).all()),
                                                    ("BatchNorm statistics", buffers_ok)) if not bool(ok)]
                    logger.warning("step %d: non-finite %s, step skipped and undone (%d in a row)", step,
                                   " and ".join(causes) or ("gradients" if world == 1 else "gradients or a value "
                                                            "on another rank"), nan_guard.consecutive)
                    optimizer.zero_grad(set_to_none=True)
                    torch._foreach_copy_(buffers, buffer_copy)
                    if queue_tail is not None:  # undo this step's push: shift back, restore the oldest rows
                        tail, in_use = queue_tail
                        n = tail.shape[1]
                        queue.buffer[:, :-n] = queue.buffer[:, n:].clone()
                        queue.buffer[:, -n:] = tail
                        queue.in_use = in_use
                if world > 1:
                    _, n_signal, n_skipped = flags.tolist()  # computed before the guard's sync: no wait
                    signal_stop = n_signal > 0
                    if n_skipped > 0:  # every rank's skipped files go to rank 0's log
                        skipped_total += int(n_skipped)
                        for s in (r for recs in dist_utils.gather_objects(batch.skipped) for r in recs):
                            logger.warning("skipped %s: %s", _printable(s.path), _printable(s.reason))
                else:
                    signal_stop = sig.raised is not None
                if scaler is not None:
                    scaler.update()
                step += 1
                it += 1
                steps_this_call += 1
                imgs_window += bl * world

                # ---- time budget: fit the step count once the speed is known -------------
                if not budget_fitted:
                    if steps_this_call == 2:
                        calib_t0 = time.perf_counter()
                    elif steps_this_call == 2 + CALIBRATION_STEPS:
                        sec = (time.perf_counter() - calib_t0) / CALIBRATION_STEPS
                        fitted = _fit_steps_to_budget(cfg, sec, spe)
                        if world > 1:
                            fitted = dist_utils.broadcast_object(fitted)
                        total_steps = fitted
                        epochs = -(-total_steps // spe)  # the last one may be cut short
                        schedule = _schedule(cfg, total_steps, spe)
                        freeze_steps = _freeze_steps(cfg, total_steps, spe)
                        bar.total = total_steps
                        budget_fitted = True
                        logger.info("time budget %.1f min at %.3f s/step: training %d epoch(s) (%d steps, "
                                    "%.2f epochs)", cfg.train.time_budget_minutes, sec, epochs, total_steps,
                                    total_steps / spe)

                # ---- logging (the only host syncs besides the NaN guard) --------------------
                if step % cfg.train.log_every == 0 or it == spe or step >= total_steps:
                    last_loss = float(dist_utils.all_reduce_mean(loss.detach()).item())  # over ranks
                    now = time.perf_counter()
                    dt = max(now - t_window, 1e-9)
                    stats = assignment_stats(full[0][0][-bl:], as_float=True)
                    rec = {"epoch": step / spe, "loss": last_loss, "lr": float(schedule[step - 1]),
                           "images_per_s": imgs_window / dt, "data_time_fraction": data_time_window / dt,
                           "prototype_usage": stats["prototype_usage"],
                           "assignment_entropy": stats["assignment_entropy"],
                           "usage_entropy": stats["usage_entropy"], "queue_in_use": int(queue is not None
                                                                                       and queue.in_use),
                           "skipped_files": skipped_total, "nonfinite_steps": nan_guard.bad_steps_total}
                    metrics.write(step, **rec)
                    bar.update(step, epoch=epoch + 1, loss=last_loss, img_s=imgs_window / dt)
                    warn = collapse.update(step, last_loss, stats["prototype_usage"])
                    if warn:
                        logger.warning(warn)
                    t_window, imgs_window, data_time_window = now, 0, 0.0

                stop = signal_stop or (max_steps is not None and steps_this_call >= max_steps)
                if cfg.train.save_every_steps and step % cfg.train.save_every_steps == 0 and it < spe:
                    save(epoch_done=False)
                if it == spe or step >= total_steps or stop:
                    break
                t_data = time.perf_counter()
            epoch_done = it == spe or step >= total_steps
            save(epoch_done=epoch_done)
            if epoch_done:
                ep_done = -(-step // spe)  # a cut-short last epoch counts as done
                logger.info("epoch %d/%d done: loss %.4f", ep_done, epochs, last_loss)
                if cfg.train.knn_every and ep_done % cfg.train.knn_every == 0 and dist_utils.is_main():
                    res = knn_of_backbone(raw_model.backbone, cfg, device)
                    metrics.write(step, **{k: v for k, v in res.items() if isinstance(v, float)})
                    logger.info("online kNN: %s", res)
            if signal_stop:
                logger.warning("received signal %s: checkpoint written to %s, exiting; rerun the same "
                               "command to resume", sig.raised if sig.raised is not None else "(on another rank)",
                               ckpt_path)
                stopped_by_signal = True
                break
            if max_steps is not None and steps_this_call >= max_steps:
                break
    bar.close()

    knn = None
    finished = step >= total_steps
    if finished and cfg.train.final_knn and dist_utils.is_main():
        learned = knn_of_backbone(raw_model.backbone, cfg, device)
        torch.manual_seed(cfg.train.seed)
        init = knn_of_backbone(build_model(cfg).backbone.to(device), cfg, device)
        knn = {"learned": learned, "init": init}
        metrics.write(step, **{f"final_{k}": v for k, v in learned.items() if isinstance(v, float)},
                      **{f"init_{k}": v for k, v in init.items() if isinstance(v, float)})
    metrics.close()
    dist_utils.barrier()
    return RunResult(out, epochs, step, last_loss, time.time() - t_start, knn, stopped_by_signal,
                     is_main=dist_utils.is_main())
