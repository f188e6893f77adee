"""The batch plan and the per-epoch batch sampler: runtime objects of training and the benchmark.

The plan (bucket edges, frame budget, utterance durations) is a data-prep artifact
(``asrflow.prep.bucketing.build_plan``); the sampler turns it into each epoch's batches for one rank.
All ranks compute the same global batch list from (seed, epoch), then take every ``world_size``-th
batch, so they agree without communicating. Only metadata (ids, durations, dialects) is read: audio
is loaded by ``asrflow.train.data``'s loader workers.

Cost is O(n log n) per epoch in the number of utterances (one sort per bucket); a LibriSpeech-size
plan (281k utterances) is planned in about a second (``asrflow-data-benchmark``).
"""
from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from asrflow.audio import FRAMES_PER_SECOND

def frames(duration: float) -> int:
    return max(1, int(math.ceil(duration * FRAMES_PER_SECOND)))


def bucket_index(duration: float, edges: Sequence[float]) -> int:
    return bisect_right(edges, duration)


def padding_ratio(batches: Sequence[Sequence[float]]) -> float:
    """Share of padded frames among all frames the model sees (padded batch = size x longest)."""
    padded = sum(len(b) * max(frames(d) for d in b) for b in batches if b)
    real = sum(frames(d) for b in batches for d in b)
    return 1.0 - real / padded if padded else 0.0


def pack_by_budget(ids: list[str], durations: dict[str, float], frame_budget: int, max_batch_size: int) -> list[list[str]]:
    """Cut an ordered id list into batches whose padded size (count x longest) stays within the budget.

    An utterance longer than the whole budget still gets a batch of its own: better one over-budget
    batch than silently losing data (the truncation cap keeps these rare).
    """
    batches: list[list[str]] = []
    current: list[str] = []
    longest = 0
    for uid in ids:
        f = frames(durations[uid])
        new_longest = max(longest, f)
        if current and (new_longest * (len(current) + 1) > frame_budget or len(current) >= max_batch_size):
            batches.append(current)
            current, new_longest = [], f
        current.append(uid)
        longest = new_longest
    if current:
        batches.append(current)
    return batches


def make_divisible(batches: list[list[str]], world_size: int, durations: dict[str, float]) -> list[list[str]]:
    """Split the largest batches until the count is a multiple of the world size.

    Every rank must run the same number of steps (an uneven count hangs allreduce), and dropping or
    repeating utterances would change what an epoch means, so batches are split instead.
    """
    batches = [list(b) for b in batches]
    while len(batches) % world_size:
        splittable = [i for i, b in enumerate(batches) if len(b) > 1]
        if not splittable:
            raise ValueError(f"{len(batches)} single-utterance batches cannot be spread evenly over {world_size} ranks")
        i = max(splittable, key=lambda j: (len(batches[j]) * max(frames(durations[u]) for u in batches[j]), -j))
        b = sorted(batches[i], key=lambda u: (durations[u], u))
        batches[i:i + 1] = [b[0::2], b[1::2]]
    return batches


def dialect_weights(dialects: dict[str, str], temperature: float) -> dict[str, float]:
    """Per-utterance sampling weight ∝ p(dialect)^(1/T - 1): T=1 keeps the data as is, larger T flattens
    the dialect distribution toward uniform (the multilingual-sampling recipe of XLM/mBART)."""
    counts = Counter(dialects.values())
    total = sum(counts.values())
    return {uid: (counts[d] / total) ** (1.0 / temperature - 1.0) for uid, d in dialects.items()}


