"""The dev subset the LM weights are tuned on (asrflow.evaluate.run.spread_subset)."""
from collections import Counter

from asrflow.evaluate.run import spread_subset
from asrflow.manifest import Utterance


def _dev(engine: str, n: int) -> list[Utterance]:
    return [Utterance(f"{engine}-{i:04d}", f"{engine}-{i}.wav", "A", 1.0, 16000, engine, "en-us", "dev",
                      {"engine": engine}) for i in range(n)]


def test_the_tuning_subset_spans_every_voice_family_in_proportion():
    # as the embedded dev set: ids start with the engine, so the first 60 would all be espeak
    dev = _dev("festival", 35) + _dev("flite", 46) + _dev("espeak", 119)
    subset = spread_subset(list(reversed(dev)), 60)
    assert len(subset) == len({u.id for u in subset}) == 60
    families = Counter(u.extra["engine"] for u in subset)
    for engine, n in (("espeak", 119), ("flite", 46), ("festival", 35)):  # each within one of its share
        assert abs(families[engine] - 60 * n / 200) <= 1, families
    assert [u.id for u in subset] == sorted(u.id for u in subset)  # deterministic: id order, not input order
    assert spread_subset(dev, 60) == subset


def test_a_small_dev_set_is_used_whole():
    dev = _dev("espeak", 5)
    assert spread_subset(dev, 60) == sorted(dev, key=lambda u: u.id) == spread_subset(dev, 0)
