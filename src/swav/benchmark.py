"""Speed of a SwAV training step, measured against the machine's own matrix-product rate.

``run_benchmark(cfg, steps=N)`` runs N training steps of a configuration with the library's own
step pieces (:class:`~swav.data.multicrop.MultiCrop`, :class:`~swav.models.SwAVModel`,
:func:`~swav.loss.compute_codes` + :func:`~swav.loss.swapped_prediction_loss` = ``swav_loss``, the
configured optimizer) and returns one flat-ish dict:

* images/s, and the time of a step split into phases: ``data`` (decode / load and the copy to the
  device), ``augment`` (multi-crop), ``forward``, ``sinkhorn`` (codes, queue scoring included),
  ``loss``, ``backward``, ``optimizer`` (learning rate, prototype normalisation, the update);
* peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak resident set);
* the model's arithmetic (convolutions, matrix products and attention counted per crop resolution
  with ``torch.utils.flop_counter``, see :func:`count_model_flops`) divided by the step time, as a fraction of the rate
  this device reaches on a large square matrix product timed in the same run
  (:func:`matmul_rate`), in fp32 and in the step's precision.

Measuring the phases needs a device synchronisation at each phase boundary (a no-op on CPU). On a
GPU the images/s figure therefore comes from a second, free-running set of steps with a single
synchronisation at its end; ``images_per_s_phased`` is the figure of the synchronised steps.

Without ``data`` the images are synthetic uint8 images already in memory on the device (a pool of
a few batches, shaped like the configured source), so the figure is the step itself; with a data
source the batches come from the same loader as training (workers, pinned memory).

Launched under ``torchrun`` the benchmark runs data-parallel like the trainer (gloo on CPU, NCCL
on GPU) and reports global images/s from rank 0.
"""
from __future__ import annotations

import contextlib
import math
import resource
import statistics
import sys
import time
from typing import Callable, Iterator

import torch
from torch import nn

from swav.build import build_multicrop
from swav.config import Config
from swav.device import synchronize as _sync
from swav.step import PHASES

__all__ = ["run_benchmark", "count_model_flops", "count_flops", "matmul_rate", "build_multicrop",
           "synthetic_images", "PHASES", "format_report"]


# --------------------------------------------------------------------------------------------
# FLOP counting
# --------------------------------------------------------------------------------------------
def _math_attention():
    """Attention through PyTorch's math kernel (matrix products) while counting: the fused CPU kernel
    (``_scaled_dot_product_flash_attention_for_cpu``) has no FLOP formula, so it would count 0."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: scaled_dot_product_attention is not fused on a CPU anyway
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of a convolution's backward: its forward's multiply-adds once for the input gradient and
    once for the weight gradient, each only when computed. torch's own formula (2.13-2.14) counts the
    weight gradient of a grouped convolution ``groups`` times over (a depthwise layer C times)."""
    forward_macs = math.prod(x_shape if transposed else grad_out_shape) * w_shape[1] * math.prod(w_shape[2:])
    return 2 * forward_macs * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _counter():
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop})


def _own_counts(counter, root: str) -> list[tuple[str, int]]:
    """``(module name, FLOPs of its own operations)`` of every module that did arithmetic outside its
    submodules (a convolution, a linear layer, attention inside a block's forward), in call order; the
    root module is named by its class."""
    total = {k: sum(v.values()) for k, v in counter.get_flop_counts().items() if k != "Global"}
    out = []
    for k, flops in total.items():
        children = sum(v for c, v in total.items() if c.startswith(k + ".") and "." not in c[len(k) + 1:])
        if flops - children > 0:
            out.append((k[len(root) + 1:] if k.startswith(root + ".") else k, flops - children))
    return out


