import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from swav import distributed as D


# ---------------------------------------------------------------- read_env


def test_single_when_nothing_set():
    env = D.read_env({})
    assert env == D.DistEnv(0, 1, 0, None, False, "single")


def test_torchrun():
    env = D.read_env(
        {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    )
    assert (env.rank, env.world_size, env.local_rank) == (3, 8, 1)
    assert env.source == "torchrun" and env.is_distributed and env.backend is None
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 29500)


def test_torchrun_world_size_one_is_not_distributed():
    env = D.read_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert env.source == "torchrun" and not env.is_distributed


def test_torchrun_wins_over_slurm():
    env = D.read_env(
        {
            "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234",
            "SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "3", "SLURM_JOB_NODELIST": "n[1-2]",
        }
    )
    assert env.source == "torchrun" and env.rank == 1 and env.world_size == 2


@pytest.mark.parametrize(
    "environ, match",
    [
        ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "MASTER_ADDR"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "outside"),
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "not an integer"),
    ],
)
def test_torchrun_bad_env_raises(environ, match):
    with pytest.raises(ValueError, match=match):
        D.read_env(environ)


def _slurm(**extra):
    base = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456"}
    base.update(extra)
    return base


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("node[001-004,007],gpu12", "node001"),
        ("gpu12", "gpu12"),
        ("gpu12,gpu13", "gpu12"),
        ("node[7,1-3]", "node7"),
        ("r[1-2]n[07-08],x1", "r1n07"),
        ("node[01-02]-ib", "node01-ib"),
        ("a-b[3-4]", "a-b3"),
    ],
)
def test_first_host(nodelist, host):
    assert D.first_host(nodelist) == host


@pytest.mark.parametrize("bad", ["", "node[1-2", "node]1["])
def test_first_host_rejects_garbage(bad):
    with pytest.raises(ValueError):
        D.first_host(bad)


def test_slurm_from_job_nodelist():
    env = D.read_env(_slurm(SLURM_JOB_NODELIST="node[001-004,007],gpu12", SLURM_NODELIST="other1"))
    assert env.source == "slurm" and env.is_distributed
    assert (env.rank, env.world_size, env.local_rank) == (5, 8, 1)
    assert env.master_addr == "node001"
    assert env.master_port == 15000 + 123456 % 20000


def test_slurm_nodelist_fallback_and_explicit_master():
    env = D.read_env(_slurm(SLURM_NODELIST="gpu12,gpu13"))
    assert env.master_addr == "gpu12"
    env = D.read_env(_slurm(SLURM_NODELIST="gpu12", MASTER_ADDR="10.1.1.1", MASTER_PORT="4242"))
    assert (env.master_addr, env.master_port) == ("10.1.1.1", 4242)


