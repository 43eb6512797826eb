"""Two processes (gloo, loopback), each holding half of a batch and half of the queue, give the same
codes and loss as one process holding all of it."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from swav.loss import swav_loss
from swav.queue import FeatureQueue

B, V, K, D, L = 8, 4, 10, 6, 16  # global batch, crops, prototypes, dim, global queue length


def make_inputs():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(V * B, D, generator=g), dim=1)
    c = F.normalize(torch.randn(K, D, generator=g), dim=1)
    queue = F.normalize(torch.randn(2, L, D, generator=g), dim=2)
    return z, c, queue


def local_rows(t, rank, world):
    """Rows of crop-major (V*B, .) tensor ``t`` that belong to ``rank``: its B/world images of every crop."""
    b = B // world
    return torch.cat([t[v * B + rank * b: v * B + (rank + 1) * b] for v in range(V)])


def run_rank(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        z, c, queue = make_inputs()
        q = FeatureQueue(2, L // world, D)
        q.load_global_state_dict({"buffer": queue, "in_use": True}, rank, world)
        zl = local_rows(z, rank, world)
        loss, full = swav_loss(zl @ c.t(), zl, c, B // world, [0, 1], epsilon=0.05, queue=q)
        after = q.global_state_dict()
        torch.save({"loss": loss, "codes": [f[-(B // world):] for f in full[0]], "queue_after": after["buffer"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one(tmp_path):
    mp.spawn(run_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    z, c, queue = make_inputs()
    q = FeatureQueue(2, L, D)
    q.load_global_state_dict({"buffer": queue, "in_use": True}, 0, 1)
    loss, full = swav_loss(z @ c.t(), z, c, B, [0, 1], epsilon=0.05, queue=q)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    b = B // 2
    for i in range(2):  # each assignment crop
        single = full[0][i][-B:]
        for r, res in enumerate(ranks):
            torch.testing.assert_close(res["codes"][i], single[r * b:(r + 1) * b], atol=1e-6, rtol=0)
            torch.testing.assert_close(res["codes"][i].sum(1), torch.ones(b), atol=1e-5, rtol=0)
    # the loss is a mean over images: the mean over ranks (what DDP's gradient averaging sees) equals it
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss, atol=1e-6, rtol=1e-6)
    # after the step the gathered queue holds exactly the rows of the single-process queue
    gathered = ranks[0]["queue_after"]
    assert torch.equal(gathered, ranks[1]["queue_after"])
    for i in range(2):
        key = lambda t: t[torch.argsort(t[:, 0])]
        torch.testing.assert_close(key(gathered[i]), key(q.buffer[i]))
