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
