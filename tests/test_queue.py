import pytest
import torch

from swav.queue import FeatureQueue


def filled(world, length_local, n=2, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    queues = []
    for r in range(world):
        q = FeatureQueue(n, length_local, d)
        q.buffer.copy_(torch.randn(n, length_local, d, generator=g))
        q.in_use = True
        queues.append(q)
    return queues


def gather(queues):
    """What global_state_dict builds over ranks: (n, L_local*world, d) ordered by (position, rank)."""
    stacked = torch.stack([q.buffer for q in queues], dim=2)
    n, length, w, d = stacked.shape
    return {"buffer": stacked.reshape(n, length * w, d), "in_use": True}


def test_state_dict_round_trip():
    (q,) = filled(1, 6)
    r = FeatureQueue(2, 6, 3)
    r.load_state_dict(q.state_dict())
    assert torch.equal(r.buffer, q.buffer) and r.in_use


def test_resplit_two_ranks_to_one_and_back_is_identity():
    two = filled(2, 4)
    state = gather(two)
    one = FeatureQueue(2, 8, 3)
    one.load_global_state_dict(state, 0, 1)
    # the single queue holds every row, newest first (position 0 of both ranks, then 1, ...)
    assert torch.equal(one.buffer[:, 0], two[0].buffer[:, 0]) and torch.equal(one.buffer[:, 1], two[1].buffer[:, 0])
    back = [FeatureQueue(2, 4, 3) for _ in range(2)]
    for r, q in enumerate(back):
        q.load_global_state_dict(one.state_dict(), r, 2)
        assert torch.equal(q.buffer, two[r].buffer)


def test_resplit_same_world_is_identity():
    four = filled(4, 3)
    state = gather(four)
    for r in range(4):
        q = FeatureQueue(2, 3, 3)
        q.load_global_state_dict(state, r, 4)
        assert torch.equal(q.buffer, four[r].buffer)


def test_mismatched_state_is_an_error():
    q = FeatureQueue(2, 4, 3)
    with pytest.raises(ValueError, match="shape"):
        q.load_state_dict({"buffer": torch.zeros(2, 5, 3), "in_use": False})
    with pytest.raises(ValueError, match="ranks"):
        q.load_global_state_dict({"buffer": torch.zeros(2, 6, 3), "in_use": False}, 0, 2)


def test_batch_longer_than_queue_is_an_error():
    q = FeatureQueue(1, 2, 3)
    with pytest.raises(ValueError, match="shorter than the batch"):
        q.push_and_score(0, torch.zeros(4, 5), torch.zeros(4, 3), torch.zeros(5, 3))


def test_scores_are_queue_then_batch_every_call():
    """The (L + B, K) score matrix is a reused buffer: each call must hold exactly this call's
    [z_queue C^T ; batch scores], for every crop and head, with nothing left from the last call."""
    g = torch.Generator().manual_seed(1)
    q = FeatureQueue(2, 8, 3)
    q.buffer.copy_(torch.randn(2, 8, 3, generator=g))
    q.in_use = True
    for step in range(3):
        protos = [torch.randn(5, 3, generator=g), torch.randn(4, 3, generator=g)]
        for i in range(2):
            z = torch.randn(2, 3, generator=g)
            batch = [torch.randn(2, 5, generator=g).bfloat16(), torch.randn(2, 4, generator=g)]
            old = q.buffer[i].clone()
            got = q.push_and_score(i, batch, z, protos)
            for s, c, out in zip(batch, protos, got):
                assert out.dtype == torch.float32
                assert torch.allclose(out, torch.cat((old @ c.t(), s.float())), atol=1e-6)
            assert torch.equal(q.buffer[i, :2], z)  # newest first
            if i == 0:
                if step == 0:
                    first = got[0].data_ptr()
                assert got[0].data_ptr() == first  # crop 0, head 0 reuses one matrix
