"""espeak-ng's phones as auxiliary CTC targets (asrflow.phones), read from the real espeak-ng."""
import shutil

import pytest

from asrflow.phones import PhoneLexicon, PhoneLexiconError, phonemize_words, strip_prosody
from asrflow.text import BLANK

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (make install)")


def test_words_get_espeak_ngs_phones_without_stress_and_caps_are_not_read_as_acronyms():
    lexicon = phonemize_words(["HELLO", "WORLD", "IT", "DON'T"])
    assert lexicon["HELLO"] == ["h", "@", "l", "oU"]
    assert lexicon["WORLD"] == ["w", "3:", "l", "d"]
    # upper-case "IT" would be spelled out as the letters I, T; our transcripts are upper-case words
    assert lexicon["IT"] == ["I", "t"]
    assert lexicon["DON'T"] == ["d", "oU", "n", "t"]
    assert strip_prosody("'oU") == "oU" and strip_prosody(",aI") == "aI"


def test_the_lexicon_encodes_transcripts_as_concatenated_word_phones_and_round_trips(tmp_path):
    texts = ["HELLO WORLD", "THE WORLD IT MADE", "HELLO"]
    lexicon = PhoneLexicon.build(texts)
    assert lexicon.symbols[0] == BLANK
    assert not any(mark in s for s in lexicon.symbols[1:] for mark in "',%="), lexicon.symbols
    assert set(lexicon.words) == {"HELLO", "WORLD", "THE", "IT", "MADE"}
    ids = lexicon.encode("HELLO WORLD")
    assert ids == lexicon.encode("HELLO") + lexicon.encode("WORLD")
    assert [lexicon.symbols[i] for i in ids] == ["h", "@", "l", "oU", "w", "3:", "l", "d"]
    assert 0 not in ids, "the blank is never a target"
    path = tmp_path / "phones.json"
    lexicon.save(path)
    again = PhoneLexicon.load(path)
    assert again.symbols == lexicon.symbols and again.words == lexicon.words and again.voice == "en-us"
    british = PhoneLexicon.build(["HELLO"], voice="en-gb")
    british.save(path)
    assert PhoneLexicon.load(path).voice == "en-gb", "the lexicon records the voice that made it"
    with pytest.raises(PhoneLexiconError, match="'GOODBYE' is not in the phone lexicon"):
        lexicon.encode("HELLO GOODBYE")


def test_a_missing_espeak_ng_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(PhoneLexiconError, match="espeak-ng is not installed"):
        phonemize_words(["HELLO"])
