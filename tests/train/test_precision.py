import copy
import math

import pytest
import torch

from asrflow.train.precision import (
    StepStats,
    autocast_context,
    make_grad_scaler,
    resolve_precision,
    step_with_nonfinite_guard,
)


def test_resolve_precision_policy(monkeypatch):
    from asrflow.train import precision

    for native in (True, False):  # bf16 autocast measured slower than fp32 on CPUs either way
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
        assert resolve_precision("auto", "cpu") == (None, False)
    assert resolve_precision("auto", "cuda") == (torch.float16, True)
    assert resolve_precision("fp16", torch.device("cuda:0")) == (torch.float16, True)
    assert resolve_precision("fp32", "cuda") == (None, False)
    assert resolve_precision("fp32", "cpu") == (None, False)
    assert resolve_precision("bf16", "cpu") == (torch.bfloat16, False)
    with pytest.raises(ValueError, match="CPU"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError):
        resolve_precision("half", "cpu")


def test_autocast_context():
    lin = torch.nn.Linear(4, 4)
    with autocast_context("cpu", torch.bfloat16):
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    with autocast_context("cpu", None):
        assert lin(torch.randn(2, 4)).dtype == torch.float32


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    return model, opt


def test_finite_step_updates_and_clips():
    model, opt = _setup()
    before = copy.deepcopy(model.state_dict())
    stats = StepStats()
    loss = (model(torch.randn(4, 3)) * 100).pow(2).mean()
    stepped, norm = step_with_nonfinite_guard(loss, opt, make_grad_scaler(False, "cpu"), model.parameters(), 1.0, stats)
    assert stepped and norm > 1.0 and math.isfinite(norm)
    assert stats.steps == 1 and stats.skipped == 0
    assert not torch.equal(model.weight, before["weight"])
    assert all(p.grad is None for p in model.parameters())


def test_nan_loss_leaves_weights_and_optimizer_untouched():
    model, opt = _setup()
    stats = StepStats()
    step_with_nonfinite_guard(model(torch.randn(4, 3)).sum(), opt, None, model.parameters(), 1.0, stats)
    weights, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    loss = model(torch.randn(4, 3)).sum() * float("nan")
    stepped, norm = step_with_nonfinite_guard(loss, opt, None, model.parameters(), 1.0, stats)
    assert not stepped and math.isnan(norm)
    assert stats.skipped_nonfinite_loss == 1 and stats.steps == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k])
    assert opt.state_dict()["state"][0]["step"] == opt_state["state"][0]["step"]
    assert all(p.grad is None for p in model.parameters())
    stepped, _ = step_with_nonfinite_guard(model(torch.randn(4, 3)).sum(), opt, None, model.parameters(), 1.0, stats)
    assert stepped and torch.isfinite(model.weight).all()  # training goes on normally


def test_gradient_overflow_with_scaler_skips_and_backs_off_scale():
    model, opt = _setup()
    scaler = make_grad_scaler(True, "cpu")
    weights = copy.deepcopy(model.state_dict())
    scale = scaler.get_scale()
    stats = StepStats()
    loss = model(torch.full((1, 3), 1e38)).sum()  # finite loss (inf only after scaling) -> inf grads
    stepped, norm = step_with_nonfinite_guard(loss, opt, scaler, model.parameters(), None, stats)
    assert not stepped and not math.isfinite(norm)
    assert stats.skipped_nonfinite_grad == 1
    assert scaler.get_scale() < scale
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k])
