"""Elastic training: the recipe of ``asrflow.train.run`` on a Horovod world that may shrink and grow.

    horovodrun --gloo --min-np 1 --max-np 8 --host-discovery-script workflow_scripts/discover_hosts.sh \\
        python -m asrflow.train.elastic --commit-every 20 <the arguments of asrflow.train.run>

Workers that fail (a node lost, a process killed) are dropped and training goes on with the others
from the last commit; hosts that the discovery script lists later are added. Built on
``hvd.elastic.run`` and ``hvd.elastic.TorchState`` (model, optimizer, epoch, batch and the counters)
around the trainer's own epoch loop (``asrflow.train.trainer.run_batches``, the one step function
``training_step``) with a commit hook, ``end_of_epoch`` (dev scores, checkpoint),
``should_stop`` / ``stop_after_epoch``; the context is ``asrflow.train.run.build_context``'s, and
the end (export, summary, MLflow) is ``asrflow.train.run.finish``.

What changes with the world size, on every reset (``on_reset``):

* ranks and size are re-read from Horovod, the bucket sampler is re-sharded for the new world, the
  current epoch continues at the same fraction of its batches;
* the learning rate follows the new size at the next step (``lr_scale_with_workers``: peak lr x
  number of workers) and the schedule's length (``total_steps``) is recomputed.

Commits (``state.commit()``) copy model and optimizer to host memory: every ``--commit-every`` steps and
at each epoch's end. A failure loses the steps since the last commit. Checkpoints on disk are the
trainer's own (``checkpoints/step-*.pt``, ``best.pt``), so a non-elastic run can resume from them and
this one resumes from a non-elastic run's.

The running mean of the weights (``training.weight_average``) is part of the elastic state: every rank
keeps the same mean (every rank holds the same weights after each step), a commit stores a copy of it with
the weights, a reset rolls it back with them to the last commit, and the sync after a reset broadcasts rank
0's, so a worker that joins (or a survivor that becomes rank 0) holds the mean of exactly the committed
trajectory; steps redone after a rollback are averaged once.

Limits: the mixed-precision loss scaler is not part of the elastic state (it restarts at its initial
scale after a reset), and MLflow records the run at the end, from the final rank 0.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import socket
import sys
from pathlib import Path

from asrflow.train.checkpoint import latest_checkpoint, load_checkpoint
from asrflow.train.distributed import HorovodWorld
from asrflow.train.models import count_parameters
from asrflow.train.params import TrainParams
from asrflow.train.run import build_context, finish, tracked_run
from asrflow.train.run import parse_args as parse_run_args
from asrflow.train.trainer import (Context, StepRecord, TrainState, archive_if_stale, end_of_epoch, run_batches,
                                   learning_rate, log_parent, restore, save, should_stop, start_from_parent,
                                   stop_after_epoch)

log = logging.getLogger("asrflow.train.elastic")


class ElasticWorld(HorovodWorld):
    """A HorovodWorld whose rank and size follow Horovod after every reset (hvd.shutdown + hvd.init
    re-number the workers); HorovodWorld reads them once."""

    backend = "horovod-elastic"

    rank = property(lambda self: self.hvd.rank(), lambda self, value: None)
    size = property(lambda self: self.hvd.size(), lambda self, value: None)
    local_rank = property(lambda self: self.hvd.local_rank(), lambda self, value: None)
    local_size = property(lambda self: self.hvd.local_size(), lambda self, value: None)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    ap = argparse.ArgumentParser(description="Elastic Horovod training; other arguments as asrflow.train.run",
                                 add_help=False)
    ap.add_argument("--commit-every", type=int, default=20,
                    help="commit the elastic state (to host memory) every N steps; and at each epoch's end")
    own, rest = ap.parse_known_args(argv)
    if own.commit_every < 1:
        ap.error("--commit-every must be >= 1")
    return own, parse_run_args(rest)


def setup_logging(log_dir: Path | None) -> None:
    """Every worker logs to stderr (horovodrun prefixes its rank) and to its own file: ranks change
    on a reset, so files are named by host and process."""
    host, pid = socket.gethostname(), os.getpid()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_dir / f"worker-{host}-{pid}.log", mode="a"))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format=f"%(asctime)s {host}/{pid} %(levelname)s %(message)s")


class ElasticTrainer:
    """The trainer's epoch loop (``run_batches``) inside ``hvd.elastic.run``, with a commit hook.

    The elastic state holds the model, the optimizer, the TrainState as one value (``train``) and the weight
    mean's state (``weight_average``, None when off): a commit stores fresh copies of both, so the working
    TrainState and mean of the loop never leak uncommitted changes past a restore (ObjectState keeps
    references).
    """

    def __init__(self, ctx: Context, commit_every: int):
        self.ctx, self.commit_every = ctx, commit_every
        self.base_sampler = ctx.sampler  # as build_context made it (bucketing, oversampling, ...)
        self.world_size = ctx.world.size
        self.resets = 0                         # what this worker saw; the final rank 0 reports its own
        self.world_sizes = [ctx.world.size]
        self.reshard()

    # -- what depends on the world ------------------------------------------------------------------
    def reshard(self) -> None:
        """build_context's sampler with this worker's current rank and world size (the sampler cuts
        each epoch's global batch list by rank and size when iterated)."""
        ctx, p = self.ctx, self.ctx.params
        sampler = copy.copy(self.base_sampler)
        sampler.rank, sampler.world_size = ctx.world.rank, ctx.world.size
        ctx.sampler = sampler
        ctx.total_steps = p.max_steps or p.epochs * len(ctx.sampler)

    def on_reset(self) -> None:
        """After workers were added or removed: new shards (the LR follows the new world size at the
        next step, as prepare_step computes it from ``world.size``)."""
        old, new = self.world_size, self.ctx.world.size
        self.world_size = new
        self.reshard()
        self.resets += 1
        self.world_sizes.append(new)
        ts = self.state.train
        lr = learning_rate(self.ctx.params, ts.global_step, self.ctx.total_steps, new, ts.train_seconds)
        log.info("reset %d: %d -> %d worker(s), now rank %d; lr rescaled to %.2e; %d batches/epoch/rank",
                 self.resets, old, new, self.ctx.world.rank, lr, len(self.ctx.sampler))

    # -- state ---------------------------------------------------------------------------------------
    def initial_state(self, resumed: TrainState):
        import horovod.torch as hvd

        self.state = hvd.elastic.TorchState(model=self.ctx.model, optimizer=self.ctx.optimizer,
                                            train=copy.deepcopy(resumed), epoch_batches=0,
                                            weight_average=self.weight_mean_copy())
        self.state.register_reset_callbacks([self.on_reset])
        return self.state

    def weight_mean_copy(self) -> dict | None:
        wa = self.ctx.weight_average
        return None if wa is None else copy.deepcopy(wa.state_dict())

    def commit(self, working: TrainState) -> None:
        self.state.train = copy.deepcopy(working)
        self.state.weight_average = self.weight_mean_copy()
        self.state.commit()

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> TrainState:
        import horovod.torch as hvd

        @hvd.elastic.run
        def train(state) -> None:
            self.train_loop(state)

        train(self.state)
        return copy.deepcopy(self.state.train)

    def train_loop(self, state) -> None:
        """Runs (again, after every reset) from the last committed state to the end of training: the
        trainer's fit() loop, with commits."""
        ctx = self.ctx
        ts = copy.deepcopy(state.train)  # the working copy; committed copies live in state.train
        if ctx.weight_average is not None:  # the committed mean, rank 0's after a reset's sync
            ctx.weight_average.load_state_dict(state.weight_average)
        while not ts.stop_reason:
            if stop_after_epoch(ctx, ts) or should_stop(ctx, ts):
                break
            ctx.sampler.set_epoch(ts.epoch)
            batches = list(ctx.sampler)
            if state.epoch_batches and state.epoch_batches != len(batches):
                # the world changed mid-epoch: go on at the same fraction of the (re-sharded) epoch
                ts.batch_in_epoch = min(len(batches), math.floor(ts.batch_in_epoch * len(batches) / state.epoch_batches))
            state.epoch_batches = len(batches)
            completed = run_batches(ctx, ts, batches, hooks=[self.commit_hook])
            end_of_epoch(ctx, ts, partial=not completed and ts.batch_in_epoch < len(batches))
            ts.history[-1]["workers"] = ctx.world.size
            if not completed and not ts.stop_reason:
                ts.stop_reason = "stopped mid-epoch"
            state.epoch_batches = 0
            self.commit(ts)
        self.state.train = copy.deepcopy(ts)

    def commit_hook(self, ctx: Context, ts: TrainState, record: StepRecord) -> None:
        if ts.global_step % self.commit_every == 0:
            self.commit(ts)


def resume_locally(ctx: Context) -> TrainState:
    """The newest checkpoint, loaded by rank 0 alone: no collective may run outside hvd.elastic.run
    (a worker that joins later would wait in it forever); the first state.sync() broadcasts it."""
    if not ctx.world.is_main:
        return TrainState()
    path = latest_checkpoint(ctx.out_dir / "checkpoints")
    if path is not None and ctx.archive_stale_checkpoints:
        path = archive_if_stale(ctx.out_dir / "checkpoints", path, ctx.spec)
    if path is None:
        if ctx.params.init_from:
            start_from_parent(ctx)  # the first state.sync() broadcasts rank 0's weights
        return TrainState()
    payload = load_checkpoint(path, ctx.spec)
    log.info("resuming from %s (epoch %d, step %d)", path, payload["state"]["epoch"], payload["state"]["global_step"])
    return restore(ctx, payload)


def main(argv: list[str] | None = None) -> int:
    own, args = parse_args(argv)
    params = TrainParams.from_config(json.loads(args.params.read_text()))
    world = ElasticWorld()
    setup_logging(args.log_dir)
    ctx = build_context(args, params, world)
    ctx.archive_stale_checkpoints = args.archive_stale_checkpoints
    args.out_dir.mkdir(parents=True, exist_ok=True)
    trainer = ElasticTrainer(ctx, own.commit_every)
    log.info("worker pid %d on %s: rank %d of %d (elastic), device %s, %d parameters, %d batches/epoch/rank",
             os.getpid(), socket.gethostname(), world.rank, world.size, ctx.device, count_parameters(ctx.model),
             len(ctx.sampler))
    trainer.initial_state(resume_locally(ctx))
    state = trainer.run()
    state.finished = True
    state.stop_reason = state.stop_reason or f"{params.epochs} epochs done"
    if world.is_main:
        save(ctx, state, is_best=False)
        # One MLflow run for the whole elastic training, opened by the final rank 0 (ranks change on a
        # reset); the per-epoch dev scores are replayed into it at their steps.
        with tracked_run(args, ctx, extra_tags={"asrflow.elastic": "true"}) as tracker:
            if ctx.init_report is not None:
                log_parent(tracker, ctx.init_report)
            for entry in state.history:
                tracker.metrics({k: v for k, v in entry.items() if k not in ("epoch", "step")}, step=entry["step"])
            tracker.metrics({"elastic_resets": trainer.resets})
            finish(args, ctx, state, tracker, extra={"elastic": {"resets": trainer.resets, "world_sizes": trainer.world_sizes,
                                                                  "commit_every": own.commit_every}})
        log.info("%d reset(s), world sizes %s", trainer.resets, trainer.world_sizes)
    world.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