def test_slurm_single_task_is_single():
    env = D.read_env({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7"})
    assert env.source == "single" and not env.is_distributed


def test_slurm_missing_nodelist_raises():
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        D.read_env(_slurm())


def test_init_distributed_single_process_does_nothing():
    env = D.init_distributed("cpu", environ={})
    assert env.source == "single" and env.backend is None
    assert not D.is_dist()


def test_init_distributed_rejects_unknown_device():
    with pytest.raises(ValueError, match="device_type"):
        D.init_distributed("tpu", environ={})


# ------------------------------------------------------- helpers, no group


def test_helpers_outside_group_are_identity():
    assert not D.is_dist()
    assert (D.get_rank(), D.get_world_size(), D.is_main()) == (0, 1, True)
    D.barrier()
    D.cleanup()
    t = torch.arange(6.0).reshape(3, 2)
    for fn in (D.all_reduce_sum, D.all_reduce_mean, D.all_gather_cat):
        out = fn(t)
        assert torch.equal(out, t)
        assert out.data_ptr() != t.data_ptr()  # always a new tensor
    obj = {"a": [1, 2]}
    assert D.broadcast_object(obj) is obj
    with pytest.raises(ValueError):
        D.all_gather_cat(torch.tensor(1.0))


# ------------------------------------------------------- 2 processes, gloo


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    environ = {
        "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    }
    env = D.init_distributed("cpu", environ=environ)
    try:
        assert env.backend == "gloo" and D.is_dist()
        assert D.get_rank() == rank and D.get_world_size() == world and D.is_main() == (rank == 0)

        t = torch.tensor([1.0, 2.0]) * (rank + 1)  # rank0: [1,2], rank1: [2,4]
        s = D.all_reduce_sum(t)
        assert torch.equal(s, torch.tensor([3.0, 6.0])), s
        assert torch.equal(t, torch.tensor([1.0, 2.0]) * (rank + 1))  # input untouched
        m = D.all_reduce_mean(t)
        assert torch.equal(m, torch.tensor([1.5, 3.0])), m

        # unequal dim-0 sizes: rank0 has 3 rows, rank1 has 1 row
        rows = 3 if rank == 0 else 1
        local = torch.full((rows, 2), float(rank)) + torch.arange(rows).unsqueeze(1)
        g = D.all_gather_cat(local)
        expect = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [1.0, 1.0]])
        assert torch.equal(g, expect), g
        # an empty shard on one rank
        e = D.all_gather_cat(torch.arange(2) if rank == 0 else torch.arange(0))
        assert torch.equal(e, torch.arange(2)), e

        got = D.broadcast_object({"seed": 1234} if rank == 0 else None)
        assert got == {"seed": 1234}

        # autograd all-reduce: y = x_0 + x_1 on both ranks, L_r = (r + 1) * sum(y), so
        # dL/dx_r = dL_0/dy + dL_1/dy = 1 + 2 on every rank
        x = (torch.tensor([1.0, 2.0]) * (rank + 1)).requires_grad_()
        y = D.all_reduce_sum_autograd(x)
        assert torch.equal(y.detach(), torch.tensor([3.0, 6.0])), y
        ((rank + 1) * y.sum()).backward()
        assert torch.equal(x.grad, torch.full((2,), 3.0)), x.grad
        _sync_batchnorm_equals_batchnorm_over_the_global_batch(rank)
        D.barrier()
    finally:
        D.cleanup()
    # every thread of the group is gone with it: a group kept alive past cleanup() (as torch's
    # distributed.nn.functional.all_reduce did, holding it as a default argument) keeps gloo's
    # threads running into the interpreter's exit, where they can abort the process
    if os.path.isdir("/proc/self/task"):
        assert _gloo_threads() == [], _gloo_threads()


def _gloo_threads() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return [n for n in names if "gloo" in n]


def _sync_batchnorm_equals_batchnorm_over_the_global_batch(rank: int) -> None:
    """Each rank holds half of a batch of 6: CPUSyncBatchNorm's output and input gradient are those
    of one BatchNorm2d over all 6, and its parameter gradients summed over ranks are that one's."""
    g = torch.Generator().manual_seed(0)
    x_all = torch.randn(6, 4, 3, 3, generator=g) * 2 + 1  # N(1, 4): values O(1), variance O(1)
    w_all = torch.randn(6, 4, 3, 3, generator=g)  # L = sum(w * BN(x))
    ref = torch.nn.BatchNorm2d(4)
    x_ref = x_all.clone().requires_grad_()
    y_ref = ref(x_ref)
    (w_all * y_ref).sum().backward()

    bn = D.CPUSyncBatchNorm(4)
    part = slice(3 * rank, 3 * rank + 3)
    x = x_all[part].clone().requires_grad_()
    y = bn(x)
    (w_all[part] * y).sum().backward()
    # float32: the one-pass variance sum(x^2)/N - mean^2 against torch's two-pass one differs by a
    # few ulps of E[x^2] (about 5 here), which the 1/sigma and the backward scale by O(1)
    tol = dict(rtol=0, atol=64 * torch.finfo(torch.float32).eps * 5)
    torch.testing.assert_close(y, y_ref[part], **tol)
    torch.testing.assert_close(x.grad, x_ref.grad[part], **tol)
    torch.testing.assert_close(D.all_reduce_sum(bn.weight.grad), ref.weight.grad, **tol)
    torch.testing.assert_close(D.all_reduce_sum(bn.bias.grad), ref.bias.grad, **tol)
    torch.testing.assert_close(bn.running_mean, ref.running_mean, **tol)
    torch.testing.assert_close(bn.running_var, ref.running_var, **tol)


def test_two_process_gloo_collectives():
    mp.spawn(_worker, args=(2, _free_port()), nprocs=2, join=True)
