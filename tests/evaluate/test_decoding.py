"""Greedy and beam-search CTC decoding on constructed emission matrices."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from asrflow.evaluate.decoding import BeamSearchDecoder, greedy_decode, tune_lm_weights, weight_grid
from asrflow.evaluate.ngram_lm import build_lm
from asrflow.text import BLANK, CharVocab

VOCAB = CharVocab.build(["ABCDEFGHIJKLMNOPQRSTUVWXYZ'"])
LM_TEXT = [
    "THE CAT SAT ON THE MAT",
    "THE CAT IS BLACK",
    "A CAT AND A DOG",
    "THE DOG SAT",
    "MY CAT ATE",
    "THE MAT IS RED",
]


def emissions(frames: list) -> torch.Tensor:
    """(T, V) log-probs: a symbol per frame gets ~all the mass; a dict spreads it as given."""
    logits = torch.full((len(frames), len(VOCAB)), -12.0)
    for t, frame in enumerate(frames):
        spread = frame if isinstance(frame, dict) else {frame: 1.0}
        for symbol, p in spread.items():
            logits[t, VOCAB.index[symbol]] = float(np.log(p))
    return torch.log_softmax(logits, dim=-1)


def spell(text: str) -> list:
    """Frames for ``text``: each character once, a blank after each (so doubled letters survive)."""
    frames = [BLANK]
    for c in text:
        frames += ["|" if c == " " else c, BLANK]
    return frames


# "THE CA" + a near tie between X (0.5) and T (0.45): the acoustic best spells the non-word CAX.
TIED = emissions(spell("THE CA") + [{"X": 0.5, "T": 0.45}, BLANK])


@pytest.fixture(scope="module")
def lm_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm") / "cat.arpa"
    build_lm(LM_TEXT, path, order=3)
    return path


def test_greedy_collapses_repeats_and_drops_blanks():
    lp = emissions(["H", "H", BLANK, "I", "|", "|", "Y", BLANK, "O", "O"])
    assert greedy_decode(lp, None, VOCAB) == ["HI YO"]
    # A blank between two identical symbols keeps both; without one they merge.
    assert greedy_decode(emissions(["L", BLANK, "L"]), vocab=VOCAB) == ["LL"]
    assert greedy_decode(emissions(["L", "L"]), vocab=VOCAB) == ["L"]
    # Leading/trailing/repeated separators do not produce stray spaces.
    assert greedy_decode(emissions(["|", "A", "|", BLANK, "|", "B", "|"]), vocab=VOCAB) == ["A B"]


def test_a_blank_penalty_recovers_a_letter_that_blank_narrowly_wins():
    # "CAT" whose T frame gives blank 0.55 and T 0.45: plain greedy drops the T
    lp = emissions(spell("CA") + [{BLANK: 0.55, "T": 0.45}, BLANK])
    before = lp.clone()
    assert greedy_decode(lp, None, VOCAB) == ["CA"]
    # log(0.55 / 0.45) = 0.20: a smaller penalty changes nothing, a larger one brings the T back
    assert greedy_decode(lp, None, VOCAB, blank_penalty=0.1) == ["CA"]
    assert greedy_decode(lp, None, VOCAB, blank_penalty=0.3) == ["CAT"]
    assert torch.equal(lp, before)  # the caller's emissions are left alone
    # where blank wins by a wide margin (the other frames: ~12 nats), a moderate penalty inserts nothing
    assert greedy_decode(emissions(spell("CAT")), None, VOCAB, blank_penalty=5.0) == ["CAT"]


def test_the_evaluation_picks_the_blank_penalty_with_the_lowest_dev_cer():
    from types import SimpleNamespace

    from asrflow.evaluate.run import tune_blank_penalty

    model = SimpleNamespace(vocab=VOCAB)
    em = {"a": emissions(spell("CA") + [{BLANK: 0.55, "T": 0.45}, BLANK]),  # needs a penalty > 0.20
          "b": emissions(spell("DOG"))}                                      # right with any of these
    got = tune_blank_penalty(model, em, {"a": "CAT", "b": "DOG"}, [1.0, 0.0, 0.5, 3.0])
    assert [row["blank_penalty"] for row in got["grid"]] == [0.0, 0.5, 1.0, 3.0]
    assert got["grid"][0]["cer"] == pytest.approx(1 / 6) and got["grid"][1]["cer"] == 0.0
    assert got["blank_penalty"] == 0.5  # 0.5, 1.0 and 3.0 tie at CER 0: the smallest wins
    assert got["dev_utterances"] == 2
    assert tune_blank_penalty(model, {}, {}, [0.0, 1.0])["blank_penalty"] == 0.0
    # each speaker group's CER at the chosen penalty (e.g. the held-out voice's share of dev)
    em["c"] = emissions(spell("CA") + [{BLANK: 0.9, "T": 0.1}, BLANK])  # beyond what 0.5 fixes
    got = tune_blank_penalty(model, em, {"a": "CAT", "b": "DOG", "c": "CAT"}, [0.0, 0.5],
                             {"a": "espeak", "b": "espeak", "c": "festival (held-out voice)"})
    assert got["blank_penalty"] == 0.5 and got["cer"] == pytest.approx(1 / 9)
    assert got["by_group"] == {"espeak": 0.0, "festival (held-out voice)": pytest.approx(1 / 3)}


def test_greedy_batch_respects_lengths_and_accepts_numpy():
    a = emissions(spell("HI YO"))
    b = emissions(spell("OK") + ["Z"] * (a.shape[0] - len(spell("OK"))))  # padding spells ZZZ
    batch = torch.stack([a, b])
    lengths = torch.tensor([a.shape[0], len(spell("OK"))])
    assert greedy_decode(batch, lengths, VOCAB) == ["HI YO", "OK"]
    assert greedy_decode(batch.numpy(), [a.shape[0], len(spell("OK"))], VOCAB) == ["HI YO", "OK"]
    with pytest.raises(ValueError):
        greedy_decode(batch, [a.shape[0] + 1, 1], VOCAB)


def test_beam_without_lm_matches_clear_emissions():
    decoder = BeamSearchDecoder(VOCAB, beam_size=8)
    assert not decoder.has_lm
    lp = emissions(["H", "H", BLANK, "I", "|", "|", "Y", BLANK, "O", "O"])
    assert decoder.decode(lp) == ["HI YO"]
    batch = torch.stack([emissions(spell("HELLO")), emissions(spell("HELO") + [BLANK, BLANK])])
    assert decoder.decode(batch) == ["HELLO", "HELO"]
    with pytest.raises(ValueError):
        decoder.decode(torch.zeros(3, len(VOCAB) + 1))


def test_lm_flips_acoustically_tied_word(lm_path):
    assert greedy_decode(TIED, vocab=VOCAB) == ["THE CAX"]
    assert BeamSearchDecoder(VOCAB, beam_size=16).decode(TIED) == ["THE CAX"]
    with_lm = BeamSearchDecoder(VOCAB, lm_path, beam_size=16, lm_weight=2.0)
    assert with_lm.has_lm
    assert with_lm.decode(TIED) == ["THE CAT"]
    # lm_weight 0 switches the LM off.
    assert with_lm.with_weights(0.0, 0.0).decode(TIED) == ["THE CAX"]


def test_out_of_vocabulary_words_survive_unless_unk_score_forbids(lm_path):
    confident = emissions(spell("THE CA") + [{"X": 0.95, "T": 0.05}, BLANK])
    open_vocab = BeamSearchDecoder(VOCAB, lm_path, beam_size=16, lm_weight=0.5)
    assert open_vocab.decode(confident) == ["THE CAX"]
    closed = BeamSearchDecoder(VOCAB, lm_path, beam_size=16, lm_weight=0.5, unk_score=float("-inf"))
    assert closed.decode(confident) == ["THE CAT"]


def test_lm_decoder_batches_with_lengths(lm_path):
    clear = emissions(spell("THE DOG SAT"))
    padded = torch.cat([TIED, torch.log_softmax(torch.zeros(clear.shape[0] - TIED.shape[0], len(VOCAB)), -1)])
    batch = torch.stack([clear, padded])
    decoder = BeamSearchDecoder(VOCAB, lm_path, beam_size=16)
    assert decoder.decode(batch, torch.tensor([clear.shape[0], TIED.shape[0]])) == ["THE DOG SAT", "THE CAT"]


def test_tune_lm_weights_picks_best_dev_wer(lm_path):
    base = BeamSearchDecoder(VOCAB, lm_path, beam_size=16)
    dev = [TIED, emissions(spell("THE MAT"))]
    refs = ["THE CAT", "THE MAT"]
    result = tune_lm_weights(base.with_weights, dev, refs, weight_grid([0.0, 2.0], [0.0]))
    assert result.best == (2.0, 0.0)
    assert result.wer == 0.0
    assert [row["wer"] for row in result.table] == [pytest.approx(0.25), 0.0]
    # Equal dev WER: the earliest grid point wins, deterministically.
    tie = tune_lm_weights(base.with_weights, dev, refs, [(2.0, 0.0), (3.0, 0.0)])
    assert tie.best == (2.0, 0.0)
    with pytest.raises(ValueError):
        tune_lm_weights(base.with_weights, dev, refs[:1], [(1.0, 0.0)])


def test_lm_scores_words_made_of_bpe_pieces(lm_path):
    """With BPE units the word boundary is a word-initial piece ('▁CA'), not '|': the LM must still
    see whole words. An acoustic tie between the pieces of CAX and CAT goes to the LM's word."""
    from asrflow.text import BpeVocab

    bpe = BpeVocab.build(LM_TEXT * 4 + ["THE CAX", "CAX"], vocab_size=30)
    pieces = lambda text: [bpe.symbols[i] for i in bpe.encode(text)]  # noqa: E731
    assert pieces("THE")[0].startswith("\u2581")

    def bpe_emissions(frames):
        logits = torch.full((len(frames), len(bpe)), -12.0)
        for t, frame in enumerate(frames):
            for symbol, p in (frame if isinstance(frame, dict) else {frame: 1.0}).items():
                logits[t, bpe.index[symbol]] = float(np.log(p))
        return torch.log_softmax(logits, dim=-1)

    frames = [BLANK]
    for p in pieces("THE CA"):
        frames += [p, BLANK]
    assert {"X", "T"} <= set(bpe.index), "single characters are pieces too"
    frames += [{"X": 0.5, "T": 0.45}, BLANK]  # CAX or CAT: a non-word by a hair
    tied = bpe_emissions(frames)
    assert greedy_decode(tied, vocab=bpe) == ["THE CAX"]
    assert BeamSearchDecoder(bpe, beam_size=16).decode(tied) == ["THE CAX"]
    assert BeamSearchDecoder(bpe, lm_path, beam_size=16, lm_weight=2.0).decode(tied) == ["THE CAT"]