def count_flops(model: nn.Module, run: Callable[[], object]) -> dict:
    """Count the arithmetic of ``run()`` (which calls ``model``) and of its backward pass with
    ``torch.utils.flop_counter.FlopCounterMode``: every convolution, matrix product (linear layers,
    the prototypes) and attention (counted as its two matrix products, through the math kernel)
    inside the calls, whatever the module. FLOPs are 2 x multiply-adds. The backward pass is run on
    the sum of ``run()``'s tensors and counts what autograd computes: the weight gradients, and the
    input gradients only where the input needs them (not for the first layer, fed by the images),
    so a training step is not blindly 3 x forward. Batch norm, activations, pooling and the loss
    are not counted (memory bound and small in FLOPs). Returns ``{"forward_flops",
    "backward_flops", "layers"}``; ``layers`` lists ``(name, forward MACs)`` in call order. The
    parameters' ``.grad`` are left as they were."""
    grads = {p: p.grad for p in model.parameters()}
    try:
        with torch.enable_grad(), _math_attention():
            with _counter() as fwd:
                out = run()
            leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)
                      and t.requires_grad]
            with _counter() as bwd:
                if leaves:
                    torch.autograd.backward([t.float().sum() for t in leaves])
    finally:
        for p, g in grads.items():
            p.grad = g
    root = type(model).__name__
    return {"forward_flops": fwd.get_total_flops(), "backward_flops": bwd.get_total_flops(),
            "layers": [(name, flops // 2) for name, flops in _own_counts(fwd, root)]}


def count_model_flops(model: nn.Module, in_chans: int, size_crops, nmb_crops, batch_size: int,
                      device=None) -> dict:
    """FLOPs of one training step of a SwAV model on ``batch_size`` images with the given crops.

    Counted per crop resolution on a 2-image pass (eval mode, so batch norm statistics do not
    move; the shapes and the arithmetic are the same as in training) and scaled to the batch.
    Returns ``{"forward_flops", "train_flops", "per_image": {size: forward FLOPs of one crop}}``.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_image, fwd, train = {}, 0, 0
    try:
        for size, n in zip(size_crops, nmb_crops):
            if n == 0:
                continue
            x = torch.zeros(2, in_chans, size, size, device=device)
            c = count_flops(model, lambda: model([x]))
            per_image[int(size)] = c["forward_flops"] / 2
            fwd += n * batch_size * c["forward_flops"] / 2
            train += n * batch_size * (c["forward_flops"] + c["backward_flops"]) / 2
    finally:
        model.train(was_training)
    return {"forward_flops": fwd, "train_flops": train, "per_image": per_image}


# --------------------------------------------------------------------------------------------
# the device's own limit
# --------------------------------------------------------------------------------------------
def matmul_rate(device, dtype=torch.float32, n: int | None = None, min_time: float = 0.5,
                max_reps: int = 50, clock: Callable[[], float] = time.perf_counter) -> float:
    """FLOP/s of an ``n x n`` by ``n x n`` matrix product in ``dtype`` on ``device`` (best of
    repeated timings: on a shared machine the best is the machine's rate). ``n`` defaults to 2048
    on CPU and 8192 on GPU. ``clock=time.process_time`` gives FLOPs per CPU-second of this
    process (CPU only: insensitive to other processes sharing the cores)."""
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 2048
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.float32, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, dtype=torch.float32, generator=g).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    inner = 1 if device.type == "cpu" else 10
    torch.matmul(a, b, out=c)
    _sync(device)
    best, reps, t_start = float("inf"), 0, time.perf_counter()
    while reps < max_reps and (reps < 3 or time.perf_counter() - t_start < min_time):
        t0 = clock()
        for _ in range(inner):
            torch.matmul(a, b, out=c)
        _sync(device)
        best = min(best, (clock() - t0) / inner)
        reps += 1
    return 2.0 * n ** 3 / best


# --------------------------------------------------------------------------------------------
# the step's pieces, built as the trainer builds them
# --------------------------------------------------------------------------------------------
def synthetic_images(n: int, chans: int, height: int, width: int, device="cpu", seed: int = 0) -> torch.Tensor:
    """``n`` smooth-ish random uint8 images ``(n, chans, height, width)`` (blobs plus noise, so
    crops are not constant), made on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    low = torch.rand(n, chans, max(height // 4, 2), max(width // 4, 2), generator=g, device=device)
    img = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    img = img * 200 + torch.rand(n, chans, height, width, generator=g, device=device) * 55
    return img.to(torch.uint8)


def _image_shape(cfg: Config, image_size: int | None) -> tuple[int, int, int]:
    from swav.data import builtin

    c = cfg.model.in_chans
    if image_size:
        return c, image_size, image_size
    info = builtin.BUILTINS.get(builtin.canonical_name(str(cfg.data.source)) or "")
    if info is not None:
        _, h, w = info.shape
        return c, h, w
    side = int(round(max(cfg.augment.size_crops) / 0.875))  # 256 for 224-px crops
    return c, side, side


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process peak RSS"


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------
def run_benchmark(cfg: Config, *, steps: int = 10, warmup: int = 3, data: str | None = None,
                  image_size: int | None = None, matmul_n: int | None = None,
                  free_run: bool | None = None, threads: int | None = None,
                  log: Callable[[str], None] | None = None) -> dict:
    """Time ``steps`` training steps of ``cfg`` (after ``warmup`` untimed ones); see the module
    docstring for what is measured. ``cfg.train.device``, ``precision``, ``channels_last``,
    ``compile`` and ``batch_size`` (global) are honoured; ``data`` (a source as ``data.source``)
    switches from synthetic in-memory images to the real loader. ``free_run`` (default: on GPU
    only) adds ``steps`` unsynchronised steps for the images/s figure. ``threads`` sets torch's
    CPU threads for the run (restored afterwards). The config is validated as ``swav pretrain``
    validates it (ConfigError).

    On CPU it also reports the step in CPU time of this process (``cpu_ms_per_step``) and the
    fraction of the matmul rate in CPU time (``fraction_of_fp32_matmul_cpu_time``): with one
    thread that is what an otherwise idle core would give, whatever else runs on the machine."""
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(cfg, steps, warmup, data, image_size, matmul_n, free_run, log or (lambda s: None))
    finally:
        torch.set_num_threads(old_threads)


def _batch_source(cfg: Config, data: str | None, image_size: int | None, device, rank: int, world: int):
    """(endless iterator of (images on the device, host sizes) of this rank, description): synthetic
    images in memory on the device, or the batches of the training loader over ``data``, built and
    handed to the device as ``swav pretrain`` does (decode at the configured size in the workers,
    pinned memory, the next batch's copy on a side stream)."""
    b = cfg.train.batch_size // world
    if data is None:
        c, h, w = _image_shape(cfg, image_size)
        pool_n = max(2 * b, 512 if h * w <= 64 * 64 else 2 * b)
        pool = synthetic_images(pool_n, c, h, w, device=device, seed=rank)
        perm_gen = torch.Generator(device=device).manual_seed(1 + rank)

        def synthetic() -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
            while True:
                idx = torch.randperm(pool_n, generator=perm_gen, device=device)[:b]
                yield pool.index_select(0, idx), None

        return synthetic(), f"synthetic uint8 {c}x{h}x{w} on {device.type}"
    from swav.build import build_train_data, decode_options
    from swav.data.transfer import DeviceFeeder

    dataset, loader = build_train_data(cfg, rank, world, device, source=data)

    def real():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            for batch in DeviceFeeder(loader, device):
                yield batch.images, batch.sizes
            epoch += 1

    opts = decode_options(cfg)
    size = (f"decoded at mean side {opts['mean_side']}, longer side <= {opts['max_side']}" if opts["mean_side"]
            else f"longer side <= {opts['max_side']}" if opts["max_side"] else "decoded at full size")
    return real(), f"{data} ({len(dataset)} images, {size}, {cfg.data.workers} workers)"


def _learner(cfg: Config, device, world: int, precision: str):
    """The learner as the trainer builds it, with a full queue of unit vectors when the config has
    one (in use from the first step: its cost is part of the step measured)."""
    from swav.build import build_learner, wrap_for_training
    from swav.queue import FeatureQueue

    learner = build_learner(cfg, device, world, precision)
    q_local = cfg.swav.queue_length // world if cfg.swav.queue_length > 0 else 0
    if q_local > 0:
        learner.queue = FeatureQueue(len(cfg.swav.crops_for_assign), q_local, cfg.model.feat_dim, device=device)
        learner.queue.buffer.copy_(torch.nn.functional.normalize(torch.randn_like(learner.queue.buffer), dim=-1))
        learner.queue.in_use = True
    return learner, wrap_for_training


def _run(cfg, steps, warmup, data, image_size, matmul_n, free_run, log) -> dict:
    from swav import distributed as dist_utils
    from swav.config import ConfigError, validate
    from swav.device import device_type_of, pick_device, resolve_precision

    if steps < 1:
        raise ValueError("steps must be >= 1")
    env = dist_utils.read_env()
    validate(cfg, world_size=env.world_size)
    device_type = device_type_of(cfg.train.device)
    if env.is_distributed and not dist_utils.is_dist():
        env = dist_utils.init_distributed(device_type)
    rank, world = env.rank, env.world_size
    device = pick_device(cfg.train.device, env.local_rank if env.is_distributed else None)
    precision = resolve_precision(cfg.train.precision, device)
    if precision == "fp16" and device.type != "cuda":  # no fp16 matmul units: one 2048^2 product takes ~40 s
        raise ConfigError("swav bench: precision fp16 is only timed on a CUDA GPU (a CPU computes fp16 in "
                          "software); use bf16 on CPU")
    free_run = device.type == "cuda" if free_run is None else bool(free_run)
    source, data_desc = _batch_source(cfg, data, image_size, device, rank, world)
    learner, wrap = _learner(cfg, device, world, precision)
    a, b = cfg.augment, cfg.train.batch_size // world
    flops = count_model_flops(learner.raw_model, cfg.model.in_chans, a.size_crops, a.nmb_crops, b, device)
    learner.model = wrap(learner.raw_model, device, world, learner.compile)
    mm_dtypes = {"fp32": torch.float32}
    if precision in ("bf16", "fp16"):
        mm_dtypes[precision] = torch.bfloat16 if precision == "bf16" else torch.float16
    log(f"matrix-product rate ({', '.join(mm_dtypes)}) ...")
    mm = {"before": {k: matmul_rate(device, dt, matmul_n) for k, dt in mm_dtypes.items()}}
    if device.type == "cpu":
        mm["cpu"] = {k: matmul_rate(device, dt, matmul_n, clock=time.process_time) for k, dt in mm_dtypes.items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    one_step = _step_runner(cfg, learner, source, warmup + 2 * steps + 1, rank, world)
    timing = _time_steps(one_step, device, steps, warmup, free_run, world, log, dist_utils.barrier)
    mm["after"] = {k: matmul_rate(device, dt, matmul_n) for k, dt in mm_dtypes.items()}
    if device.type == "cpu":
        mm["cpu"] = {k: max(v, matmul_rate(device, mm_dtypes[k], matmul_n, clock=time.process_time))
                     for k, v in mm["cpu"].items()}
    res = _results(cfg, device, precision, world, b, data_desc, steps, warmup, flops, timing, mm, matmul_n)
    res["channels_last"], res["compile"] = bool(learner.multicrop.channels_last), bool(learner.compile)
    return res


def _step_runner(cfg: Config, learner, source, n_lr: int, rank: int, world: int):
    """``one_step(clock) -> images``: the next batch, its augmentation parameters (a CPU generator
    for the whole global batch, this rank's slice), then ``swav.step.train_step``."""
    from swav import step as swav_step
    from swav.data.multicrop import slice_params
    from swav.optim import cosine_schedule

    gb, b = cfg.train.batch_size, cfg.train.batch_size // world
    schedule = cosine_schedule(cfg.optim.lr, cfg.optim.final_lr, 1, n_lr, 0.0, 0.0)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    counter = [0]

    def one_step(clock) -> int:
        clock.start()
        images, sizes = next(source)
        clock.mark("data")
        # host draws: the crops are planned on the host and their parameters copied without a wait
        params = slice_params(learner.multicrop.sample_params(gb, gen), rank * b, (rank + 1) * b)
        if len(images) != b:
            params = {k: v[: len(images)] for k, v in params.items()}
        out = swav_step.train_step(learner, images, sizes, params, float(schedule[counter[0]]), clock=clock,
                                   step=counter[0])
        counter[0] += 1
        return out.batch_size

    return one_step


def _time_steps(one_step, device, steps: int, warmup: int, free_run: bool, world: int, log, barrier) -> dict:
    """Warm-up steps, phase-synchronised timed steps, and (``free_run``) unsynchronised ones."""
    from swav.step import PHASES, PhaseClock, PhaseTimer

    log(f"{warmup} warm-up step(s) ...")
    for _ in range(warmup):
        one_step(PhaseTimer(device))
    barrier()
    log(f"{steps} timed step(s) ...")
    step_times, phase_acc, n_images = [], dict.fromkeys(PHASES, 0.0), 0
    cpu0 = time.process_time()
    for _ in range(steps):
        ph = PhaseTimer(device)
        t0 = time.perf_counter()
        n_images += one_step(ph)
        step_times.append(time.perf_counter() - t0)
        for k, v in ph.acc.items():
            phase_acc[k] += v
    cpu_per_step = (time.process_time() - cpu0) / steps
    ips_phased = n_images * world / sum(step_times)
    ips = ips_phased
    if free_run:
        log(f"{steps} free-running step(s) ...")
        barrier()
        _sync(device)
        t0 = time.perf_counter()
        per_step = [one_step(PhaseClock()) for _ in range(steps)]
        _sync(device)
        ips = sum(per_step) * world / (time.perf_counter() - t0)
    return {"step_times": step_times, "phase_acc": phase_acc, "n_images": n_images, "ips": ips,
            "ips_phased": ips_phased, "cpu_per_step": cpu_per_step, "free_run": free_run}


def _results(cfg, device, precision, world, b, data_desc, steps, warmup, flops, t, mm_all, matmul_n) -> dict:
    """The benchmark's result dict (see the module docstring)."""
    from swav.device import device_name

    mm = {k: max(mm_all["before"][k], mm_all["after"][k]) for k in mm_all["before"]}
    a, total = cfg.augment, sum(t["step_times"])
    step_s = t["n_images"] / (t["ips"] / world) / steps  # mean seconds per step behind the images/s figure
    achieved = flops["train_flops"] / step_s  # FLOP/s of this process
    model_s = (t["phase_acc"]["forward"] + t["phase_acc"]["backward"]) / steps
    res = {
        "preset": cfg.preset, "device": str(device), "device_name": device_name(device),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "world_size": world,
        "precision": precision,
        "arch": cfg.model.arch, "width_per_group": cfg.model.width_per_group, "model": _model_words(cfg),
        "batch_size": cfg.train.batch_size, "batch_per_process": b,
        "crops": "+".join(f"{n}x{s}" for n, s in zip(a.nmb_crops, a.size_crops)),
        "nmb_prototypes": cfg.model.nmb_prototypes, "queue_length": cfg.swav.queue_length,
        "data": data_desc, "steps": steps, "warmup": warmup,
        "images_per_s": t["ips"], "images_per_s_phased": t["ips_phased"], "free_run": t["free_run"],
        "step_ms": 1e3 * step_s,
        "step_ms_phased": {"min": 1e3 * min(t["step_times"]), "median": 1e3 * statistics.median(t["step_times"]),
                           "max": 1e3 * max(t["step_times"])},
        "phases_ms": {k: 1e3 * v / steps for k, v in t["phase_acc"].items()},
        "phase_fraction": {k: v / total for k, v in t["phase_acc"].items()},
        "forward_gflop_per_step": flops["forward_flops"] / 1e9,
        "model_gflop_per_step": flops["train_flops"] / 1e9,
        "forward_mflop_per_crop": {str(k): v / 1e6 for k, v in flops["per_image"].items()},
        "achieved_tflops": achieved / 1e12,
        "matmul_n": matmul_n or (8192 if device.type == "cuda" else 2048),
        "matmul_tflops": {k: v / 1e12 for k, v in mm.items()},
        "matmul_tflops_before_after": {k: [mm_all["before"][k] / 1e12, mm_all["after"][k] / 1e12] for k in mm},
        "fraction_of_fp32_matmul": achieved / mm["fp32"],
        "fraction_of_matmul_same_dtype": achieved / mm[precision if precision in mm else "fp32"],
        "model_phases_fraction_of_fp32_matmul": flops["train_flops"] / max(model_s, 1e-12) / mm["fp32"],
    }
    res["peak_memory_mib"], res["memory_kind"] = _peak_memory(device)
    if "cpu" in mm_all:
        res["cpu_ms_per_step"] = 1e3 * t["cpu_per_step"]
        res["matmul_tflops_cpu_time"] = {k: v / 1e12 for k, v in mm_all["cpu"].items()}
        res["fraction_of_fp32_matmul_cpu_time"] = flops["train_flops"] / t["cpu_per_step"] / mm_all["cpu"]["fp32"]
    return res


def _model_words(cfg) -> str:
    """``arch (its family's description)``: ``resnet50 (width 64)``, ``timm/vit_small_patch16_224 (timm, ...)``."""
    import dataclasses

    from swav.models import family_of

    return f"{cfg.model.arch} ({', '.join(family_of(cfg.model.arch).describe(cfg.model.arch, dataclasses.asdict(cfg.model)))})"


def format_report(r: dict) -> str:
    """A human-readable summary of a :func:`run_benchmark` result."""
    ph = r["phases_ms"]
    frac = r["phase_fraction"]
    lines = [
        f"swav bench | {r['preset'] or 'custom'} | {r['device']} ({r['device_name']}), {r['threads']} threads, "
        f"{r['world_size']} process(es) | torch {r['torch']}",
        f"  {r['model']}, crops {r['crops']}, K {r['nmb_prototypes']}, queue "
        f"{r['queue_length']}, batch {r['batch_size']} ({r['batch_per_process']}/process), {r['precision']}"
        f"{', channels_last' if r['channels_last'] else ''}{', compiled' if r['compile'] else ''}",
        f"  data: {r['data']}; {r['steps']} timed steps after {r['warmup']} warm-up",
        f"  images/s        {r['images_per_s']:10.1f}" + (
            f"   (phase-synchronised steps: {r['images_per_s_phased']:.1f})" if r["free_run"] else ""),
        f"  step            {r['step_ms']:10.1f} ms   (synchronised steps min/median/max "
        f"{r['step_ms_phased']['min']:.1f} / {r['step_ms_phased']['median']:.1f} / {r['step_ms_phased']['max']:.1f})",
    ]
    names = {"data": "decode/load", "augment": "augmentation", "forward": "forward", "sinkhorn": "Sinkhorn",
             "loss": "loss", "backward": "backward", "optimizer": "optimizer"}
    for k in PHASES:
        lines.append(f"    {names[k]:14s}{ph[k]:10.1f} ms  {100 * frac[k]:5.1f} %")
    mm = r["matmul_tflops"]
    lines += [
        f"  peak memory     {r['peak_memory_mib']:10.0f} MiB ({r['memory_kind']})",
        f"  model arithmetic {r['model_gflop_per_step']:9.1f} GFLOP/step (forward {r['forward_gflop_per_step']:.1f}; "
        "per crop " + ", ".join(f"{s} px {v:.1f} MFLOP" for s, v in r["forward_mflop_per_crop"].items()) + ")",
        f"  achieved        {1e3 * r['achieved_tflops']:10.1f} GFLOP/s per process",
        f"  matmul {r['matmul_n']}^2     " + ", ".join(f"{k} {1e3 * v:.1f} GFLOP/s" for k, v in mm.items()),
        f"  fraction of the fp32 matmul rate: whole step {100 * r['fraction_of_fp32_matmul']:.1f} %, "
        f"forward+backward alone {100 * r['model_phases_fraction_of_fp32_matmul']:.1f} %",
    ]
    if "fraction_of_fp32_matmul_cpu_time" in r:
        lines.append(f"  in CPU time of this process: step {r['cpu_ms_per_step']:.1f} ms, "
                     f"{100 * r['fraction_of_fp32_matmul_cpu_time']:.1f} % of the fp32 matmul rate per CPU-second "
                     f"({1e3 * r['matmul_tflops_cpu_time']['fp32']:.1f} GFLOP/CPU-s)")
    if r["precision"] != "fp32":
        lines.append(f"  fraction of the {r['precision']} matmul rate: whole step "
                     f"{100 * r['fraction_of_matmul_same_dtype']:.1f} %")
    return "\n".join(lines)
