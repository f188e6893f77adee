"""Batching strategies compared by the benchmark, their padding ratio, and the steps each one measures.

Modes (all built from the bucketing rule's plan, so they see the same training set):

* ``fixed_random``   fixed-size batches of randomly shuffled utterances (the reference post's start);
* ``bucketed_fixed`` fixed-size batches cut from duration buckets;
* ``dynamic``        duration buckets packed under the frame budget (what training uses);
* ``random_budget``  random utterances packed under the same frame budget (training with bucketing off).

The fixed size is the mean batch size of ``dynamic`` over an epoch, as in ``plan_report``, so the
fixed modes do as many utterances per step on average. ``benchmark_schedule`` picks the measured
utterances once — those of the first ``steps`` dynamic batches — and every configuration (precision,
process count, batching) processes exactly that set, the same number of times.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from asrflow.train.sampler import (BucketBatchSampler, BucketPlan, bucket_index, frames, make_divisible,
                                   padding_ratio)

MODES = ("fixed_random", "bucketed_fixed", "dynamic", "random_budget")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"batching mode must be one of {MODES}, got {mode!r}")
    return mode


def sub_plan(plan: BucketPlan, ids: Sequence[str]) -> BucketPlan:
    """The plan restricted to some utterances (same edges, frame budget and batch-size cap)."""
    return BucketPlan(durations={u: plan.durations[u] for u in ids}, edges=list(plan.edges),
                      frame_budget=plan.frame_budget, max_batch_size=plan.max_batch_size,
                      dialects={u: plan.dialects.get(u, "") for u in ids})


def fixed_batch_size(plan: BucketPlan, seed: int) -> int:
    batches = BucketBatchSampler(plan, 0, 1, seed, bucketed=True).global_batches(0)
    return max(1, int(round(float(np.mean([len(b) for b in batches])))))


def mode_batches(plan: BucketPlan, mode: str, seed: int, epoch: int = 0, world_size: int = 1,
                 batch_size: int | None = None) -> list[list[str]]:
    """One epoch of global batches in ``mode``, in random order, the count a multiple of ``world_size``.

    Every utterance of the plan appears exactly once (no dialect oversampling: the comparison is
    about batching, and every mode must see the same utterances)."""
    check_mode(mode)
    durs = plan.durations
    if mode in ("dynamic", "random_budget"):
        return BucketBatchSampler(plan, 0, world_size, seed, bucketed=mode == "dynamic").global_batches(epoch)
    size = batch_size or fixed_batch_size(plan, seed)
    rng = random.Random(seed if epoch == 0 else f"{seed}:{epoch}")  # epoch 0 = plan_report's fixed_size_random
    ids = sorted(durs)
    if mode == "fixed_random":
        rng.shuffle(ids)
        batches = [ids[i:i + size] for i in range(0, len(ids), size)]
    else:
        buckets: dict[int, list[str]] = {}
        for uid in ids:
            buckets.setdefault(bucket_index(durs[uid], plan.edges), []).append(uid)
        batches = []
        for b in sorted(buckets):
            members = buckets[b]
            rng.shuffle(members)
            members.sort(key=lambda u: durs[u])
            batches.extend(members[i:i + size] for i in range(0, len(members), size))
        rng.shuffle(batches)
    return make_divisible(batches, world_size, durs)


def batch_frames(batch: Sequence[str], durations: dict[str, float]) -> tuple[int, int]:
    """(real frames, padded frames = size x longest) of one batch."""
    lens = [frames(durations[u]) for u in batch]
    return sum(lens), len(lens) * max(lens)


def padding_comparison(plan: BucketPlan, seed: int, modes: Sequence[str] = MODES) -> dict[str, dict]:
    """Padding ratio and batch statistics of one epoch of each mode over the whole training set."""
    durs = plan.durations
    size = fixed_batch_size(plan, seed)
    out = {}
    for mode in modes:
        batches = mode_batches(plan, mode, seed, batch_size=size)
        sizes = [len(b) for b in batches]
        out[mode] = {"padding_ratio": round(padding_ratio([[durs[u] for u in b] for b in batches]), 4),
                     "batches": len(batches), "mean_batch_size": round(float(np.mean(sizes)), 2),
                     "max_batch_frames": max(batch_frames(b, durs)[1] for b in batches),
                     "over_budget_batches": sum(batch_frames(b, durs)[1] > plan.frame_budget for b in batches)}
    return out


@dataclass
class Schedule:
    """Global batches of one configuration: rank r runs ``warmup[r::world]`` then ``measured[r::world]``."""
    warmup: list[list[str]]
    measured: list[list[str]]
    utterances: list[str]   # the measured set (each processed ``passes`` times)
    passes: int

    def rank_warmup(self, rank: int, world_size: int) -> list[list[str]]:
        return self.warmup[rank::world_size]

    def rank_measured(self, rank: int, world_size: int) -> list[list[str]]:
        return self.measured[rank::world_size]


def measured_utterances(plan: BucketPlan, seed: int, steps: int) -> tuple[list[str], int]:
    """The measured set (utterances of the first ``steps`` dynamic batches of epoch 0) and how many
    passes over it make ``steps`` dynamic steps (more than one when an epoch has fewer batches)."""
    batches = mode_batches(plan, "dynamic", seed)
    chosen = batches[:max(1, steps)]
    ids = sorted(u for b in chosen for u in b)
    per_pass = len(mode_batches(sub_plan(plan, ids), "dynamic", seed))
    return ids, max(1, math.ceil(steps / per_pass))


def benchmark_schedule(plan: BucketPlan, mode: str, seed: int, steps: int, warmup_steps: int,
                       world_size: int) -> Schedule:
    """Measured and warm-up batches for one configuration.

    Measured: ``passes`` epochs (seeds ``seed``, ``seed+1``, ...) of ``mode`` over the measured set,
    each epoch's batch count a multiple of ``world_size``. Warm-up: ``warmup_steps`` batches per rank
    from the utterances outside the measured set (from the measured set when there are none)."""
    size = fixed_batch_size(plan, seed)
    ids, passes = measured_utterances(plan, seed, steps)
    sub = sub_plan(plan, ids)
    measured = [b for p in range(passes) for b in mode_batches(sub, mode, seed, epoch=p, world_size=world_size,
                                                             batch_size=size)]
    chosen = set(ids)
    rest = [u for u in sorted(plan.durations) if u not in chosen] or ids
    need = warmup_steps * world_size
    warm: list[list[str]] = []
    epoch = 0
    while len(warm) < need:
        warm += mode_batches(sub_plan(plan, rest), mode, seed + 7919, epoch=epoch, batch_size=size)
        epoch += 1
    return Schedule(warmup=warm[:need], measured=measured, utterances=ids, passes=passes)
