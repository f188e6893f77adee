import random
from collections import Counter

import pytest

from asrflow.prep.bucketing import build_plan, plan_report, quantile_edges
from asrflow.train.sampler import BucketBatchSampler, BucketPlan, frames, padding_ratio


def corpus(n=300, seed=0):
    rng = random.Random(seed)
    durations = {f"u{i:04d}": round(rng.uniform(0.5, 15.0), 3) for i in range(n)}
    dialects = {u: ("rare" if i % 25 == 0 else "common") for i, u in enumerate(sorted(durations))}
    return durations, dialects


@pytest.fixture
def plan():
    durations, dialects = corpus()
    return build_plan(durations, dialects, num_buckets=6, frame_budget=6000, max_batch_size=32)


def test_quantile_edges_give_equal_population_buckets():
    durations = [float(i) for i in range(1, 101)]
    edges = quantile_edges(durations, 4)
    assert len(edges) == 3 and edges[0] == pytest.approx(25.75, abs=0.01)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_every_rank_gets_the_same_number_of_batches_and_no_utterance_is_lost_or_repeated(plan, world_size):
    seen = Counter()
    counts = []
    for rank in range(world_size):
        sampler = BucketBatchSampler(plan, rank, world_size, seed=3)
        sampler.set_epoch(5)
        batches = list(sampler)
        counts.append(len(batches))
        for b in batches:
            seen.update(b)
    assert len(set(counts)) == 1
    assert set(seen) == set(plan.durations) and max(seen.values()) == 1


def test_batches_respect_the_frame_budget(plan):
    for b in BucketBatchSampler(plan, seed=1).global_batches(0):
        assert len(b) <= plan.max_batch_size
        assert len(b) == 1 or len(b) * max(frames(plan.durations[u]) for u in b) <= plan.frame_budget


def test_reshuffled_per_epoch_and_deterministic(plan):
    a = BucketBatchSampler(plan, seed=7)
    b = BucketBatchSampler(plan, seed=7)
    assert a.global_batches(0) == b.global_batches(0)
    assert a.global_batches(0) != a.global_batches(1)
    assert a.global_batches(0) != BucketBatchSampler(plan, seed=8).global_batches(0)


def test_bucketing_cuts_padding_against_random_batches(plan):
    report = plan_report(plan, seed=0)
    assert report["bucketed"]["padding_ratio"] < 0.1
    assert report["random"]["padding_ratio"] > 3 * report["bucketed"]["padding_ratio"]
    assert report["fixed_size_random"]["padding_ratio"] > 0.3


def test_padding_ratio_by_hand():
    # 2 x 2 s (200 frames each) and 1 x 1 s padded to 2 s: 100 of 600 frames are padding
    assert padding_ratio([[2.0, 2.0], [1.0]]) == 0
    assert padding_ratio([[2.0, 1.0, 2.0]]) == pytest.approx(100 / 600)


def test_oversampling_raises_the_rare_dialect_share_and_keeps_epoch_size(plan):
    plain = [u for b in BucketBatchSampler(plan, seed=2).global_batches(0) for u in b]
    balanced = [u for b in BucketBatchSampler(plan, seed=2, oversample_temperature=5.0).global_batches(0) for u in b]
    share = lambda ids: sum(plan.dialects[u] == "rare" for u in ids) / len(ids)
    assert len(balanced) == len(plain)
    assert share(plain) == pytest.approx(0.04, abs=0.001)
    assert share(balanced) > 2.5 * share(plain)


def test_plan_round_trips_through_its_artifact(plan):
    again = BucketPlan.from_dict(plan.to_dict())
    assert BucketBatchSampler(again, seed=1).global_batches(2) == BucketBatchSampler(plan, seed=1).global_batches(2)


def test_too_few_utterances_for_the_world_is_a_clear_error():
    plan = build_plan({"a": 1.0}, {"a": "x"}, 1, 1000, 8)
    with pytest.raises(ValueError, match="cannot be spread evenly"):
        list(BucketBatchSampler(plan, 0, 2))


def test_sortagrad_orders_the_first_epochs_by_length_and_keeps_every_rank_even(plan):
    sampler = BucketBatchSampler(plan, seed=4, sortagrad_epochs=1)
    longest = [max(plan.durations[u] for u in b) for b in sampler.global_batches(0)]
    assert longest == sorted(longest)
    later = [max(plan.durations[u] for u in b) for b in sampler.global_batches(1)]
    assert later != sorted(later), "after the SortaGrad epochs batches are shuffled again"
    ranks = [list(BucketBatchSampler(plan, r, 3, seed=4, sortagrad_epochs=1)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1
