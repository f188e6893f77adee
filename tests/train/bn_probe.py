"""Run under ``horovodrun -np 2 --gloo``: what each rank holds after data-parallel steps.

    horovodrun -np 2 -H localhost:2 --gloo python tests/train/bn_probe.py DUMP_DIR [--then-train] <train.run arguments>

Builds the real training context (``asrflow.train.run.build_context``) on a Horovod world, then

1. broadcasts rank 0's weights (as ``fit`` does) and records them;
2. computes a purely local gradient on this rank's first batch with a plain, unwrapped copy of the
   model (what the ranks would disagree on without the gradient allreduce);
3. runs one real training step (``train_one_epoch`` with ``max_steps=1``) and records the parameters;
4. runs the rest of the epoch, records the BatchNorm running statistics, calls
   ``average_batchnorm_statistics`` and records them again;
5. runs a few steps with a time budget spent on one rank's clock only, first rank 1's, then rank 0's,
   and records how many steps each rank took.

Each rank writes ``DUMP_DIR/rank{r}.pt``; the test compares the ranks' files.

With ``--then-train`` the same processes then run the real entry point, ``asrflow.train.run.main``
with the same arguments (what ``workflow_scripts/train.py`` does), from a freshly built context: one
Horovod launch serves both the probe and the two-process smoke run (process start-up dominates the
cost of these tests on a small machine).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from asrflow.train.distributed import average_batchnorm_statistics, init_distributed
from asrflow.train.params import TrainParams
from asrflow.train.run import build_context, parse_args
from asrflow.train.trainer import TrainState, compute_loss, train_one_epoch


def bn_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            out[f"{name}.running_mean"] = m.running_mean.detach().clone()
            out[f"{name}.running_var"] = m.running_var.detach().clone()
    return out


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def main(argv: list[str]) -> int:
    import json

    dump_dir, rest = Path(argv[0]), argv[1:]
    then_train = bool(rest) and rest[0] == "--then-train"
    train_argv = rest[1:] if then_train else rest
    args = parse_args(train_argv)
    world = init_distributed(require_horovod=True)
    params = TrainParams.from_config(json.loads(args.params.read_text()))
    ctx = build_context(args, params, world)
    ctx.world.broadcast_model_and_optimizer(ctx.model, ctx.optimizer)
    record: dict = {"rank": world.rank, "size": world.size, "initial": parameters(ctx.model)}

    ctx.sampler.set_epoch(0)
    batches = list(ctx.sampler)
    record["batch_ids"] = batches

    # A local gradient (no allreduce): a plain copy of the model on this rank's first batch.
    local = copy.deepcopy(ctx.model)
    local.train()
    torch.manual_seed(0)
    batch = ctx.loader.reader[batches[0]]
    out = compute_loss(local, ctx.loss_fn, batch, ctx.logmel, None, ctx.device, ctx.amp_dtype, ctx.class_weights)
    out.loss.backward()
    record["local_grads"] = {k: p.grad.detach().clone() for k, p in local.named_parameters() if p.grad is not None}
    del local

    state = TrainState()
    ctx.params.max_steps = 1
    assert not train_one_epoch(ctx, state), "max_steps=1 must stop after the first step"
    record["after_step1"] = parameters(ctx.model)
    record["skipped_after_step1"] = state.skipped_steps

    ctx.params.max_steps = 0
    assert train_one_epoch(ctx, state), "the rest of the epoch must run to its end"
    record["steps"] = state.global_step
    record["bn_before"] = bn_buffers(ctx.model)
    record["bn_layers_averaged"] = average_batchnorm_statistics(ctx.model, world)
    record["bn_after"] = bn_buffers(ctx.model)
    record["end_of_epoch"] = parameters(ctx.model)

    # The time budget is rank 0's clock, agreed within the step: a rank whose own clock says "spent"
    # must not stop alone (allreduce would hang), and rank 0's "spent" stops every rank on the same step.
    record["budget_steps"] = {}
    for who_is_out_of_time in (1, 0):
        state = TrainState(epoch=1, global_step=state.global_step, train_seconds=1.0)
        ctx.params.max_steps = state.global_step + 3
        ctx.params.time_budget_minutes = 1e-6 if world.rank == who_is_out_of_time else 0.0
        start = state.global_step
        train_one_epoch(ctx, state)
        record["budget_steps"][who_is_out_of_time] = (state.global_step - start, state.stop_reason)

    dump_dir.mkdir(parents=True, exist_ok=True)
    torch.save(record, dump_dir / f"rank{world.rank}.pt")
    if then_train:
        from asrflow.train.run import main as train_main

        del ctx
        return train_main(train_argv)  # hvd.init() again is a no-op; main shuts Horovod down at its end
    world.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
