from pathlib import Path

import pytest

from asrflow.corpus import sentences as S
from asrflow.text import is_clean

pytestmark = pytest.mark.skipif(
    not (S.WORDNET_DIR.is_dir() and S.FORTUNES_DIR.is_dir()), reason="wordnet-base / fortunes-min not installed"
)


def test_sentences_are_many_clean_unique_and_sorted():
    sents = S.load_sentences()
    assert len(sents) > 10_000
    assert all(is_clean(s) for s in sents)
    assert all(3 <= len(s.split()) <= 20 for s in sents)
    assert len(set(sents)) == len(sents)
    assert sents == sorted(sents)


def test_sentences_are_speakable_as_written():
    sents = S.load_sentences()
    words = {w for s in sents for w in s.split()}
    assert not words & {"MR", "DR", "ST", "ETC"}
    assert all(any(v in w for v in "AEIOUY") for w in words)


def test_word_range_is_respected():
    short = S.load_sentences(3, 5)
    assert short and all(3 <= len(s.split()) <= 5 for s in short)
    assert set(short) <= set(S.load_sentences(3, 20))


def test_deterministic_without_cache():
    first = S.load_sentences()
    S._load.cache_clear()
    assert S.load_sentences() == first


def test_missing_package_is_a_clear_error(tmp_path: Path):
    with pytest.raises(S.SentenceSourceError, match="wordnet-base"):
        S.wordnet_examples(tmp_path)
    with pytest.raises(S.SentenceSourceError, match="fortunes-min"):
        S.fortune_sentences(tmp_path)


def test_fortune_parsing_drops_attribution_and_overstrike():
    entries = S._fortune_entries("_\bHello world.\n\t\t-- Someone\n%\nSecond one.\n")
    assert entries[0].strip() == "Hello world."
    assert entries[1].strip() == "Second one."
