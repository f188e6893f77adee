"""Lexicon-constrained beam search (flashlight via torchaudio), its lexicon sources and the OOV rate."""
import gc
import importlib.util
import os

import numpy as np
import pytest
import torch

from asrflow.evaluate.decoding import (BeamSearchDecoder, LexiconBeamSearchDecoder, arpa_vocabulary, cmudict_words,
                                       find_cmudict, lexicon_words, oov_rate, spell, tune_lm_weights, weight_grid)
from asrflow.evaluate.ngram_lm import build_lm
from asrflow.text import BpeVocab, CharVocab

VOCAB = CharVocab(["<blank>", "|", "A", "B", "C", "T", "<unk>"])


@pytest.fixture
def lm(tmp_path):
    path = tmp_path / "lm.arpa"
    build_lm(["CAB BAT", "BAT CAB", "CAB CAB BAT", "BAT", "CAB"], path, order=3)
    return path


def emissions_spelling(text: str, vocab: CharVocab = VOCAB, frames_per_char: int = 3, confidence: float = 0.9) -> torch.Tensor:
    """(T, V) log-probs that spell ``text`` ('|' between words) with blanks between letters."""
    rows = []
    for c in text.replace(" ", "|"):
        for k in range(frames_per_char):
            p = np.full(len(vocab), (1 - confidence) / (len(vocab) - 1))
            p[vocab.index[c] if k < frames_per_char - 1 else 0] = confidence
            rows.append(p)
    return torch.log(torch.tensor(np.array(rows), dtype=torch.float32))


def test_arpa_vocabulary_and_lexicon_words(lm, tmp_path):
    assert sorted(arpa_vocabulary(lm)) == ["BAT", "CAB"]
    cmu = tmp_path / "cmu.dict"
    cmu.write_text("'bout B AW T\nabc EY B IY S IY\nabc(2) AE B K\na.m. EY EH M\nx-ray EH K S R EY\ncab K AE B\n")
    # alternates, dotted and hyphenated words and "'bout" (normalize_text drops a leading apostrophe) are out
    assert cmudict_words(cmu) == ["ABC", "CAB"]
    assert lexicon_words("lm_vocab", lm) == arpa_vocabulary(lm)
    assert lexicon_words("cmudict", lm, cmu) == [*arpa_vocabulary(lm), "ABC"]
    with pytest.raises(ValueError):
        lexicon_words("none", lm)


def test_spelling_with_characters_and_bpe_pieces():
    assert spell("CAB", VOCAB) == ["C", "A", "B", "|"]
    assert spell("CAD", VOCAB) is None and spell("A'B", VOCAB) is None
    bpe = BpeVocab.build(["CAB BAT", "BAT CAB TAB", "CAT BAT"] * 5, vocab_size=12)
    pieces = spell("CAB", bpe)
    assert pieces and "".join(pieces).replace("\u2581", "") == "CAB" and pieces[0].startswith("\u2581")


def test_oov_rate_counts_running_words():
    r = oov_rate(["CAB CAT", "BAT CAT"], ["CAB", "BAT"])
    assert (r["tokens"], r["oov_tokens"], r["oov_types"], r["oov_rate"]) == (4, 2, 1, 0.5)


def test_the_lexicon_decoder_forbids_words_outside_the_lexicon(lm):
    cat = emissions_spelling("CAT")
    free = BeamSearchDecoder(VOCAB, lm_path=str(lm), beam_size=20, lm_weight=0.5)
    assert free.decode(cat) == ["CAT"]  # lexicon-free: any spelling can come out
    lex = LexiconBeamSearchDecoder(VOCAB, lm, lexicon_words("lm_vocab", lm), beam_size=20, lm_weight=0.5)
    assert lex.lexicon_info == {"words": 2, "unspellable": 0}
    (hyp,) = lex.decode(cat)
    assert "CAT" not in hyp.split() and set(hyp.split()) <= {"CAB", "BAT"}
    batch = torch.nn.utils.rnn.pad_sequence([emissions_spelling("CAB BAT"), emissions_spelling("BAT")], batch_first=True)
    assert lex.decode(batch, torch.tensor([len(emissions_spelling("CAB BAT")), len(emissions_spelling("BAT"))])) == ["CAB BAT", "BAT"]


def test_with_weights_shares_the_lexicon_and_the_file_goes_with_the_decoder(lm):
    lex = LexiconBeamSearchDecoder(VOCAB, lm, ["CAB", "BAT", "TAB"], beam_size=10)
    path = lex.lexicon_file
    assert open(path).read().splitlines() == ["CAB C A B |", "BAT B A T |", "TAB T A B |"]
    child = lex.with_weights(1.0, 0.5, beam_size=4)
    assert (child.lexicon_file, child.beam_size, child.lm_weight, child.word_score) == (path, 4, 1.0, 0.5)
    del lex
    gc.collect()
    assert os.path.exists(path)  # the child keeps it alive
    assert child.decode(emissions_spelling("TAB")) == ["TAB"]
    del child
    gc.collect()
    assert not os.path.exists(path)


def test_tuning_searches_the_beam_too_smallest_first(lm):
    grid = weight_grid([0.5, 1.0], [0.0], beam_sizes=[8, 2])
    assert grid == [(0.5, 0.0, 2), (1.0, 0.0, 2), (0.5, 0.0, 8), (1.0, 0.0, 8)]
    base = LexiconBeamSearchDecoder(VOCAB, lm, ["CAB", "BAT"], beam_size=8)
    result = tune_lm_weights(base.with_weights, [emissions_spelling("CAB BAT")], ["CAB BAT"], grid)
    assert len(result.table) == 4 and [r["beam_size"] for r in result.table] == [2, 2, 8, 8]
    first_best = min(result.table, key=lambda r: r["word_errors"])  # min() keeps the earliest of ties
    assert (result.lm_weight, result.word_score, result.beam_size) == (
        first_best["lm_weight"], first_best["word_score"], first_best["beam_size"])
    assert result.wer == 0.0
    assert result.to_dict()["beam_size"] == result.beam_size
    plain = tune_lm_weights(BeamSearchDecoder(VOCAB, lm_path=str(lm), beam_size=4).with_weights,
                            [emissions_spelling("CAB")], ["CAB"], weight_grid([0.5], [0.0]))
    assert plain.beam_size is None and "beam_size" not in plain.to_dict()


@pytest.mark.skipif(importlib.util.find_spec("pocketsphinx") is not None, reason="pocketsphinx is installed")
def test_cmudict_without_pocketsphinx_says_what_to_install():
    with pytest.raises(FileNotFoundError, match="pip install pocketsphinx"):
        find_cmudict()
