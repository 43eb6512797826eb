import numpy as np
import pytest
import torch
import torch.nn.functional as F

from swav.loss import compute_codes, swapped_prediction_loss, swav_loss
from swav.queue import FeatureQueue
from swav.sinkhorn import sinkhorn


def official_loop(output, embedding, prototypes, bs, crops_for_assign, n_crops, temperature, eps, queue, use_queue):
    """The official training step's loss, written the official way (loops, numpy delete)."""
    loss = 0
    for i, crop_id in enumerate(crops_for_assign):
        with torch.no_grad():
            out = output[bs * crop_id: bs * (crop_id + 1)].detach()
            if queue is not None:
                if use_queue or not torch.all(queue[i, -1, :] == 0):
                    use_queue = True
                    out = torch.cat((torch.mm(queue[i], prototypes.t()), out))
                queue[i, bs:] = queue[i, :-bs].clone()
                queue[i, :bs] = embedding[crop_id * bs: (crop_id + 1) * bs]
            q = sinkhorn(out, eps, 3)[-bs:]
        subloss = 0
        for v in np.delete(np.arange(n_crops), crop_id):
            x = output[bs * v: bs * (v + 1)] / temperature
            subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss += subloss / (n_crops - 1)
    return loss / len(crops_for_assign), use_queue


def random_step(n_crops, bs, k=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n_crops * bs, d, generator=g), dim=1)
    c = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return z, c


@pytest.mark.parametrize("n_crops,cfa", [(2, [0, 1]), (4, [0, 1]), (8, [0, 1]), (3, [0]), (5, [1, 3]), (4, [0, 1, 2, 3])])
def test_loss_equals_official_loop(n_crops, cfa):
    z, c = random_step(n_crops, bs=6, seed=n_crops)
    out = (z @ c.t()).requires_grad_()
    ours, _ = swav_loss(out, z, c, 6, cfa, temperature=0.1, epsilon=0.05)
    ref, _ = official_loop(out, z, c, 6, cfa, n_crops, 0.1, 0.05, None, False)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    g1, = torch.autograd.grad(ours, out)
    g2, = torch.autograd.grad(ref, out)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


def test_queue_semantics_match_official_over_several_steps():
    bs, length, n_crops = 4, 12, 4
    ours_q = FeatureQueue(2, length, 8)
    ref_q = torch.zeros(2, length, 8)
    use = False
    in_use_history = []
    for step in range(5):
        z, c = random_step(n_crops, bs, seed=10 + step)
        out = z @ c.t()
        loss, full = swav_loss(out, z, c, bs, [0, 1], queue=ours_q)
        ref, use = official_loop(out, z, c, bs, [0, 1], n_crops, 0.1, 0.05, ref_q, use)
        torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ours_q.buffer, ref_q)
        in_use_history.append(ours_q.in_use)
        # codes come from the last B rows of Sinkhorn over [queue; batch]
        assert full[0][0].shape[0] == (length + bs if ours_q.in_use and step >= 3 else bs) or step < 3
    # 12 rows / 4 per step: full after 3 pushes, used from the 4th step on
    assert in_use_history == [False, False, False, True, True]


def test_queue_in_use_flag_persists():
    q = FeatureQueue(1, 4, 2)
    q.buffer[0, -1] = 1.0  # pretend full
    z, c = random_step(2, 2, k=3, d=2)
    out = q.push_and_score(0, z[:2] @ c.t(), z[:2], c)
    assert out.shape == (6, 3) and q.in_use
    q.buffer.zero_()  # even an emptied queue keeps being used once it was
    assert q.push_and_score(0, z[:2] @ c.t(), z[:2], c).shape == (6, 3)


def test_multi_head_loss_is_mean_of_heads():
    z, c1 = random_step(4, 5, k=7, seed=3)
    _, c2 = random_step(4, 5, k=5, seed=4)
    scores = [z @ c1.t(), z @ c2.t()]
    both, full = swav_loss(scores, z, [c1, c2], 5, [0, 1])
    l1, _ = swav_loss(scores[0], z, c1, 5, [0, 1])
    l2, _ = swav_loss(scores[1], z, c2, 5, [0, 1])
    torch.testing.assert_close(both, (l1 + l2) / 2)
    assert [f[0].shape[1] for f in full] == [7, 5]


def test_codes_carry_no_gradient():
    z, c = random_step(2, 4)
    out = (z @ c.t()).requires_grad_()
    codes, _ = compute_codes(out, z, c, [0, 1], 4)
    assert not codes[0][0].requires_grad


def test_bad_layouts_are_rejected():
    z, c = random_step(2, 4)
    with pytest.raises(ValueError, match="crop 5"):
        swapped_prediction_loss(z @ c.t(), [torch.ones(4, 12) / 12], [5])
    with pytest.raises(ValueError, match="at least 2 crops"):
        swapped_prediction_loss((z @ c.t())[:4], [torch.ones(4, 12) / 12], [0])
