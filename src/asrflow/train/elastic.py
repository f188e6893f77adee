"""Elastic training: the recipe of ``asrflow.train.run`` on a Horovod world that may shrink and grow.

    horovodrun --gloo --min-np 1 --max-np 8 --host-discovery-script workflow_scripts/discover_hosts.sh \\
        python -m asrflow.train.elastic --commit-every 20 <the arguments of asrflow.train.run>

Workers that fail (a node lost, a process killed) are dropped and training goes on with the others
from the last commit; hosts that the discovery script lists later are added. Built on
``hvd.elastic.run`` and ``hvd.elastic.TorchState`` (model, optimizer, epoch, batch and the counters)
around the pieces of ``asrflow.train.trainer``: each step as ``train_one_epoch`` takes it
(``training_step``, ``learning_rate``), ``end_of_epoch`` (dev scores, checkpoint),
``should_stop`` / ``stop_after_epoch``; the context is ``asrflow.train.run.build_context``'s.

What changes with the world size, on every reset (``on_reset``):

* ranks and size are re-read from Horovod, the bucket sampler is re-sharded for the new world, the
  current epoch continues at the same fraction of its batches;
* the learning rate is rescaled (``lr_scale_with_workers``: peak lr x number of workers) and the
  schedule's length (``total_steps``) recomputed.

Commits (``state.commit()``) copy model and optimizer to host memory: every ``--commit-every`` steps and
at each epoch's end. A failure loses the steps since the last commit. Checkpoints on disk are the
trainer's own (``checkpoints/step-*.pt``, ``best.pt``), so a non-elastic run can resume from them and
this one resumes from a non-elastic run's.

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
import time
from pathlib import Path

import torch

from asrflow.manifest import read_manifest, write_json
from asrflow.train.checkpoint import latest_checkpoint, load_checkpoint
from asrflow.train.data import AudioStore
from asrflow.train.distributed import HorovodWorld
from asrflow.train.models import batchnorm_modules, count_parameters
from asrflow.train.params import TrainParams
from asrflow.train.run import build_context, export_model, log_pytorch_model
from asrflow.train.run import parse_args as parse_run_args
from asrflow.train.trainer import (Context, TrainState, archive_if_stale, end_of_epoch,
                                   learning_rate,
                                   save, should_stop, step_seed, stop_after_epoch, time_budget_spent,
                                   training_step)

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

    def set_lr(self, step: int) -> float:
        lr = learning_rate(self.ctx.params, step, self.ctx.total_steps, self.ctx.world.size, self.state.train_seconds)
        for group in self.ctx.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def on_reset(self) -> None:
        """After workers were added or removed: new shards, new learning rate."""
        old, new = self.world_size, self.ctx.world.size
        self.world_size = new
        self.reshard()
        lr = self.set_lr(self.state.global_step)
        self.resets += 1
        self.world_sizes.append(new)
        log.info("reset %d: %d -> %d worker(s), now rank %d; lr rescaled to %.2e; %d batches/epoch/rank",
                 self.resets, old, new, self.ctx.world.rank, lr, len(self.ctx.sampler))

    # -- state ---------------------------------------------------------------------------------------
    def initial_state(self, resumed: TrainState):
        import horovod.torch as hvd

        # Only immutable values besides model/optimizer: ObjectState.save() keeps references, so a
        # mutated list would leak uncommitted changes past a restore.
        self.state = hvd.elastic.TorchState(
            model=self.ctx.model, optimizer=self.ctx.optimizer, epoch=resumed.epoch, batch=resumed.batch_in_epoch,
            epoch_batches=0, global_step=resumed.global_step, skipped_steps=resumed.skipped_steps,
            best_dev_loss=resumed.best_dev_loss, epochs_without_improvement=resumed.epochs_without_improvement,
            train_seconds=resumed.train_seconds, history=tuple(resumed.history), stop_reason="")
        self.state.register_reset_callbacks([self.on_reset])
        return self.state

    def train_state(self) -> TrainState:
        """The elastic state as the trainer's TrainState (what checkpoints, end_of_epoch and the
        export work with)."""
        s = self.state
        return TrainState(epoch=s.epoch, batch_in_epoch=s.batch, global_step=s.global_step, skipped_steps=s.skipped_steps,
                          best_dev_loss=s.best_dev_loss, epochs_without_improvement=s.epochs_without_improvement,
                          train_seconds=s.train_seconds, history=[dict(h) for h in s.history],
                          finished=bool(s.stop_reason), stop_reason=s.stop_reason)

    def absorb(self, ts: TrainState) -> None:
        """Copy what a trainer function changed in a TrainState view back into the elastic state."""
        s = self.state
        s.epoch, s.batch, s.global_step, s.skipped_steps = ts.epoch, ts.batch_in_epoch, ts.global_step, ts.skipped_steps
        s.best_dev_loss, s.epochs_without_improvement = ts.best_dev_loss, ts.epochs_without_improvement
        s.train_seconds, s.history, s.stop_reason = ts.train_seconds, tuple(ts.history), ts.stop_reason

    # -- the loop -------------------------------------------------------------------------------------
    def run(self) -> None:
        import horovod.torch as hvd

        @hvd.elastic.run
        def train(state) -> None:
            self.train_loop(state)

        train(self.state)

    def train_loop(self, state) -> None:
        """Runs (again, after every reset) from the last committed state to the end of training: the
        trainer's fit() loop, with commits."""
        ctx = self.ctx
        while not state.stop_reason:
            ts = self.train_state()
            if stop_after_epoch(ctx, ts) or should_stop(ctx, ts):
                self.absorb(ts)
                break
            ctx.sampler.set_epoch(state.epoch)
            batches = list(ctx.sampler)
            if state.epoch_batches and state.epoch_batches != len(batches):
                # the world changed mid-epoch: go on at the same fraction of the (re-sharded) epoch
                state.batch = min(len(batches), math.floor(state.batch * len(batches) / state.epoch_batches))
            state.epoch_batches = len(batches)
            completed = self.train_epoch(state, batches)
            ts = self.train_state()
            end_of_epoch(ctx, ts, partial=not completed and ts.batch_in_epoch < len(batches))
            ts.history[-1]["workers"] = ctx.world.size
            if not completed and not ts.stop_reason:
                ts.stop_reason = "stopped mid-epoch"
            self.absorb(ts)
            state.epoch_batches = 0
            state.commit()

    def train_epoch(self, state, batches: list) -> bool:
        """The rest of the epoch; False when a stop criterion (steps, time budget) fired."""
        ctx, p = self.ctx, self.ctx.params
        ctx.model.train()
        for index in range(state.batch, len(batches)):
            budget_spent = self.step(batches[index], index)
            state.batch = index + 1
            state.global_step += 1
            if state.global_step % p.log_every == 0:
                self.log_step()
            ts = self.train_state()
            if should_stop(ctx, ts, budget_spent):
                state.stop_reason = ts.stop_reason
                return False
            if state.global_step % self.commit_every == 0:
                state.commit()
        return True

    def step(self, batch_ids, index: int) -> bool:
        """One optimizer step, as trainer.train_one_epoch takes it; returns the agreed budget vote."""
        ctx, p, world, state, opt = self.ctx, self.ctx.params, self.ctx.world, self.state, self.ctx.optimizer
        t0 = time.time()
        seed = step_seed(p, state.epoch, index, world.rank)
        torch.manual_seed(seed)
        ctx.aug.reseed(seed)
        self.set_lr(state.global_step)
        batch = ctx.train_store.collate(batch_ids)
        bns = batchnorm_modules(ctx.model)
        out, stepped, _, budget_spent = training_step(ctx, batch, bns, state.global_step,
                                                      stop_vote=time_budget_spent(p, state.train_seconds))
        if not stepped:
            state.skipped_steps += 1
        self.last_loss = float(out.loss.detach())
        state.train_seconds += time.time() - t0
        return budget_spent

    def log_step(self) -> None:
        ctx, state = self.ctx, self.state
        loss = float(ctx.world.average(torch.tensor([self.last_loss], dtype=torch.float64), name="elastic.loss"))
        if ctx.world.is_main:
            log.info("epoch %d step %d loss %.3f lr %.2e workers %d", state.epoch, state.global_step, loss,
                     ctx.optimizer.param_groups[0]["lr"], ctx.world.size)


