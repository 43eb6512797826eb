"""Process-group setup and small collective helpers.

Launchers understood (in this order):

* ``torchrun`` (or anything that sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``),
* SLURM ``srun`` with more than one task (``SLURM_NTASKS > 1``),
* otherwise a single process.

Every helper below is a no-op (or the identity) when no default process group
is initialised, so training code can call them unconditionally.  Helpers that
return tensors always return *new* tensors, never the input itself, so the
caller may modify the result in place in every setting.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, MutableMapping

import torch
import torch.distributed as dist

__all__ = [
    "DistEnv",
    "read_env",
    "first_host",
    "init_distributed",
    "cleanup",
    "is_dist",
    "get_rank",
    "get_world_size",
    "is_main",
    "barrier",
    "all_reduce_sum",
    "all_reduce_sum_autograd",
    "all_reduce_mean",
    "all_gather_cat",
    "broadcast_object",
    "gather_objects",
    "CPUSyncBatchNorm",
    "cpu_sync_batchnorm",
    "convert_sync_batchnorm",
]

SLURM_PORT_BASE = 15000
SLURM_PORT_RANGE = 20000


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job.

    ``backend`` is ``None`` until :func:`init_distributed` chose one (and stays
    ``None`` for a single process).  ``master_addr`` / ``master_port`` are the
    rendezvous address for ``env://`` initialisation (``None`` when single).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    is_distributed: bool
    source: str  # "torchrun" | "slurm" | "single"
    master_addr: str | None = None
    master_port: int | None = None


def _int_var(environ: Mapping[str, str], name: str) -> int:
    raw = environ[name]
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """First host name of a SLURM node list.

    ``"node[001-004,007],gpu12"`` -> ``"node001"``, ``"gpu12,gpu13"`` -> ``"gpu12"``,
    ``"r[1-2]n[07-08]"`` -> ``"r1n07"``, ``"node[01-02]-ib"`` -> ``"node01-ib"``.
    Leading zeros inside brackets are kept, as SLURM does.
    """
    text = nodelist.strip()
    if not text:
        raise ValueError("empty SLURM node list")
    # Cut at the first comma that is not inside brackets.
    depth = 0
    end = len(text)
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced brackets in SLURM node list {nodelist!r}")
        elif ch == "," and depth == 0:
            end = i
            break
    if depth > 0 and end == len(text):
        raise ValueError(f"unbalanced brackets in SLURM node list {nodelist!r}")
    host = text[:end]

    def first_of_range(match: re.Match[str]) -> str:
        first_item = match.group(1).split(",")[0].strip()
        first = first_item.split("-")[0].strip()
        if not first.isdigit():
            raise ValueError(f"cannot parse range [{match.group(1)}] in SLURM node list {nodelist!r}")
        return first

    host = re.sub(r"\[([^\[\]]*)\]", first_of_range, host)
    if not host or "[" in host or "]" in host:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    return host


def read_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Work out rank / world size from the launcher's environment variables.

    Pure: reads ``environ`` only, changes nothing.  Raises ``ValueError`` with
    the variable to fix when the environment is inconsistent.
    """
    if "RANK" in environ or "WORLD_SIZE" in environ:
        missing = [v for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if v not in environ]
        if missing:
            raise ValueError(
                f"RANK/WORLD_SIZE are set but {', '.join(missing)} is not: launch with torchrun, "
                "or set RANK, WORLD_SIZE and LOCAL_RANK together (and MASTER_ADDR/MASTER_PORT)"
            )
        rank = _int_var(environ, "RANK")
        world_size = _int_var(environ, "WORLD_SIZE")
        local_rank = _int_var(environ, "LOCAL_RANK")
        _check_ranks(rank, world_size, local_rank, "RANK", "WORLD_SIZE")
        addr = environ.get("MASTER_ADDR")
        port = _int_var(environ, "MASTER_PORT") if "MASTER_PORT" in environ else None
        if world_size > 1 and (addr is None or port is None):
            raise ValueError(
                "WORLD_SIZE > 1 but MASTER_ADDR and/or MASTER_PORT are not set: launch with torchrun "
                "or export MASTER_ADDR=<host of rank 0> MASTER_PORT=<free port>"
            )
        return DistEnv(
            rank=rank,
            world_size=world_size,
            local_rank=local_rank,
            backend=None,
            is_distributed=world_size > 1,
            source="torchrun",
            master_addr=addr,
            master_port=port,
        )

    if "SLURM_NTASKS" in environ and _int_var(environ, "SLURM_NTASKS") > 1:
        world_size = _int_var(environ, "SLURM_NTASKS")
        for var in ("SLURM_PROCID", "SLURM_LOCALID"):
            if var not in environ:
                raise ValueError(
                    f"SLURM_NTASKS={world_size} but {var} is not set: start one process per task with srun"
                )
        rank = _int_var(environ, "SLURM_PROCID")
        local_rank = _int_var(environ, "SLURM_LOCALID")
        _check_ranks(rank, world_size, local_rank, "SLURM_PROCID", "SLURM_NTASKS")
        addr = environ.get("MASTER_ADDR")
        if addr is None:
            nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
            if not nodelist:
                raise ValueError(
                    "under SLURM with several tasks but neither MASTER_ADDR nor SLURM_JOB_NODELIST/"
                    "SLURM_NODELIST is set: export MASTER_ADDR=<host of task 0>"
                )
            addr = first_host(nodelist)
        if "MASTER_PORT" in environ:
            port = _int_var(environ, "MASTER_PORT")
        elif "SLURM_JOB_ID" in environ:
            port = SLURM_PORT_BASE + _int_var(environ, "SLURM_JOB_ID") % SLURM_PORT_RANGE
        else:
            raise ValueError("under SLURM but SLURM_JOB_ID is not set: export MASTER_PORT=<free port>")
        return DistEnv(
            rank=rank,
            world_size=world_size,
            local_rank=local_rank,
            backend=None,
            is_distributed=True,
            source="slurm",
            master_addr=addr,
            master_port=port,
        )

    return DistEnv(rank=0, world_size=1, local_rank=0, backend=None, is_distributed=False, source="single")


