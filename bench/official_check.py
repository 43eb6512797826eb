"""The official SwAV code (facebookresearch/swav) timed on this machine, for bench/gpu_check.py.

    python bench/official_check.py --official bench/.official --data FOLDER [--device cuda] [--json]

Runs in its own process (the official code needs torchvision and imports a package named ``src``).
The official repository is never committed here: ``python bench/gpu_check.py --fetch-official GITDIR``
exports it into the ignored folder ``bench/.official``. apex is not installed: a stub stands in for
``apex.parallel.LARC`` (the same rule as apex's, with its per-parameter host reads) and
``apex.parallel.convert_syncbn_model``; mixed precision is ``torch.autocast`` in bf16 around the
model (the official recipe uses apex O1 fp16), so the step compares with ``swav bench`` in bf16.

Three figures, each with the official recipe's transforms (2x224 + 6x96 crops, scales 0.14-1 and
0.05-0.14, colour jitter, grayscale, PIL blur), model (their ResNet-50, K 3000, a full queue of 3840)
and train() (their loop, their Sinkhorn, one process group of one rank):
* ``step``: train() over crops already on the device (their step alone);
* ``pipeline``: their DataLoader over ``MultiCropDataset(FOLDER)`` with ``--workers`` workers
  (batches of crops per second, the per-image CPU pipeline alone);
* ``end_to_end``: train() fed by that DataLoader.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import sys
import time
import types
from pathlib import Path

import torch


def _module(name: str) -> types.ModuleType:
    """An empty module that import machinery accepts (with a spec)."""
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return mod


def _stub_apex() -> None:
    """apex.parallel.LARC and convert_syncbn_model, as the official code uses them."""

    class LARC:
        """apex's LARC(clip=False) rule around an SGD: per parameter, with host reads as apex does."""

        def __init__(self, optimizer, trust_coefficient=0.02, clip=True, eps=1e-8):
            self.optim, self.trust_coefficient, self.clip, self.eps = optimizer, trust_coefficient, clip, eps

        param_groups = property(lambda self: self.optim.param_groups)
        state = property(lambda self: self.optim.state)

        def zero_grad(self, *a, **k):
            self.optim.zero_grad(*a, **k)

        def state_dict(self):
            return self.optim.state_dict()

        @torch.no_grad()
        def step(self):
            kept = []
            for group in self.optim.param_groups:
                wd = group.get("weight_decay", 0)
                kept.append(wd)
                group["weight_decay"] = 0
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    p_norm, g_norm = torch.norm(p.data), torch.norm(p.grad.data)
                    if p_norm != 0 and g_norm != 0:  # host reads, as in apex
                        local = self.trust_coefficient * p_norm / (g_norm + p_norm * wd + self.eps)
                        p.grad.data += wd * p.data
                        p.grad.data *= local
            self.optim.step()
            for group, wd in zip(self.optim.param_groups, kept):
                group["weight_decay"] = wd

    apex, parallel, larc = _module("apex"), _module("apex.parallel"), _module("apex.parallel.LARC")
    larc.LARC = LARC
    parallel.LARC = larc
    parallel.convert_syncbn_model = lambda model, **k: model
    apex.parallel, apex.amp = parallel, _module("apex.amp")
    sys.modules.update({"apex": apex, "apex.parallel": parallel, "apex.parallel.LARC": larc, "apex.amp": apex.amp})
    try:
        import pandas  # noqa: F401  (src/logger.py imports it; only its unused PD_Stats needs it)
    except ImportError:
        sys.modules["pandas"] = _module("pandas")


class _Autocast(torch.nn.Module):
    """The model under bf16 autocast (torch.amp in apex O1's place); ``.module`` is what train() reads."""

    def __init__(self, ddp, device, enabled: bool):
        super().__init__()
        self.ddp, self.device, self.enabled = ddp, device, enabled
        self.module = ddp.module

    def forward(self, inputs):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.enabled):
            return self.ddp(inputs)