def full_dev_store(args: argparse.Namespace, params: TrainParams, ctx: Context) -> None:
    """The whole dev set on every worker; evaluate_dev takes each rank's share, whatever the size."""
    dev = sorted((u for u in read_manifest(args.manifest) if u.split == "dev"), key=lambda u: u.id)
    if params.dev_max_utterances:
        dev = dev[: params.dev_max_utterances]
    ctx.dev_store = AudioStore(dev, ctx.vocab)
    ctx.dev_ids = ctx.dev_store.ids()


def resume_locally(ctx: Context) -> TrainState:
    """The newest checkpoint, loaded by rank 0 alone: no collective may run outside hvd.elastic.run
    (a worker that joins later would wait in it forever); the first state.sync() broadcasts it."""
    if not ctx.world.is_main:
        return TrainState()
    path = latest_checkpoint(ctx.out_dir / "checkpoints")
    if path is not None and ctx.archive_stale_checkpoints:
        path = archive_if_stale(ctx.out_dir / "checkpoints", path, ctx.spec)
    if path is None:
        return TrainState()
    payload = load_checkpoint(path, ctx.spec)
    ctx.model.load_state_dict(payload["model"])
    ctx.optimizer.load_state_dict(payload["optimizer"])
    ctx.scaler.load_state_dict(payload["scaler"])
    log.info("resuming from %s (epoch %d, step %d)", path, payload["state"]["epoch"], payload["state"]["global_step"])
    return TrainState(**payload["state"])


