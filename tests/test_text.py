import pytest

from asrflow.text import BLANK, CharVocab, is_clean, normalize_text


@pytest.mark.parametrize("raw,norm", [
    ("Hello, world!", "HELLO WORLD"),
    ("It's  a 'quoted' word", "IT'S A QUOTED WORD"),
    ("café-au-lait", "CAFE AU LAIT"),
    ("Room 42", "ROOM FOUR TWO"),
    ("?!", ""),
])
def test_normalize_text(raw, norm):
    assert normalize_text(raw) == norm


def test_is_clean():
    assert is_clean("HELLO WORLD") and not is_clean("") and not is_clean("hello")


def test_vocab_round_trip(tmp_path):
    v = CharVocab.build(["HELLO WORLD", "IT'S"])
    assert v.symbols[0] == BLANK and v.blank_id == 0
    ids = v.encode("HELLO WORLD")
    assert v.decode(ids) == "HELLO WORLD"
    assert v.decode(v.encode("HELLO Q")) == "HELLO", "unknown characters map to <unk> and vanish"
    v.save(tmp_path / "v.json")
    assert CharVocab.load(tmp_path / "v.json").symbols == v.symbols


SENTENCES = ["THE CAT SAT ON THE MAT", "THE DOG SAT ON THE LOG", "A CAT AND A DOG", "IT'S THE CAT'S MAT",
             "THE MAT IS RED", "MY DOG ATE THE RED LOG"] * 3


def test_bpe_vocab_round_trip_and_word_boundaries(tmp_path):
    from asrflow.text import SPACE, UNK, WORD_START, BpeVocab, build_vocab, vocab_from_dict

    v = build_vocab(SENTENCES, "bpe", 40)
    assert isinstance(v, BpeVocab) and v.units == "bpe"
    assert v.symbols[:2] == [BLANK, SPACE] and v.symbols[-1] == UNK and len(v) <= 40 + 2
    for s in SENTENCES[:6] + ["A RED CAT"]:
        ids = v.encode(s)
        assert v.decode(ids) == s
        # one word-initial piece per word, and never the '|' separator
        assert sum(v.symbols[i].startswith(WORD_START) for i in ids) == len(s.split())
        assert v.index[SPACE] not in ids
    assert len(v.encode("THE CAT SAT")) < len("THE CAT SAT"), "merges make pieces longer than characters"
    # every character of the corpus is a piece of its own, so unseen words still encode
    assert v.decode(v.encode("TAME DOGMA")) == "TAME DOGMA"
    v.save(tmp_path / "bpe.json")
    back = CharVocab.load(tmp_path / "bpe.json")
    assert isinstance(back, BpeVocab) and back.symbols == v.symbols and back.encode("THE LOG") == v.encode("THE LOG")
    assert vocab_from_dict(v.to_dict()).identity() == v.identity() != v.symbols


def test_bpe_training_is_deterministic_and_char_vocab_unchanged():
    from asrflow.text import build_vocab, vocab_from_dict

    a, b = build_vocab(SENTENCES, "bpe", 40), build_vocab(SENTENCES, "bpe", 40)
    assert a.symbols == b.symbols and a.model_proto == b.model_proto
    c = build_vocab(SENTENCES, "char")
    assert type(c) is CharVocab and c.identity() == c.symbols
    assert vocab_from_dict(c.symbols).symbols == c.symbols  # checkpoints of earlier versions held a bare list
    with pytest.raises(ValueError, match="unknown output units"):
        build_vocab(SENTENCES, "words")
