"""SyncBatchNorm for timm's BatchNormAct2d (issue 21, follow-up): the timm family converts its own
norm layers (``Family.sync_norm_layer``), keeping what they compute after the normalisation (``drop``
then ``act``) and their state-dict keys: :class:`swav.models.library.CPUSyncBatchNormAct` on CPU,
timm's ``SyncBatchNormAct`` on GPUs. The CPU layer, one half of the batch on each of 2 gloo processes,
equals the original layer over the whole batch."""
from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from swav import distributed as D
from swav.models import create_backbone, family_of
from swav.models.library import CPUSyncBatchNormAct

TIMM = family_of("timm/mobilenetv3_small_050")


class Half(nn.Module):
    """A deterministic stand-in for BatchNormAct2d's ``drop`` layer (timm's DropBlock is random): a
    converted layer that lost it would give twice the output."""

    def forward(self, x):
        return 0.5 * x


def _bn_act(**kw):
    from timm.layers import BatchNormAct2d

    return BatchNormAct2d(4, act_layer=nn.SiLU, drop_layer=Half, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int) -> None:
    import timm.layers  # noqa: F401  (imported before the group exists, as in a run)

    torch.set_num_threads(1)
    D.init_distributed("cpu", environ={"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        _sync_bn_act_equals_bn_act_over_the_global_batch(rank)
        D.barrier()  # neither rank tears the group down while the other is still in a collective
    finally:
        D.cleanup()


def _sync_bn_act_equals_bn_act_over_the_global_batch(rank: int) -> None:
    """As tests/test_distributed_env.py checks CPUSyncBatchNorm against BatchNorm2d: each rank holds
    half of a batch of 6; the converted layer's output and input gradient are the original
    BatchNormAct2d's over all 6 (SiLU and the drop layer included), its parameter gradients summed
    over ranks are that one's, and so are its running statistics."""
    g = torch.Generator().manual_seed(0)
    x_all = torch.randn(6, 4, 3, 3, generator=g) * 2 + 1  # N(1, 4): values O(1), variance O(1)
    w_all = torch.randn(6, 4, 3, 3, generator=g)  # L = sum(w * layer(x))
    torch.manual_seed(1)
    ref = _bn_act()
    with torch.no_grad():  # parameters away from (1, 0), so their gradients matter
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    layer = D.convert_sync_batchnorm(nn.Sequential(copy.deepcopy(ref)), "cpu", TIMM.sync_norm_layer)[0]
    assert type(layer) is CPUSyncBatchNormAct and list(layer.state_dict()) == list(ref.state_dict())

    x_ref = x_all.clone().requires_grad_()
    y_ref = ref(x_ref)
    (w_all * y_ref).sum().backward()
    part = slice(3 * rank, 3 * rank + 3)
    x = x_all[part].clone().requires_grad_()
    y = layer(x)
    (w_all[part] * y).sum().backward()
    # float32: the one-pass variance sum(x^2)/N - mean^2 against torch's two-pass one differs by a
    # few ulps of E[x^2] (about 5 here), which the 1/sigma and the backward scale by O(1); SiLU
    # (slope <= 1.1) and the drop layer (x 0.5) do not enlarge it
    tol = dict(rtol=0, atol=64 * torch.finfo(torch.float32).eps * 5)
    torch.testing.assert_close(y, y_ref[part], **tol)
    torch.testing.assert_close(x.grad, x_ref.grad[part], **tol)
    torch.testing.assert_close(D.all_reduce_sum(layer.weight.grad), ref.weight.grad, **tol)
    torch.testing.assert_close(D.all_reduce_sum(layer.bias.grad), ref.bias.grad, **tol)
    torch.testing.assert_close(layer.running_mean, ref.running_mean, **tol)
    torch.testing.assert_close(layer.running_var, ref.running_var, **tol)
    assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked) == 1
    with torch.no_grad():  # and in eval mode, on the running statistics, as the original
        torch.testing.assert_close(layer.eval()(x_all), ref.eval()(x_all), **tol)


def test_cpu_sync_batchnorm_act_over_two_processes_equals_batchnorm_act_over_the_global_batch():
    mp.spawn(_worker, args=(2, _free_port()), nprocs=2, join=True)


@pytest.mark.parametrize("device_type, synced", [("cpu", "CPUSyncBatchNormAct"), ("cuda", "SyncBatchNormAct")])
def test_a_timm_network_converts_with_its_keys_and_its_activations(device_type, synced):
    """Every BatchNormAct2d of a timm MobileNetV3 becomes the device's synchronised layer with the same
    state-dict keys and values; outside a process group (where nothing is synchronised, so this runs
    without a GPU) the network computes what it computed, in training and eval mode: the activations
    after each norm are kept (torch's own converter drops them, and its output differs)."""
    torch.manual_seed(0)
    net = create_backbone("timm/mobilenetv3_small_050", in_chans=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    converted = D.convert_sync_batchnorm(copy.deepcopy(net), device_type, TIMM.sync_norm_layer)
    kinds = {type(m).__name__ for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kinds == {synced}
    after = converted.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    for mode in (True, False):
        with torch.no_grad():
            want = copy.deepcopy(net).train(mode)(x)
            assert torch.equal(copy.deepcopy(converted).train(mode)(x), want), f"training={mode}"
    if device_type == "cuda":  # what torch.nn.SyncBatchNorm.convert_sync_batchnorm would have done
        plain = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net))
        with torch.no_grad():
            assert not torch.allclose(plain.train()(x), copy.deepcopy(net).train()(x))


def test_a_subclass_the_family_does_not_know_is_still_refused():
    from timm.layers import BatchNormAct2d

    class MoreNormAct(BatchNormAct2d):  # a user's layer that may compute more still
        pass

    assert TIMM.sync_norm_layer(MoreNormAct(4), "cpu") is None
    net = nn.Sequential(_bn_act(), MoreNormAct(4))
    with pytest.raises(ValueError, match=r"1 BatchNorm layer\(s\).*1 \(MoreNormAct\).*sync_bn=false"):
        D.convert_sync_batchnorm(net, "cpu", TIMM.sync_norm_layer)
    assert type(net[0]) is BatchNormAct2d  # refused before anything was changed
    assert family_of("resnet18").sync_norm_layer(_bn_act(), "cpu") is None  # only timm's family knows it


def test_a_layer_used_twice_stays_one_layer():
    shared, plain = _bn_act(), nn.BatchNorm2d(4)
    net = D.convert_sync_batchnorm(nn.Sequential(shared, plain, shared, plain), "cpu", TIMM.sync_norm_layer)
    assert type(net[0]) is CPUSyncBatchNormAct and net[0] is net[2]
    assert type(net[1]) is D.CPUSyncBatchNorm and net[1] is net[3]
    assert net[0].act is shared.act and net[0].drop is shared.drop
