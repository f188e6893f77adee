"""training.weight_average: the running mean of a run's own weights, carried by checkpoints and exported."""
from __future__ import annotations

import pytest
import torch

from asrflow.train.weight_average import WeightAverage

from . import trainer_fixtures as F


def _perturbed(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
        bn = model[1]
        bn.running_mean.add_(torch.randn(bn.running_mean.shape, generator=gen))
        bn.running_var.mul_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)
        bn.num_batches_tracked += 1


def test_the_mean_is_the_uniform_average_of_the_weights_after_the_due_steps():
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    wa = WeightAverage(start_step=3, every=2)
    assert [s for s in range(1, 12) if wa.due(s)] == [3, 5, 7, 9, 11]
    seen = []
    for step in range(1, 10):
        _perturbed(model, gen)
        if wa.update(model, step):
            seen.append({k: v.clone() for k, v in model.state_dict().items()})
    assert wa.count == len(seen) == 4  # steps 3, 5, 7 and 9
    mean = wa.averaged_state_dict(model.state_dict())
    assert set(mean) == set(model.state_dict())
    for name, value in mean.items():
        stacked = torch.stack([s[name] for s in seen])
        if torch.is_floating_point(value):  # parameters and BatchNorm statistics alike
            torch.testing.assert_close(value, stacked.mean(0), rtol=0, atol=1e-6)
            assert not torch.equal(value, seen[-1][name])
        else:  # num_batches_tracked: the newest count, not a mean
            assert value.dtype == torch.long and int(value) == int(seen[-1][name]) == 9


def test_the_mean_is_kept_in_float32_and_returned_in_the_models_dtypes():
    model = torch.nn.Linear(2, 2).half()
    wa = WeightAverage(1, 1)
    with torch.no_grad():
        for value in (1.0, 2.0, 4.0):
            model.weight.fill_(value)
            model.bias.fill_(value)
            wa.update(model, wa.count + 1)
    assert wa.weights["weight"].dtype == torch.float32
    mean = wa.averaged_state_dict(model.state_dict())
    assert mean["weight"].dtype == torch.float16 and torch.all(mean["weight"] == torch.tensor(7.0 / 3).half())


def test_the_mean_refuses_what_it_cannot_honour():
    with pytest.raises(ValueError, match="at least 1"):
        WeightAverage(0, 10)
    assert WeightAverage.from_params({"enabled": False, "start_step": 5}) is None
    wa = WeightAverage(5, 1)
    model = torch.nn.Linear(2, 2)
    wa.update(model, 4)  # before start_step: nothing joins
    with pytest.raises(RuntimeError, match="no step reached start_step 5"):
        wa.averaged_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="from step 5 every 1, this run from 6 every 1"):
        WeightAverage(6, 1).load_state_dict(wa.state_dict())


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> F.Setup:
    return F.build_setup(tmp_path_factory.mktemp("weight-average"))


AVERAGE = {"enabled": True, "start_step": 2, "every": 2}


@pytest.mark.slow
def test_training_averages_exports_the_mean_and_a_resumed_run_averages_the_same(setup, tmp_path):
    from asrflow.train.run import export_model
    from asrflow.train.trainer import TrainState, resume
    from asrflow.transcribe import emissions, load_for_model, load_model

    # uninterrupted: 6 steps, the weights after steps 2, 4 and 6 recorded as they happen
    ctx = F.single_process_context(setup, tmp_path / "a", weight_average=AVERAGE)
    due = []

    def record(c, state, _record) -> None:
        if c.weight_average.due(state.global_step):
            due.append({k: v.detach().clone() for k, v in c.model.state_dict().items()})

    state = TrainState()
    F.run_steps(ctx, state, 6, hooks=[record])
    assert ctx.weight_average.count == len(due) == 3
    mean = ctx.weight_average.averaged_state_dict(ctx.model.state_dict())
    for name, value in mean.items():
        if torch.is_floating_point(value):
            torch.testing.assert_close(value, torch.stack([d[name] for d in due]).mean(0), rtol=0, atol=1e-6)

    # model.pt holds the mean, not the last (or best) weights, and transcribes
    export_model(ctx, state, tmp_path / "model.pt")
    exported = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(exported[k], mean[k]) for k in exported)
    assert any(not torch.equal(exported[k], due[-1][k]) for k in exported if torch.is_floating_point(mean[k]))
    model = load_model(tmp_path / "model.pt")
    log_probs, lens = emissions(model, [load_for_model(u.audio) for u in setup.utts if u.split == "dev"][:2])
    assert torch.isfinite(log_probs).all() and (lens > 0).all()

    # interrupted after step 3 (a checkpoint every step), resumed by a new process's context from its checkpoint
    params = {"weight_average": AVERAGE, "checkpoint_every_steps": 1}
    first = F.single_process_context(setup, tmp_path / "b", **params)
    F.run_steps(first, TrainState(), 3)
    again = F.single_process_context(setup, tmp_path / "b", **params)
    resumed = resume(again)
    assert resumed.global_step == 3 and again.weight_average.count == 1
    F.run_steps(again, resumed, 3)
    assert again.weight_average.count == 3
    for name, value in again.weight_average.weights.items():
        assert torch.equal(value, ctx.weight_average.weights[name]), name
