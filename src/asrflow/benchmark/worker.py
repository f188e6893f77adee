"""One rank of a benchmark measurement: real training steps on the prepared data, timed.

Run as ``python -m asrflow.benchmark.worker ...`` (one process) or under
``horovodrun -np N -H localhost:N --gloo python -m asrflow.benchmark.worker ...``. For each case of
the spec (precision, batching mode, gradient checkpointing) it builds the training context with the
trainer's own ``build_context`` (model, ``hvd.DistributedOptimizer``, GradScaler, augmenters, the
loader workers), then runs warm-up and measured steps through the trainer's own epoch loop
(``run_batches``, the one ``training_step``), timing the data side (waiting for the loader, feature
extraction and augmentation, through forward hooks) apart from the rest in a step hook. Rank 0
collects every rank's records with an allreduce and writes one JSON file.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from asrflow.benchmark.gpu import GpuSampler
from asrflow.benchmark.memory import MB, MemoryProbe, SavedTensorMeter
from asrflow.benchmark.padding import batch_frames, benchmark_schedule
from asrflow.benchmark.throughput import precision_label
from asrflow.manifest import write_json
from asrflow.train.distributed import World, init_distributed
from asrflow.train.models import count_parameters
from asrflow.train.params import TrainParams
from asrflow.train.run import build_context, setup_logging
from asrflow.train.sampler import BucketPlan
from asrflow.train.trainer import Context, StepRecord, TrainState, run_batches

log = logging.getLogger("asrflow.benchmark")

# per-step fields each rank records (summed over ranks by allreduce, except step_s: max, see below)
STEP_FIELDS = ("step_s", "loader_wait_s", "features_s", "cpu_s", "utts", "audio_s", "real_frames", "padded_frames")
RANK_FIELDS = ("rss_before_mb", "peak_rss_mb", "peak_reset", "cuda_max_allocated_mb", "cuda_max_reserved_mb",
               "gpu_util_mean", "gpu_util_max", "gpu_mem_used_max_mb", "skipped_steps", "saved_activations_mb")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--manifest", required=True, type=Path)
    ap.add_argument("--plan", required=True, type=Path,
                    help="plan of the utterances to load (the benchmark's subset of the training set)")
    ap.add_argument("--schedule-plan", type=Path, default=None,
                    help="plan the batches are drawn from (the whole training set; default: --plan)")
    ap.add_argument("--vocab", required=True, type=Path)
    ap.add_argument("--cmvn", required=True, type=Path)
    ap.add_argument("--noise", type=Path, default=None)
    ap.add_argument("--params", required=True, type=Path, help="JSON training params (the variant's recipe)")
    ap.add_argument("--spec", required=True, type=Path,
                    help='JSON: {"seed", "steps", "warmup_steps", "cases": [{"name", "precision", "batching", '
                         '"gradient_checkpointing"}]}')
    ap.add_argument("--out", required=True, type=Path, help="rank 0 writes the measurements here")
    ap.add_argument("--log-dir", type=Path, default=None)
    ap.add_argument("--encoder-cache", type=Path, default=None, help="the variant's frozen-encoder cache, if it trains from one")
    ap.add_argument("--phones", type=Path, default=None, help="phone lexicon, for a recipe with a phone CTC head")
    args = ap.parse_args(argv)
    args.out_dir = args.out.parent  # build_context wants one; nothing is written there
    return args


class FeatureTimer:
    """Wall time spent inside the feature/augmentation modules (LogMel, CMVN, noise, speed, SpecAugment, VTLP)."""

    def __init__(self, ctx: Context):
        self.cuda = ctx.device.type == "cuda"
        self.seconds = 0.0
        self._t0: dict[int, float] = {}
        self._handles = []
        modules = [ctx.logmel, getattr(ctx.model, "cmvn", None), ctx.aug.noise, ctx.aug.speed, ctx.aug.specaug, ctx.aug.vtlp,
                   ctx.aug.filter]
        for m in modules:
            if m is not None:
                self._handles.append(m.register_forward_pre_hook(self._pre))
                self._handles.append(m.register_forward_hook(self._post))

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, module, args) -> None:
        self._t0[id(module)] = self._now()

    def _post(self, module, args, output) -> None:
        self.seconds += self._now() - self._t0.pop(id(module))

    def take(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class StepRecorder:
    """The benchmark's step hook: one row of STEP_FIELDS per step run through the trainer's loop."""

    def __init__(self, plan: BucketPlan, timer: FeatureTimer):
        self.plan, self.timer = plan, timer
        self.rows: list[list[float]] = []
        self.skipped = 0

    def __call__(self, ctx: Context, state: TrainState, r: StepRecord) -> None:
        real, padded = batch_frames(r.batch.ids, self.plan.durations)
        values = {"step_s": r.step_seconds, "loader_wait_s": r.loader_wait_seconds, "features_s": self.timer.take(),
                  "cpu_s": r.cpu_seconds, "utts": float(len(r.batch.ids)), "audio_s": r.batch.audio_seconds,
                  "real_frames": float(real), "padded_frames": float(padded)}
        self.rows.append([values[f] for f in STEP_FIELDS])
        self.skipped += 0 if r.outcome.stepped else 1


def run_steps(ctx: Context, state: TrainState, batches: list[list[str]], hooks=()) -> None:
    """Steps over ``batches`` through the trainer's own loop, continuing ``state``'s step count."""
    state.batch_in_epoch = 0
    run_batches(ctx, state, batches, hooks)


def case_params(base: dict[str, Any], case: dict[str, Any]) -> TrainParams:
    cfg = json.loads(json.dumps(base))
    for launcher_key in ("np", "hosts"):  # launcher settings some variants carry, not training options
        cfg.pop(launcher_key, None)
    cfg["dev_max_utterances"] = 1  # the dev set is not used; do not load it
    # the loop's own side effects stay out of the timed steps: no checkpoints, one log line at the end
    cfg["checkpoint_every_steps"] = 0
    cfg["log_every"] = 1_000_000
    cfg["max_steps"], cfg["time_budget_minutes"] = 0, 0.0
    cfg["precision"] = case.get("precision", cfg.get("precision", "auto"))
    cfg["bucketing"] = case.get("batching", "dynamic") != "random_budget"
    model = dict(cfg.get("model", {}))
    model["gradient_checkpointing"] = bool(case.get("gradient_checkpointing", False))
    cfg["model"] = model
    return TrainParams.from_config(cfg)


def gather(world: World, rows: list[list[float]], name: str) -> torch.Tensor:
    """(steps, fields) of this rank -> (ranks, steps, fields) of all ranks (an allreduce of a one-hot stack)."""
    mine = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), -1)
    full = torch.zeros((world.size, *mine.shape), dtype=torch.float64)
    full[world.rank] = mine
    return world.sum(full, name=name)


def measure_case(args: argparse.Namespace, base: dict[str, Any], spec: dict[str, Any], case: dict[str, Any],
                 world: World, plan: BucketPlan) -> dict[str, Any] | None:
    params = case_params(base, case)
    ctx = build_context(args, params, world)
    ctx.world.broadcast_model_and_optimizer(ctx.model, ctx.optimizer)
    ctx.model.train()
    schedule = benchmark_schedule(plan, case.get("batching", "dynamic"), int(spec["seed"]),
                                  int(spec["steps"]), int(spec["warmup_steps"]), world.size)
    warm = schedule.rank_warmup(world.rank, world.size)
    measured = schedule.rank_measured(world.rank, world.size)
    timer = FeatureTimer(ctx)
    gpu = GpuSampler(ctx.device)
    memory = MemoryProbe(ctx.device)
    name = case["name"]
    log.info("case %s: precision %s, %d warm-up + %d measured steps per rank, %d utterances x %d passes",
             name, precision_label(str(ctx.amp_dtype) if ctx.amp_dtype is not None else None), len(warm), len(measured),
             len(schedule.utterances), schedule.passes)

    memory.start()
    state = TrainState()
    run_steps(ctx, state, warm)
    world.sum(torch.zeros(1), name=f"barrier.{name}")
    gpu.start()
    timer.take()
    recorder = StepRecorder(plan, timer)
    run_steps(ctx, state, measured, hooks=[recorder])
    rows, skipped = recorder.rows, recorder.skipped
    gpu_stats = gpu.stop()
    mem = memory.stop()
    saved_mb = -1.0
    if "memory" in case.get("role", ""):
        # one more (untimed) step on the largest measured batch, counting what autograd keeps for backward
        largest = max(measured, key=lambda b: batch_frames(b, plan.durations)[1])
        with SavedTensorMeter(ctx.model.parameters()) as meter:
            run_steps(ctx, state, [largest])
        saved_mb = meter.bytes / MB
    timer.remove()

    rank_row = [mem.rss_before_mb, mem.peak_rss_mb, float(mem.peak_reset), mem.cuda_max_allocated_mb or -1.0,
                mem.cuda_max_reserved_mb or -1.0, gpu_stats.util_mean if gpu_stats else -1.0,
                gpu_stats.util_max if gpu_stats else -1.0, gpu_stats.mem_used_max_mb if gpu_stats else -1.0,
                float(skipped), saved_mb]
    steps_all = gather(world, rows, f"steps.{name}")          # (ranks, steps, fields)
    ranks_all = gather(world, [rank_row], f"ranks.{name}")[:, 0, :]  # (ranks, fields)
    parameters = count_parameters(ctx.model)  # trainable ones: a frozen pretrained encoder's are not
    total_parameters = count_parameters(ctx.model, trainable_only=False)
    device, amp_dtype = str(ctx.device), ctx.amp_dtype
    del ctx
    if not world.is_main:
        return None

    f = {k: i for i, k in enumerate(STEP_FIELDS)}
    per_step = {"step_s": steps_all[:, :, f["step_s"]].max(dim=0).values.tolist()}
    for k in ("utts", "audio_s", "real_frames", "padded_frames"):
        per_step[k] = steps_all[:, :, f[k]].sum(dim=0).tolist()
    rank_totals = {k: float(steps_all[:, :, f[k]].sum()) for k in ("step_s", "loader_wait_s", "features_s", "cpu_s")}
    g = {k: i for i, k in enumerate(RANK_FIELDS)}

    def col(k: str) -> list[float]:
        return ranks_all[:, g[k]].tolist()

    def opt_max(k: str) -> float | None:
        v = max(col(k))
        return None if v < 0 else round(v, 2)

    util = col("gpu_util_mean")
    return {
        "case": case, "processes": world.size, "backend": world.backend, "device": device,
        "precision": precision_label(str(amp_dtype) if amp_dtype is not None else None),
        "threads_per_rank": params.threads_per_rank, "parameters": parameters,
        "total_parameters": total_parameters,
        "warmup_steps_per_rank": len(warm), "steps_per_rank": len(measured),
        "utterances_in_set": len(schedule.utterances), "passes": schedule.passes,
        "per_step": per_step, "per_rank_step_s": steps_all[:, :, f["step_s"]].sum(dim=1).tolist(),
        "rank_totals": rank_totals, "skipped_steps": int(sum(col("skipped_steps"))),
        "memory": {"rss_before_mb": max(col("rss_before_mb")), "peak_rss_mb": max(col("peak_rss_mb")),
                   "peak_reset": all(v > 0 for v in col("peak_reset")),
                   "cuda_max_allocated_mb": opt_max("cuda_max_allocated_mb"),
                   "cuda_max_reserved_mb": opt_max("cuda_max_reserved_mb"),
                   "saved_activations_mb": opt_max("saved_activations_mb"),
                   "per_rank_peak_rss_mb": col("peak_rss_mb")},
        "gpu": None if min(util) < 0 else {"util_mean": round(sum(util) / len(util), 1),
                                           "util_max": max(col("gpu_util_max")),
                                           "mem_used_max_mb": opt_max("gpu_mem_used_max_mb")},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world = init_distributed()
    setup_logging(world.rank, args.log_dir)
    base = json.loads(args.params.read_text())
    spec = json.loads(args.spec.read_text())
    plan = BucketPlan.from_dict(json.loads((args.schedule_plan or args.plan).read_text()))
    results = []
    for case in spec["cases"]:
        r = measure_case(args, base, spec, case, world, plan)
        if r is not None:
            results.append(r)
            log.info("case %s: %d steps, median %.3f s", case["name"], r["steps_per_rank"],
                     sorted(r["per_step"]["step_s"])[len(r["per_step"]["step_s"]) // 2])
    if world.is_main:
        write_json(args.out, {"world_size": world.size, "backend": world.backend, "cases": results})
    world.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
