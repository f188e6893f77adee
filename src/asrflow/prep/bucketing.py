"""Duration-quantile buckets and the frame budget: the bucketing rule's plan (``buckets.json``).

The runtime side, the per-epoch sampler that turns the plan into each rank's batches, is
``asrflow.train.sampler``.
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np

from asrflow.train.sampler import BucketBatchSampler, BucketPlan, frames, padding_ratio


def quantile_edges(durations: Sequence[float], num_buckets: int) -> list[float]:
    """Inner bucket edges at duration quantiles, so each bucket holds about the same number of utterances."""
    if not durations:
        raise ValueError("cannot bucket an empty training set")
    qs = np.quantile(np.asarray(durations, dtype=np.float64), np.linspace(0, 1, num_buckets + 1)[1:-1])
    return sorted(set(round(float(q), 4) for q in qs))


def plan_report(plan: BucketPlan, seed: int, world_size: int = 1) -> dict:
    """Padding ratio and batch statistics implied by the plan vs random batching under the same budget."""
    durs = plan.durations
    out = {}
    for name, bucketed in (("bucketed", True), ("random", False)):
        batches = BucketBatchSampler(plan, 0, world_size, seed, bucketed=bucketed).global_batches(0)
        sizes = [len(b) for b in batches]
        out[name] = {"padding_ratio": round(padding_ratio([[durs[u] for u in b] for b in batches]), 4),
                     "batches": len(batches), "mean_batch_size": round(float(np.mean(sizes)), 2),
                     "max_batch_frames": max(len(b) * max(frames(durs[u]) for u in b) for b in batches)}
    # Fixed-size random batches with the same mean size: the reference post's starting point.
    rng = random.Random(seed)
    ids = sorted(durs)
    rng.shuffle(ids)
    size = max(1, int(round(out["bucketed"]["mean_batch_size"])))
    fixed = [ids[i:i + size] for i in range(0, len(ids), size)]
    out["fixed_size_random"] = {"padding_ratio": round(padding_ratio([[durs[u] for u in b] for b in fixed]), 4),
                                "batches": len(fixed), "mean_batch_size": size,
                                "max_batch_frames": max(len(b) * max(frames(durs[u]) for u in b) for b in fixed)}
    return out


def build_plan(durations: dict[str, float], dialects: dict[str, str], num_buckets: int, frame_budget: int,
               max_batch_size: int) -> BucketPlan:
    return BucketPlan(durations=dict(durations), edges=quantile_edges(list(durations.values()), num_buckets),
                      frame_budget=frame_budget, max_batch_size=max_batch_size, dialects=dict(dialects))