def _setup(args):
    sys.path.insert(0, str(Path(args.official).resolve()))
    _stub_apex()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if args.device == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{29600 + os.getpid() % 1000}", rank=0,
                                world_size=1)
    if args.device != "cuda":  # the official forward moves crops with .cuda(): the identity on a CPU dry run
        torch.Tensor.cuda = lambda self, *a, **k: self
    import main_swav
    import src.resnet50 as resnet_models

    device = torch.device(args.device)
    model = resnet_models.__dict__[args.arch](normalize=True, hidden_mlp=args.hidden_mlp, output_dim=128,
                                              nmb_prototypes=args.prototypes).to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as main_swav.py sets it (its model stays NCHW, as there)
    sgd = torch.optim.SGD(model.parameters(), lr=0.6, momentum=0.9, weight_decay=1e-6)
    optimizer = main_swav.LARC(optimizer=sgd, trust_coefficient=0.001, clip=False)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0] if device.type == "cuda" else None)
    main_swav.args = argparse.Namespace(
        crops_for_assign=[0, 1], nmb_crops=args.nmb_crops, temperature=0.1, epsilon=0.05, sinkhorn_iterations=3,
        world_size=1, rank=0, use_fp16=False, freeze_prototypes_niters=0)
    queue = torch.nn.functional.normalize(torch.randn(2, args.queue, 128, device=device), dim=-1)
    return main_swav, _Autocast(ddp, device, args.precision == "bf16"), optimizer, queue, device


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_train(main_swav, model, optimizer, queue, batches, device, n: int, warmup: int, batch: int) -> float:
    """images/s of the official train() over ``n`` batches (after ``warmup`` batches): the loop as it is."""
    lr = [0.6] * (warmup + n + 1)
    main_swav.train(_Take(batches, warmup), model, optimizer, 0, lr, queue)
    _sync(device)
    t0 = time.perf_counter()
    main_swav.train(_Take(batches, n), model, optimizer, 0, lr, queue)
    _sync(device)
    return n * batch / (time.perf_counter() - t0)


class _Take:
    """The next ``n`` items of an iterator, with a length (train() computes its iteration from it)."""

    def __init__(self, it, n):
        self.it, self.n = it, n

    def __len__(self):
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            yield next(self.it)


def _repeat(item):
    while True:
        yield item


def _loader(args, folder):
    from src.multicropdataset import MultiCropDataset

    ds = MultiCropDataset(folder, args.size_crops, args.nmb_crops, args.min_scale, args.max_scale)
    ds.samples = ds.samples * args.repeat  # one long epoch (as gpu_check.py's file lists do for ours)
    return torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                       pin_memory=args.device == "cuda", drop_last=True,
                                       persistent_workers=args.workers > 0)


def _pipeline_rate(loader, n: int) -> float:
    it = iter(loader)
    next(it)  # the workers started and the first batch made
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return n * loader.batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True)
    ap.add_argument("--data", action="append", default=[], help="folder(s) for the pipeline (repeatable)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--hidden-mlp", type=int, default=2048)
    ap.add_argument("--prototypes", type=int, default=3000)
    ap.add_argument("--queue", type=int, default=3840)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size-crops", type=int, nargs="+", default=[224, 96])
    ap.add_argument("--nmb-crops", type=int, nargs="+", default=[2, 6])
    ap.add_argument("--min-scale", type=float, nargs="+", default=[0.14, 0.05])
    ap.add_argument("--max-scale", type=float, nargs="+", default=[1.0, 0.14])
    ap.add_argument("--workers", type=int, default=10)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--repeat", type=int, default=1, help="each image this many times an epoch")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    main_swav, model, optimizer, queue, device = _setup(args)
    out = {"device": str(device), "torch": torch.__version__, "batch": args.batch, "workers": args.workers,
           "crops": "+".join(f"{n}x{s}" for n, s in zip(args.nmb_crops, args.size_crops)), "precision": args.precision}
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(args.batch, 3, s, s, generator=g).to(device) for s, k in zip(args.size_crops, args.nmb_crops)
             for _ in range(k)]
    out["step_images_per_s"] = _time_train(main_swav, model, optimizer, queue, _repeat(crops), device, args.steps,
                                           args.warmup, args.batch)
    for folder in args.data:
        loader = _loader(args, folder)
        name = Path(folder).name
        out[f"pipeline_images_per_s[{name}]"] = _pipeline_rate(loader, args.steps)
        out[f"end_to_end_images_per_s[{name}]"] = _time_train(main_swav, model, optimizer, queue, iter(loader),
                                                              device, args.steps, args.warmup, args.batch)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
