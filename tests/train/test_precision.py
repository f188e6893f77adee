import pytest
import torch

from asrflow.train.precision import autocast_context, resolve_precision


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