def main(argv: list[str] | None = None) -> int:
    own, args = parse_args(argv)
    world = ElasticWorld()
    setup_logging(args.log_dir)
    params = TrainParams.from_config(json.loads(args.params.read_text()))
    ctx = build_context(args, params, world)
    ctx.archive_stale_checkpoints = args.archive_stale_checkpoints
    full_dev_store(args, params, ctx)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    trainer = ElasticTrainer(ctx, own.commit_every)
    log.info("worker pid %d on %s: rank %d of %d (elastic), device %s, %d parameters, %d batches/epoch/rank",
             os.getpid(), socket.gethostname(), world.rank, world.size, ctx.device, count_parameters(ctx.model),
             len(ctx.sampler))
    trainer.initial_state(resume_locally(ctx))
    trainer.run()
    state = trainer.train_state()
    state.finished = True
    state.stop_reason = state.stop_reason or f"{params.epochs} epochs done"
    if world.is_main:
        save(ctx, state, is_best=False)
        model_path = args.out_dir / "model.pt"
        export_model(ctx, state, model_path)
        summary = {"variant": params.variant, "stop_reason": state.stop_reason, "global_step": state.global_step,
                   "epochs": state.epoch, "skipped_steps": state.skipped_steps, "train_seconds": state.train_seconds,
                   "best_dev_loss": state.best_dev_loss, "history": state.history, "world_size": world.size,
                   "elastic": {"resets": trainer.resets, "world_sizes": trainer.world_sizes,
                               "commit_every": own.commit_every},
                   "precision": str(ctx.amp_dtype or "fp32"), "parameters": count_parameters(ctx.model)}
        write_json(args.out_dir / "train_summary.json", summary)
        track(args, params, ctx, state, summary, model_path)
        log.info("done: %s (%d reset(s), world sizes %s)", state.stop_reason, trainer.resets, trainer.world_sizes)
    world.shutdown()
    return 0


def track(args: argparse.Namespace, params: TrainParams, ctx: Context, state: TrainState, summary: dict,
          model_path: Path) -> None:
    """One MLflow run for the whole elastic training, written at the end by the final rank 0."""
    from asrflow.tracking import StepRun, resolve_tracking_uri

    run_config = json.loads(args.run_config.read_text()) if args.run_config else {}
    with StepRun("train", run_config, args.experiment, resolve_tracking_uri(args.tracking_uri),
                 run_name=f"train[{params.variant}]", extra_tags={"asrflow.variant": params.variant,
                                                                  "asrflow.elastic": "true"}) as tracker:
        tracker.params({f"train.{k}": v for k, v in params.to_dict().items()} |
                       {"world_size": ctx.world.size, "backend": ctx.world.backend, "device": str(ctx.device),
                        "parameters": count_parameters(ctx.model)})
        for entry in state.history:
            tracker.metrics({k: v for k, v in entry.items() if k not in ("epoch", "step")}, step=entry["step"])
        tracker.metrics({"skipped_steps_total": state.skipped_steps, "best_dev_loss": state.best_dev_loss,
                         "elastic_resets": summary["elastic"]["resets"]})
        tracker.artifact(args.out_dir / "train_summary.json")
        log_pytorch_model(tracker, model_path)


if __name__ == "__main__":
    sys.exit(main())