def _check_ranks(rank: int, world_size: int, local_rank: int, rank_var: str, size_var: str) -> None:
    if world_size < 1:
        raise ValueError(f"{size_var}={world_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"{rank_var}={rank} is outside [0, {size_var}={world_size})")
    if local_rank < 0:
        raise ValueError(f"local rank {local_rank} must be >= 0")


_BACKENDS = {"cuda": "nccl", "cpu": "gloo"}


def init_distributed(device_type: str, environ: MutableMapping[str, str] = os.environ) -> DistEnv:
    """Initialise the default process group when the job has more than one process.

    ``device_type`` is ``"cuda"`` (backend nccl, one GPU per process chosen by
    the local rank) or ``"cpu"`` (backend gloo).  Rendezvous is ``env://``: the
    resolved ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE`` and
    ``LOCAL_RANK`` are written to ``os.environ`` first (needed for SLURM, and
    when ``environ`` is not ``os.environ``).  Returns the environment with
    ``backend`` filled in (``None`` for a single process).
    """
    env = read_env(environ)
    if device_type not in _BACKENDS and device_type != "mps":
        raise ValueError(f"device_type must be 'cuda', 'cpu' or 'mps', got {device_type!r}")

    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device_type='cuda' but CUDA is not available: use device 'cpu'")
        n_gpus = torch.cuda.device_count()
        if env.local_rank >= n_gpus:
            raise RuntimeError(
                f"local rank {env.local_rank} but only {n_gpus} visible GPU(s) on this node: "
                "start at most one process per GPU (torchrun --nproc-per-node / srun --ntasks-per-node)"
            )
        torch.cuda.set_device(env.local_rank)

    if not env.is_distributed:
        return env

    if device_type == "mps":
        raise RuntimeError("multi-process training is not supported on 'mps': run a single process")
    if dist.is_initialized():
        raise RuntimeError("a default process group is already initialised: call swav.distributed.cleanup() first")
    backend = _BACKENDS[device_type]
    if not dist.is_backend_available(backend):
        raise RuntimeError(f"torch.distributed backend {backend!r} is not available in this PyTorch build")

    os.environ["MASTER_ADDR"] = str(env.master_addr)
    os.environ["MASTER_PORT"] = str(env.master_port)
    os.environ["RANK"] = str(env.rank)
    os.environ["WORLD_SIZE"] = str(env.world_size)
    os.environ["LOCAL_RANK"] = str(env.local_rank)

    kwargs: dict[str, Any] = {}
    if device_type == "cuda":
        kwargs["device_id"] = torch.device("cuda", env.local_rank)
    dist.init_process_group(
        backend=backend, init_method="env://", rank=env.rank, world_size=env.world_size, **kwargs
    )
    return dataclasses.replace(env, backend=backend)


def cleanup() -> None:
    """Destroy the default process group if there is one."""
    if is_dist():
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if not is_dist():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks, as a new tensor (the input is untouched)."""
    out = t.detach().clone()
    if is_dist():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class _AllReduceSum(torch.autograd.Function):
    """y = sum_r x_r on every rank; every rank's loss L_r depends on y, so dL/dx_r = sum_r' dL_r'/dy.

    The default process group is looked up at each call, never held: torch's
    ``torch.distributed.nn.functional.all_reduce`` binds the group as a default argument when it is
    first imported, which keeps a destroyed group (and gloo's threads) alive until the interpreter
    exits, where tearing them down can abort the process (SIGABRT).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # x: any shape, the same on every rank
        y = x.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> torch.Tensor:
        grad_x = grad_y.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad_x, op=dist.ReduceOp.SUM)
        return grad_x


def all_reduce_sum_autograd(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks that gradients flow through (the backward sums the gradients
    over ranks); the identity, as a new tensor, outside a process group."""
    if not is_dist():
        return t.clone()
    return _AllReduceSum.apply(t)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Element-wise mean over ranks, as a new tensor (integer inputs give a float result)."""
    return all_reduce_sum(t) / get_world_size()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0, in rank order.

    Ranks may hold different numbers of rows; all other dimensions must agree.
    Costs one extra small all_gather (the shapes) and one host sync.
    """
    if t.dim() == 0:
        raise ValueError("all_gather_cat needs a tensor with at least one dimension")
    t = t.detach().contiguous()
    if not is_dist():
        return t.clone()
    world = dist.get_world_size()
    shape = torch.tensor(t.shape, dtype=torch.int64, device=t.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    shape_list = [tuple(s.tolist()) for s in shapes]
    if any(s[1:] != shape_list[0][1:] for s in shape_list):
        raise ValueError(
            f"all_gather_cat: shapes differ beyond dim 0 across ranks: {shape_list}; only dim 0 may differ"
        )
    sizes = [s[0] for s in shape_list]
    max_rows = max(sizes)
    padded = t
    if t.shape[0] < max_rows:
        padded = t.new_zeros((max_rows, *t.shape[1:]))
        padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (picklable objects only)."""
    if not is_dist():
        return obj
    holder = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` outside a group)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------
# BatchNorm over all ranks on CPU (torch.nn.SyncBatchNorm only runs on GPUs)
# --------------------------------------------------------------------------------------

class CPUSyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the samples of every rank (gloo, CPU).

    mean_c = sum_r sum_i x_ric / N,  var_c = sum_r sum_i x_ric^2 / N - mean_c^2  with N the global
    count; the sums go through an autograd-aware all-reduce, so gradients are those of one
    BatchNorm over the global batch. Outside a process group or in eval mode it is a BatchNorm.
    """

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_dist() and get_world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        stats = all_reduce_sum_autograd(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach() * m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp_min(1)) * m)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def cpu_sync_batchnorm(layer: torch.nn.modules.batchnorm._BatchNorm, cls: type = CPUSyncBatchNorm):
    """A ``cls`` (:class:`CPUSyncBatchNorm` or a subclass) with ``layer``'s settings, parameters,
    running statistics and training mode: the same state-dict keys (its own, not its children's)."""
    out = cls(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats)
    with torch.no_grad():
        if layer.affine:
            out.weight.copy_(layer.weight)
            out.bias.copy_(layer.bias)
        if layer.track_running_stats:
            out.running_mean.copy_(layer.running_mean)
            out.running_var.copy_(layer.running_var)
            out.num_batches_tracked.copy_(layer.num_batches_tracked)
    out.train(layer.training)
    return out


_PLAIN_BATCHNORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
_SYNCED = (CPUSyncBatchNorm, torch.nn.SyncBatchNorm)


def _sync_plain(layer: torch.nn.Module, device_type: str) -> torch.nn.Module:
    if device_type != "cpu":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(layer)
    return cpu_sync_batchnorm(layer)


def convert_sync_batchnorm(module: torch.nn.Module, device_type: str, convert_layer=None) -> torch.nn.Module:
    """Make every BatchNorm synchronise over ranks: torch's SyncBatchNorm on GPUs, ours on CPU.

    torch's own BatchNorm1d/2d/3d are converted here. A subclass that does more in its forward
    (timm's BatchNormAct2d applies its activation) would lose it in either converter: it is given
    to ``convert_layer(layer, device_type)`` (the backbone family's hook,
    ``swav.models.Family.sync_norm_layer``), which returns a synchronised layer that keeps what
    else it computes and its state-dict keys, or None. Layers that nothing converts are refused,
    before anything is changed, with a ValueError naming them. A network without BatchNorm (a ViT)
    is returned as it is; the others are changed in place (and returned)."""
    swaps: dict[str, torch.nn.Module] = {}
    made: dict[int, torch.nn.Module | None] = {}  # a layer used in two places stays one layer
    odd = []
    for name, m in module.named_modules(remove_duplicate=False):
        if not isinstance(m, torch.nn.modules.batchnorm._BatchNorm) or isinstance(m, _SYNCED):
            continue
        if id(m) not in made:
            made[id(m)] = _sync_plain(m, device_type) if type(m) in _PLAIN_BATCHNORMS else \
                convert_layer(m, device_type) if convert_layer is not None else None
        if made[id(m)] is None:
            odd.append(f"{name or 'the module'} ({type(m).__name__})")
        else:
            swaps[name] = made[id(m)]
    if odd:
        raise ValueError(f"model.sync_bn: {len(odd)} BatchNorm layer(s) of a kind that cannot be synchronised "
                         f"without losing what else they compute: {', '.join(odd[:3])}"
                         f"{', ...' if len(odd) > 3 else ''}; set model.sync_bn=false (each process then "
                         "normalises over its own part of the batch)")
    if "" in swaps:  # the module is itself a BatchNorm
        return swaps[""]
    for name, new in swaps.items():  # parents before their children (named_modules' order)
        parent, _, leaf = name.rpartition(".")
        module.get_submodule(parent).add_module(leaf, new)
    return module
