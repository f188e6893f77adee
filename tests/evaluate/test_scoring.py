"""Scoring against hand-counted alignments."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from asrflow.evaluate.scoring import ErrorCounts, ErrorStats, score_by_group, score_corpus


def test_substitution_and_insertion():
    # THE=THE, CAT->BAT (S), SAT=SAT, +ON (I)
    stats = score_corpus(["THE CAT SAT"], ["THE BAT SAT ON"])
    assert stats.words == ErrorCounts(substitutions=1, deletions=0, insertions=1, hits=2)
    assert stats.words.ref_len == 3
    assert stats.wer == pytest.approx(2 / 3)


def test_deletion():
    # A B C D vs A C D: B deleted
    stats = score_corpus(["A B C D"], ["A C D"])
    assert stats.words == ErrorCounts(substitutions=0, deletions=1, insertions=0, hits=3)
    assert stats.wer == pytest.approx(0.25)


def test_character_counts_include_spaces():
    # "THE CAT SAT" (11 chars) vs "THE BAT SAT ON": C->B (S), " ON" inserted (3 I), 10 hits.
    stats = score_corpus(["THE CAT SAT"], ["THE BAT SAT ON"])
    assert stats.chars == ErrorCounts(substitutions=1, deletions=0, insertions=3, hits=10)
    assert stats.cer == pytest.approx(4 / 11)
    # A missing word boundary is one character error (the space), not zero.
    joined = score_corpus(["NEW YORK"], ["NEWYORK"])
    assert joined.chars == ErrorCounts(substitutions=0, deletions=1, insertions=0, hits=7)
    assert joined.wer == pytest.approx(1.0)  # NEW->NEWYORK (S), YORK deleted (D)


def test_corpus_rate_is_pooled_not_mean_of_rates():
    refs = ["A", "A B C D E F G H I J"]
    hyps = ["B", "A B C D E F G H I J"]
    stats = score_corpus(refs, hyps)
    per_utt = [score_corpus([r], [h]).wer for r, h in zip(refs, hyps)]
    assert per_utt == [1.0, 0.0]
    assert stats.wer == pytest.approx(1 / 11)
    assert stats.wer != pytest.approx(sum(per_utt) / len(per_utt))


def test_whitespace_is_normalized():
    stats = score_corpus(["THE CAT"], ["  THE   CAT "])
    assert stats.wer == 0.0 and stats.cer == 0.0


def test_empty_reference_counts_insertions():
    alone = score_corpus([""], ["UH OH"])
    assert alone.words == ErrorCounts(insertions=2)
    assert alone.chars == ErrorCounts(insertions=5)
    assert math.isinf(alone.wer)
    assert score_corpus([""], [""]).wer == 0.0
    # Within a corpus the insertions count against the other utterances' reference length.
    mixed = score_corpus(["", "A B"], ["X", "A B"])
    assert mixed.words == ErrorCounts(insertions=1, hits=2)
    assert mixed.wer == pytest.approx(0.5)


def test_empty_corpus_and_length_mismatch():
    assert score_corpus([], []) == ErrorStats()
    with pytest.raises(ValueError):
        score_corpus(["A"], [])


def test_to_dict_is_flat_and_complete():
    d = score_corpus(["THE CAT SAT"], ["THE BAT SAT ON"]).to_dict()
    assert d["wer"] == pytest.approx(2 / 3)
    word_counts = (d["word_substitutions"], d["word_deletions"], d["word_insertions"], d["word_hits"])
    assert word_counts == (1, 0, 1, 2)
    assert (d["ref_words"], d["ref_chars"], d["char_errors"], d["utterances"]) == (3, 11, 4, 1)


RECORDS = [
    {"ref": "THE CAT SAT", "hyp": "THE BAT SAT ON", "dialect": "north", "snr": 5.0},
    {"ref": "A B C D", "hyp": "A C D", "dialect": "south", "snr": 20.0},
    {"ref": "HELLO", "hyp": "HELLO", "dialect": "north", "snr": 15.0},
]


def test_score_by_group_pools_within_groups():
    groups = score_by_group(RECORDS, "dialect")
    assert list(groups) == ["north", "south"]
    assert groups["north"].words == ErrorCounts(substitutions=1, insertions=1, hits=3)
    assert groups["north"].wer == pytest.approx(2 / 4)
    assert groups["south"].wer == pytest.approx(1 / 4)
    total = groups["north"] + groups["south"]
    assert total == score_corpus([r["ref"] for r in RECORDS], [r["hyp"] for r in RECORDS])


def test_score_by_group_with_objects_and_callable_key():
    records = [SimpleNamespace(**r) for r in RECORDS]
    groups = score_by_group(records, lambda r: "low" if r.snr < 10 else "high")
    assert list(groups) == ["high", "low"]
    assert groups["high"].utterances == 2
    assert groups["low"].wer == pytest.approx(2 / 3)


def test_score_by_group_missing_field_raises():
    with pytest.raises(KeyError):
        score_by_group(RECORDS + [{"ref": "A", "hyp": "A"}], "dialect")
