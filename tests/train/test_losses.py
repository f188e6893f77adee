import math

import pytest
import torch
import torch.nn.functional as F

from asrflow.train.losses import ConstantMixCTCLoss, SmoothedCTCLoss, build_ctc_loss

P = torch.tensor([0.5, 0.25, 0.25])  # blank, "a", "b"


def _const_frames(p, T=3):
    return p.log().expand(1, T, p.numel()).clone()


def _random_batch(B=3, T=12, V=6, S=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    log_probs = torch.randn(B, T, V, generator=g).log_softmax(-1)
    out_lens = torch.tensor([T, T - 3, T - 5][:B])
    target_lens = torch.tensor([S, S - 1, 2][:B])
    targets = torch.randint(1, V, (B, S), generator=g)
    return log_probs, out_lens, targets, target_lens


def test_hand_computed_uniform_posteriors():
    # T=3, V=3, target "a": the 6 alignments (a block of 1..3 "a"s, blanks elsewhere) each have
    # probability 3^-3, and a uniform posterior has zero smoothing term.
    lp = _const_frames(torch.full((3,), 1 / 3))
    out = SmoothedCTCLoss(smoothing=0.1)(lp, torch.tensor([3]), torch.tensor([[1]]), torch.tensor([1]))
    ctc = -math.log(6 / 27)
    assert out.ctc.item() == pytest.approx(ctc, abs=1e-5)
    assert out.smooth.item() == pytest.approx(0.0, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.9 * ctc, abs=1e-5)


def test_hand_computed_non_uniform_posteriors():
    lp = _const_frames(P)
    # alignments of "a" over 3 frames: k "a"s (prob .25 each) in a block, 3-k blanks (prob .5 each)
    p_target = 3 * 0.25 * 0.5**2 + 2 * 0.25**2 * 0.5 + 0.25**3
    ctc = -math.log(p_target)
    kl_u_p = sum((1 / 3) * math.log((1 / 3) / p) for p in P.tolist())  # = -log 3 - mean(log p)
    kl_p_u = sum(p * math.log(p * 3) for p in P.tolist())
    args = (lp, torch.tensor([3]), torch.tensor([[1]]), torch.tensor([1]))
    out = SmoothedCTCLoss(smoothing=0.2)(*args)
    assert out.ctc.item() == pytest.approx(ctc, abs=1e-5)
    assert out.smooth.item() == pytest.approx(kl_u_p, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.8 * ctc + 0.2 * kl_u_p, abs=1e-5)
    cp = SmoothedCTCLoss(smoothing=0.2, kind="confidence_penalty")(*args)
    assert cp.smooth.item() == pytest.approx(kl_p_u, abs=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_smoothing_equals_torch_ctc(reduction):
    lp, ol, tg, tl = _random_batch()
    ours = SmoothedCTCLoss(smoothing=0.0, reduction=reduction)(lp, ol, tg, tl).loss
    ref = F.ctc_loss(lp.transpose(0, 1), tg, ol, tl, reduction=reduction, zero_infinity=True)
    torch.testing.assert_close(ours, ref)
    plain = build_ctc_loss("plain", reduction=reduction)(lp, ol, tg, tl).loss
    torch.testing.assert_close(plain, ref)


def test_concatenated_targets_match_padded():
    lp, ol, tg, tl = _random_batch()
    flat = torch.cat([tg[b, :n] for b, n in enumerate(tl.tolist())])
    loss = SmoothedCTCLoss(smoothing=0.1)
    torch.testing.assert_close(loss(lp, ol, flat, tl).loss, loss(lp, ol, tg, tl).loss)


@pytest.mark.parametrize("kind", ["kl_uniform", "confidence_penalty"])
def test_padding_frames_do_not_change_loss_or_get_gradient(kind):
    lp, ol, tg, tl = _random_batch()
    garbage = torch.full((3, 5, lp.size(-1)), -1e4)
    garbage[:, :, 0] = float("-inf")  # even -inf in padding must not leak through 0 * inf
    padded = torch.cat([lp, garbage], 1).requires_grad_()
    loss = SmoothedCTCLoss(smoothing=0.3, kind=kind)
    ref = loss(lp, ol, tg, tl)
    out = loss(padded, ol, tg, tl)
    torch.testing.assert_close(out.loss, ref.loss)
    out.loss.backward()
    assert torch.isfinite(padded.grad).all()
    assert torch.all(padded.grad[:, lp.size(1):] == 0)
    assert torch.all(padded.grad[1, ol[1]:] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_fp32_result(dtype):
    lp, ol, tg, tl = _random_batch()
    low = lp.to(dtype)
    loss = SmoothedCTCLoss(smoothing=0.1)
    out = loss(low, ol, tg, tl)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, loss(low.float(), ol, tg, tl).loss)


def test_gradients_finite_and_smoothing_pulls_toward_uniform():
    logits = torch.randn(2, 10, 5, requires_grad=True)
    tg, tl, ol = torch.tensor([[1, 2], [3, 3]]), torch.tensor([2, 2]), torch.tensor([10, 8])
    out = SmoothedCTCLoss(smoothing=0.5)(logits.log_softmax(-1), ol, tg, tl)
    out.loss.backward()
    assert torch.isfinite(logits.grad).all()
    # the smoothing term alone: a gradient step on it moves posteriors toward uniform
    logits2 = torch.tensor([[[3.0, 0.0, -1.0]]], requires_grad=True)
    term = SmoothedCTCLoss(smoothing=0.5)(logits2.log_softmax(-1), torch.tensor([1]), torch.tensor([[1]]),
                                          torch.tensor([1])).smooth
    term.backward()
    assert logits2.grad[0, 0, 0] > 0 and logits2.grad[0, 0, 2] < 0


def test_weights_give_weighted_mean():
    lp, ol, tg, tl = _random_batch()
    loss = SmoothedCTCLoss(smoothing=0.1)
    per_utt = [loss(lp[b:b + 1], ol[b:b + 1], tg[b:b + 1], tl[b:b + 1]).loss for b in range(3)]
    w = torch.tensor([1.0, 0.0, 3.0])
    expected = (per_utt[0] * 1 + per_utt[2] * 3) / 4
    torch.testing.assert_close(loss(lp, ol, tg, tl, weights=w).loss, expected)
    torch.testing.assert_close(loss(lp, ol, tg, tl, weights=torch.ones(3)).loss, loss(lp, ol, tg, tl).loss)
    with pytest.raises(ValueError):
        loss(lp, ol, tg, tl, weights=torch.ones(2))


def test_zero_infinity_on_impossible_alignment():
    lp = torch.randn(2, 4, 5).log_softmax(-1).requires_grad_()
    tg = torch.tensor([[1, 1, 1, 1], [2, 3, 0, 0]])  # 4 repeated labels need 7 frames: impossible
    tl, ol = torch.tensor([4, 2]), torch.tensor([4, 4])
    out = SmoothedCTCLoss(smoothing=0.1, reduction="none")(lp, ol, tg, tl)
    assert torch.isfinite(out.loss).all()
    assert out.ctc[0].item() == 0.0 and out.ctc[1].item() > 0
    out.loss.sum().backward()
    assert torch.isfinite(lp.grad).all()


def test_constant_mix_is_the_reference_formula_and_not_a_distribution():
    lp, ol, tg, tl = _random_batch()
    s, V = 0.1, lp.size(-1)
    out = ConstantMixCTCLoss(smoothing=s)(lp, ol, tg, tl)
    mixed = lp * (1 - s) + s / V
    ref = F.ctc_loss(mixed.transpose(0, 1), tg, ol, tl, reduction="mean", zero_infinity=True)
    torch.testing.assert_close(out.loss, ref)
    assert not torch.allclose(mixed.exp().sum(-1), torch.ones(3, lp.size(1)))
    assert isinstance(build_ctc_loss("constant_mix", 0.1), ConstantMixCTCLoss)


def test_build_ctc_loss_validates():
    assert build_ctc_loss("smoothed", 0.2).smoothing == 0.2
    with pytest.raises(ValueError):
        build_ctc_loss("label_smoothing")
    with pytest.raises(ValueError):
        SmoothedCTCLoss(smoothing=1.0)
    with pytest.raises(ValueError):
        SmoothedCTCLoss(kind="entropy")
