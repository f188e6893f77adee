"""The LM's text: the embedded corpus's sentence sources with every dev and test sentence excluded."""
import time
from pathlib import Path

import pytest

from asrflow.corpus import sentences as src
from asrflow.evaluate.decoding import arpa_vocabulary
from asrflow.evaluate.lm_text import exclude_heldout, heldout_texts, lm_text
from asrflow.evaluate.ngram_lm import build_lm
from asrflow.manifest import Utterance, write_manifest
from asrflow.text import normalize_text

WORDNET_LINES = [
    "  1 This software and database is being provided to you, the LICENSEE, by Princeton University",
    '00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived; "the zebrafish swam away quickly"',
    '00002137 03 n 01 thing 0 001 | a separate entity; "the cat sat on the mat"; "a dog barked at the moon"',
    '00002452 03 n 01 whole 0 001 | an assemblage of parts; "we heard the cat sat on the mat again"',
]
FORTUNES = "A fool and his money are soon parted.  Time flies like an arrow.\n\t-- Anonymous\n%\nThe early bird gets the worm.\n%\n"


@pytest.fixture
def sources(tmp_path):
    wn = tmp_path / "wordnet"
    wn.mkdir()
    for name in src.WORDNET_FILES:
        (wn / name).write_text("\n".join(WORDNET_LINES if name == "data.noun" else WORDNET_LINES[:1]) + "\n",
                               encoding="latin-1")
    fo = tmp_path / "fortunes"
    fo.mkdir()
    for name in src.FORTUNE_FILES:
        (fo / name).write_text(FORTUNES if name == "fortunes" else "%\n")
    return wn, fo


def manifest_with(tmp_path: Path, texts: dict[str, list[str]]) -> Path:
    utts = [Utterance(id=f"{split}{i}", audio=f"{split}{i}.wav", text=t, duration=1.0, sample_rate=16000,
                      speaker="s", dialect="d", split=split)
            for split, ts in texts.items() for i, t in enumerate(ts)]
    path = tmp_path / "manifest.jsonl"
    write_manifest(path, utts)
    return path


def test_dev_and_test_sentences_are_excluded_from_the_lm_text_and_the_lm(tmp_path, sources):
    wn, fo = sources
    manifest = manifest_with(tmp_path, {"train": ["A DOG BARKED AT THE MOON"],
                                        "dev": ["the zebrafish swam away quickly!"],  # normalized before matching
                                        "test": ["THE CAT SAT ON THE MAT"]})
    text = lm_text(manifest, "embedded", wordnet_dir=wn, fortunes_dir=fo)
    held = heldout_texts(manifest)
    assert held == {"THE ZEBRAFISH SWAM AWAY QUICKLY", "THE CAT SAT ON THE MAT"}
    assert not held & set(text.sentences)
    # a longer line holding a test sentence goes too
    assert "WE HEARD THE CAT SAT ON THE MAT AGAIN" not in text.sentences
    assert (text.excluded_exact, text.excluded_containing) == (2, 1)
    assert "A DOG BARKED AT THE MOON" in text.sentences and "TIME FLIES LIKE AN ARROW" in text.sentences
    assert "THE EARLY BIRD GETS THE WORM" in text.sentences
    arpa = tmp_path / "lm.arpa"
    build_lm(text.sentences, arpa, order=3)
    vocab = set(arpa_vocabulary(arpa))
    assert "ZEBRAFISH" not in vocab and "CAT" not in vocab and {"DOG", "MOON", "ARROW"} <= vocab


def test_real_corpora_use_train_transcripts_and_the_user_text_minus_dev_and_test(tmp_path):
    manifest = manifest_with(tmp_path, {"train": ["ONE TWO THREE", "FOUR FIVE SIX"], "dev": ["SEVEN EIGHT NINE"],
                                        "test": ["TEN ELEVEN TWELVE"]})
    user = tmp_path / "more.txt"
    user.write_text("seven eight nine\nthirteen fourteen\n\nwe said ten eleven twelve today\n")
    text = lm_text(manifest, "librispeech", user_text=user)
    assert text.sentences == ["ONE TWO THREE", "FOUR FIVE SIX", "THIRTEEN FOURTEEN"]
    assert text.excluded == 2 and text.sources == ["train-transcripts", str(user)]


def test_exclusion_matches_whole_words_only():
    kept, exact, containing = exclude_heldout(["THE CATS SAT HERE", "SO THE CAT SAT", "THE CAT SAT"], {"THE CAT SAT"})
    assert kept == ["THE CATS SAT HERE"] and (exact, containing) == (1, 1)


@pytest.mark.skipif(not (src.WORDNET_DIR / "data.noun").is_file() or not (src.FORTUNES_DIR / "fortunes").is_file(),
                    reason="wordnet-base / fortunes-min not installed")
def test_with_the_real_sources_no_pool_sentence_held_out_reaches_the_lm_text(tmp_path):
    pool = src.load_sentences()
    dev, test = pool[::997][:40], pool[500::991][:40]
    manifest = manifest_with(tmp_path, {"train": pool[1:3], "dev": dev, "test": test})
    t0 = time.time()
    text = lm_text(manifest, "embedded")
    assert time.time() - t0 < 30
    held = {normalize_text(t) for t in dev + test}
    assert text.excluded_exact >= len(held)
    assert not held & set(text.sentences)
    assert not any(f" {h} " in f" {s} " for s in text.sentences for h in held)
    assert len(text.sentences) > 40000 and "wordnet-examples" in text.sources