@dataclass
class BucketPlan:
    """What the trainer needs to batch the training set: the artifact written by the bucketing rule."""
    durations: dict[str, float]
    edges: list[float]
    frame_budget: int
    max_batch_size: int
    dialects: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"edges": self.edges, "frame_budget": self.frame_budget, "max_batch_size": self.max_batch_size,
                "frames_per_second": FRAMES_PER_SECOND,
                "utterances": [{"id": u, "duration": d, "dialect": self.dialects.get(u, ""), "bucket": bucket_index(d, self.edges)}
                               for u, d in sorted(self.durations.items())]}

    @classmethod
    def from_dict(cls, d: dict) -> "BucketPlan":
        if d.get("frames_per_second", FRAMES_PER_SECOND) != FRAMES_PER_SECOND:
            raise ValueError(f"the plan counts {d['frames_per_second']} frames/s, the features {FRAMES_PER_SECOND}: "
                             "rebuild it (rule bucketing)")
        utts = d["utterances"]
        return cls(durations={u["id"]: float(u["duration"]) for u in utts}, edges=list(d["edges"]),
                   frame_budget=int(d["frame_budget"]), max_batch_size=int(d["max_batch_size"]),
                   dialects={u["id"]: u.get("dialect", "") for u in utts})


class BucketBatchSampler:
    """Per-epoch batches for one rank: same count on every rank, reshuffled deterministically per epoch.

    ``sortagrad_epochs``: epochs whose batches run from shortest to longest (SortaGrad).
    ``oversample_temperature`` > 1 draws the epoch's utterances with dialect-balancing weights (rare
    dialects repeat, frequent ones may be left out of that epoch, the epoch size stays the same); None
    or 1 uses each utterance exactly once. ``bucketed=False`` gives random batches under the same frame
    budget (the baseline the padding ratio is compared against).
    """

    def __init__(self, plan: BucketPlan, rank: int = 0, world_size: int = 1, seed: int = 0,
                 oversample_temperature: float | None = None, bucketed: bool = True, sortagrad_epochs: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.plan, self.rank, self.world_size, self.seed = plan, rank, world_size, seed
        self.temperature = oversample_temperature
        self.bucketed = bucketed
        self.sortagrad_epochs = sortagrad_epochs
        self.epoch = 0
        self._cached: tuple[int, list[list[str]]] | None = None  # (epoch, global batches): len() and iter() share one plan

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_ids(self, rng: random.Random) -> list[str]:
        ids = sorted(self.plan.durations)
        if not self.temperature or self.temperature == 1.0 or not self.plan.dialects:
            return ids
        weights = dialect_weights({u: self.plan.dialects[u] for u in ids}, self.temperature)
        return rng.choices(ids, weights=[weights[u] for u in ids], k=len(ids))

    def global_batches(self, epoch: int | None = None) -> list[list[str]]:
        epoch = self.epoch if epoch is None else epoch
        if self._cached is not None and self._cached[0] == epoch:
            return [list(b) for b in self._cached[1]]
        batches = self._plan_epoch(epoch)
        self._cached = (epoch, batches)
        return [list(b) for b in batches]

    def _plan_epoch(self, epoch: int) -> list[list[str]]:
        rng = random.Random(f"{self.seed}:{epoch}")
        ids = self.epoch_ids(rng)
        durs = self.plan.durations
        if self.bucketed:
            buckets: dict[int, list[str]] = {}
            for uid in ids:
                buckets.setdefault(bucket_index(durs[uid], self.plan.edges), []).append(uid)
            batches = []
            for b in sorted(buckets):
                members = buckets[b]
                rng.shuffle(members)
                members.sort(key=lambda u: durs[u])  # stable sort: ties keep the shuffled order
                batches.extend(pack_by_budget(members, durs, self.plan.frame_budget, self.plan.max_batch_size))
        else:
            rng.shuffle(ids)
            batches = pack_by_budget(ids, durs, self.plan.frame_budget, self.plan.max_batch_size)
        batches = make_divisible(batches, self.world_size, durs)
        rng.shuffle(batches)
        if epoch < self.sortagrad_epochs:
            # SortaGrad (Deep Speech 2): shortest batches first in the first epochs, which gets CTC out of
            # its all-blank plateau sooner; the shuffle above still breaks ties randomly.
            batches.sort(key=lambda b: max(durs[u] for u in b))
        return batches

    def __iter__(self) -> Iterator[list[str]]:
        return iter(self.global_batches()[self.rank::self.world_size])

    def __len__(self) -> int:
        return len(self.global_batches()) // self.world_size
