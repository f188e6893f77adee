"""CTC decoding: greedy, and beam search with an optional word n-gram LM.

The beam search is flashlight's lexicon-free CTC decoder (via ``torchaudio.models.decoder.ctc_decoder``)
over the acoustic model's units (characters, or BPE pieces), so any spelling can come out, including
words the LM has never seen.

Why a custom LM class rather than handing the KenLM path to ``ctc_decoder``: in lexicon-free mode
flashlight queries the LM once per emitted *token* (character), mapping each token symbol to an LM
word. A word n-gram LM would therefore see only "words" like ``C``, ``A``, ``T``, all ``<unk>``, and
would do nothing useful. :class:`KenLMWordLM` bridges the two: it buffers characters into the
current partial word and scores a whole word with KenLM when the word separator ``|`` (flashlight's
silence token) or a word-initial BPE piece (``▁THE``) is emitted, or when the utterance ends.
``word_score`` and ``unk_score`` are applied there too, because flashlight's lexicon-free options do
not have them.

Scores follow flashlight/torchaudio conventions: acoustic scores are natural-log emissions, LM scores
are KenLM log10 probabilities multiplied by ``lm_weight``, so weights tuned elsewhere for
``ctc_decoder`` with a lexicon mean the same here.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from asrflow.text import BLANK, SPACE, UNK, WORD_START, CharVocab

# --------------------------------------------------------------------------- greedy


def _as_batch(log_probs, lengths) -> tuple[torch.Tensor, list[int]]:
    """(B, T, V) float tensor on CPU plus per-item valid lengths; accepts (T, V) and numpy input."""
    x = torch.as_tensor(np.asarray(log_probs) if not torch.is_tensor(log_probs) else log_probs)
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim != 3:
        raise ValueError(f"log_probs must be (T, V) or (B, T, V), got shape {tuple(x.shape)}")
    batch, frames = x.shape[0], x.shape[1]
    if lengths is None:
        lens = [frames] * batch
    else:
        lens = [int(n) for n in torch.as_tensor(lengths).reshape(-1).tolist()]
        if len(lens) != batch:
            raise ValueError(f"{len(lens)} lengths for a batch of {batch}")
        if any(n < 0 or n > frames for n in lens):
            raise ValueError(f"lengths {lens} outside [0, {frames}]")
    return x.detach().to("cpu", torch.float32), lens


def greedy_decode(log_probs, lengths=None, vocab: CharVocab | None = None, blank_penalty: float = 0.0) -> list[str]:
    """Best-path CTC decoding: per-frame argmax, merge repeats, drop blanks, ``|`` -> space.

    ``log_probs`` is (T, V) or (B, T, V) (any monotone scores work: only the argmax matters);
    ``lengths`` gives each item's valid frames (default: all). Returns one string per item.
    ``blank_penalty`` is subtracted from the blank's score on every frame before the argmax. A CTC model
    trained for only a few epochs over-predicts blank, so its errors are mostly deletions; a penalty
    trades some of them for insertions. The evaluation tunes it on dev (``evaluation.blank_penalties``).
    """
    if vocab is None:
        raise ValueError("greedy_decode needs the vocabulary")
    x, lens = _as_batch(log_probs, lengths)
    if x.shape[-1] != len(vocab):
        raise ValueError(f"log_probs has {x.shape[-1]} classes, vocabulary has {len(vocab)}")
    if blank_penalty:
        x = x.clone()  # _as_batch may return the caller's own tensor
        x[..., vocab.blank_id] -= float(blank_penalty)
    best = x.argmax(dim=-1)
    texts = []
    for b, n in enumerate(lens):
        path = torch.unique_consecutive(best[b, :n]).tolist()
        # CharVocab.decode drops blank/<unk> and turns '|' into single spaces.
        texts.append(vocab.decode(i for i in path if i != vocab.blank_id))
    return texts


# --------------------------------------------------------------------------- word LM for lexicon-free search


def _load_kenlm(path: str | os.PathLike):
    import kenlm

    if not os.path.exists(path):
        raise FileNotFoundError(f"language model not found: {path}")
    return kenlm.Model(str(path))


def _kenlm_word_lm_class():
    """Defined lazily so importing this module does not pull in flashlight unless a beam search is built."""
    import kenlm
    from torchaudio.models.decoder import CTCDecoderLM, CTCDecoderLMState

    class KenLMWordLM(CTCDecoderLM):
        """Word-level KenLM scores for flashlight's character-level lexicon-free decoder.

        LM state per hypothesis = (KenLM state after the completed words, characters of the word in
        progress). Flashlight compares LM states by identity, so states form a tree keyed by token
        (``state.child(token)``): two hypotheses share a state exactly when they have emitted the
        same tokens, and re-expanding a hypothesis hits the cache instead of KenLM.
        """

        def __init__(self, model, tokens: Sequence[str], lm_weight: float, word_score: float,
                     unk_score: float):
            CTCDecoderLM.__init__(self)
            self.model = model
            self.tokens = list(tokens)
            self.sil = self.tokens.index(SPACE)
            # Tokens that spell nothing: blank never reaches score(); <unk> is dropped from output.
            self.silent = {self.tokens.index(t) for t in (BLANK, UNK) if t in self.tokens}
            # BPE pieces that begin a word ('▁the'): they end the word in progress, like '|' does.
            self.word_starts = {i for i, t in enumerate(self.tokens) if t.startswith(WORD_START)}
            self.lm_weight = lm_weight
            self.word_score = word_score
            self.unk_score = unk_score
            # LM state -> (score of the transition into it, kenlm.State, partial word). One dict
            # rather than several: it holds an entry per expanded (hypothesis, token) pair.
            self._states: dict = {}

        def start(self, start_with_nothing: bool):
            # A fresh tree per utterance; dropping the old dict frees the previous one.
            root = CTCDecoderLMState()
            ken = kenlm.State()
            if start_with_nothing:
                self.model.NullContextWrite(ken)
            else:
                self.model.BeginSentenceWrite(ken)
            self._states = {root: (0.0, ken, "")}
            return root

        def _score_word(self, ken, word: str):
            out = kenlm.State()
            score = self.lm_weight * self.model.BaseScore(ken, word, out) + self.word_score
            if word not in self.model:
                score += self.unk_score
            return out, score

        def score(self, state, token: int):
            child = state.child(token)
            known = self._states.get(child)
            if known is not None:
                return child, known[0]
            _, ken, partial = self._states[state]
            score = 0.0
            if token == self.sil or token in self.word_starts:
                if partial:  # a word just ended; repeated or leading separators cost nothing
                    ken, score = self._score_word(ken, partial)
                partial = self.tokens[token][len(WORD_START):] if token in self.word_starts else ""
            elif token not in self.silent:
                partial += self.tokens[token]
            self._states[child] = (score, ken, partial)
            return child, score

        def finish(self, state):
            _, ken, partial = self._states[state]
            score = 0.0
            if partial:
                ken, score = self._score_word(ken, partial)
            score += self.lm_weight * self.model.BaseScore(ken, "</s>", kenlm.State())
            return state.child(-1), score

    return KenLMWordLM


# --------------------------------------------------------------------------- beam search


class BeamSearchDecoder:
    """Lexicon-free CTC beam search (flashlight) with an optional word n-gram LM (ARPA or KenLM binary).

    Without ``lm_path`` it is a plain CTC prefix beam search; ``lm_weight``, ``word_score`` and
    ``unk_score`` then have no effect. With an LM, each completed word adds
    ``lm_weight * log10 P(word | history) + word_score`` (``+ unk_score`` if the word is outside the
    LM vocabulary) and the end of the utterance adds ``lm_weight * log10 P(</s> | history)``.

    ``unk_score`` defaults to 0: out-of-vocabulary words are already penalized by the LM's ``<unk>``
    probability. ``-inf`` would forbid them, i.e. closed-vocabulary decoding.

    Cost: with an LM, flashlight calls back into Python for every (hypothesis, token) expansion,
    about ``beam_size * beam_size_token`` calls per frame (a few microseconds each), and keeps one
    small LM state per call until the utterance ends. ``beam_size_token`` (default: all tokens)
    of ~10 cuts that about threefold for a ~30-symbol vocabulary with little effect on accuracy.
    """

    def __init__(
        self,
        vocab: CharVocab,
        lm_path: str | os.PathLike | None = None,
        beam_size: int = 50,
        lm_weight: float = 2.0,
        word_score: float = 0.0,
        beam_threshold: float = 25.0,
        unk_score: float = 0.0,
        beam_size_token: int | None = None,
        *,
        _lm_model=None,
    ):
        from torchaudio.models.decoder import ctc_decoder

        for required in (BLANK, SPACE):
            if required not in vocab.index:
                raise ValueError(f"vocabulary lacks {required!r}")
        if vocab.symbols.index(BLANK) != 0:
            raise ValueError("blank must be symbol 0")
        self.vocab = vocab
        self.lm_path = lm_path
        self.beam_size = beam_size
        self.lm_weight = lm_weight
        self.word_score = word_score
        self.beam_threshold = beam_threshold
        self.unk_score = unk_score
        self.beam_size_token = beam_size_token
        self._lm_model = _lm_model if _lm_model is not None else (
            _load_kenlm(lm_path) if lm_path is not None else None
        )
        lm = None
        if self._lm_model is not None:
            lm = _kenlm_word_lm_class()(self._lm_model, vocab.symbols, lm_weight, word_score, unk_score)
        self._decoder = ctc_decoder(
            lexicon=None,
            tokens=list(vocab.symbols),
            lm=lm,
            nbest=1,
            beam_size=beam_size,
            beam_size_token=beam_size_token,
            beam_threshold=beam_threshold,
            # The LM applies its own weight (see KenLMWordLM); flashlight must not scale it again.
            lm_weight=1.0,
            blank_token=BLANK,
            sil_token=SPACE,
            unk_word=UNK,
        )

    @property
    def has_lm(self) -> bool:
        return self._lm_model is not None

    def with_weights(self, lm_weight: float, word_score: float, beam_size: int | None = None) -> "BeamSearchDecoder":
        """Same decoder with other LM weights (and beam), reusing the loaded LM (for grid search)."""
        return BeamSearchDecoder(
            self.vocab, self.lm_path, beam_size=beam_size or self.beam_size, lm_weight=lm_weight,
            word_score=word_score, beam_threshold=self.beam_threshold, unk_score=self.unk_score,
            beam_size_token=self.beam_size_token, _lm_model=self._lm_model,
        )

    def decode(self, log_probs, lengths=None) -> list[str]:
        """Best transcript per item of (T, V) or (B, T, V) log-probabilities (log-softmax output)."""
        x, lens = _as_batch(log_probs, lengths)
        if x.shape[-1] != len(self.vocab):
            raise ValueError(f"log_probs has {x.shape[-1]} classes, vocabulary has {len(self.vocab)}")
        hypos = self._decoder(x.contiguous(), torch.tensor(lens, dtype=torch.int32))
        return [self.vocab.decode(h[0].tokens.tolist()) if h else "" for h in hypos]


# --------------------------------------------------------------------------- lexicon-constrained beam search

LEXICONS = ("none", "lm_vocab", "cmudict")
CMUDICT_RELPATH = ("model", "en-us", "cmudict-en-us.dict")


def arpa_vocabulary(path: str | os.PathLike) -> list[str]:
    """The words of an ARPA file's unigram section (not ``<s>``, ``</s>``, ``<unk>``), in file order."""
    words, inside = [], False
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line == "\\1-grams:":
                inside = True
                continue
            if inside:
                if line.startswith("\\"):
                    break
                parts = line.split("\t")
                if len(parts) >= 2 and parts[1] not in ("<s>", "</s>", UNK):
                    words.append(parts[1])
    if not words:
        raise ValueError(f"{path}: no unigrams (not an ARPA file?)")
    return words


def find_cmudict() -> str:
    """The CMU pronouncing dictionary shipped in the ``pocketsphinx`` wheel (words only are used)."""
    import importlib.util

    spec = importlib.util.find_spec("pocketsphinx")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("evaluation.lexicon: cmudict needs the CMU dictionary: pip install pocketsphinx "
                                "(it ships model/en-us/cmudict-en-us.dict), or set evaluation.cmudict_path")
    path = os.path.join(list(spec.submodule_search_locations)[0], *CMUDICT_RELPATH)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not in this pocketsphinx install; set evaluation.cmudict_path")
    return path


def cmudict_words(path: str | os.PathLike | None = None) -> list[str]:
    """Distinct words of a CMU-dictionary file, upper-cased; alternates ``WORD(2)`` and words that
    ``normalize_text`` would change (digits, dots, hyphens) are left out."""
    from asrflow.text import normalize_text

    out, seen = [], set()
    with open(path or find_cmudict(), encoding="utf-8", errors="replace") as fh:
        for line in fh:
            head = line.split(" ", 1)[0].split("(", 1)[0].strip()
            word = head.upper()
            if word and word not in seen and normalize_text(word) == word:
                seen.add(word)
                out.append(word)
    return out


def lexicon_words(kind: str, lm_path: str | os.PathLike | None, cmudict_path: str | os.PathLike | None = None) -> list[str]:
    """The decoding vocabulary: the LM's words (``lm_vocab``), or those plus the CMU dictionary's (``cmudict``)."""
    if kind not in LEXICONS or kind == "none":
        raise ValueError(f"lexicon must be one of {LEXICONS[1:]}, got {kind!r}")
    if lm_path is None:
        raise ValueError("a lexicon is built from the LM vocabulary: give lm_path")
    words = arpa_vocabulary(lm_path)
    if kind == "cmudict":
        known = set(words)
        words += [w for w in cmudict_words(cmudict_path) if w not in known]
    return words


def spell(word: str, vocab: CharVocab) -> list[str] | None:
    """The unit sequence that spells ``word`` (characters then ``|``, or BPE pieces), None if it cannot be spelled."""
    from asrflow.text import BpeVocab

    if isinstance(vocab, BpeVocab):
        ids = vocab.encode(word)
        unk = vocab.index[UNK]
        return None if not ids or unk in ids else [vocab.symbols[i] for i in ids]
    if any(c not in vocab.index or c in (BLANK, SPACE, UNK) for c in word):
        return None
    return [*word, SPACE]


def write_lexicon(words: Iterable[str], vocab: CharVocab, path: str | os.PathLike) -> dict:
    """A flashlight lexicon file (``WORD u n i t s``), one spelling per word; returns counts."""
    written = skipped = 0
    with open(path, "w", encoding="utf-8") as fh:
        for w in words:
            units = spell(w, vocab)
            if units is None:
                skipped += 1
                continue
            fh.write(f"{w} {' '.join(units)}\n")
            written += 1
    if written == 0:
        raise ValueError("no lexicon word can be spelled with the model's units")
    return {"words": written, "unspellable": skipped}


def oov_rate(texts: Iterable[str], lexicon: Iterable[str]) -> dict:
    """Running-word OOV rate of ``texts`` (normalized transcripts) against ``lexicon``."""
    known = set(lexicon)
    tokens = [w for t in texts for w in t.split()]
    oov = [w for w in tokens if w not in known]
    return {"tokens": len(tokens), "oov_tokens": len(oov), "oov_rate": len(oov) / len(tokens) if tokens else 0.0,
            "oov_types": len(set(oov)), "lexicon_words": len(known)}


def _shared_kenlm(lm_path, lexicon_file: str):
    """flashlight's KenLM over the lexicon's word dictionary, loaded once and shared by every grid
    point of the weight search (loading the default 13 MB ARPA takes ~1.5 s). It is what
    ``ctc_decoder(lm=<path>)`` builds internally; the path itself if that private API moves."""
    try:
        from torchaudio.models.decoder._ctc_decoder import _KenLM, _create_word_dict, _load_words
    except ImportError:
        return str(lm_path)
    if _KenLM is None:
        return str(lm_path)
    return _KenLM(str(lm_path), _create_word_dict(_load_words(lexicon_file)))


class LexiconBeamSearchDecoder:
    """Lexicon-constrained CTC beam search: flashlight's decoder over a word lexicon, with the KenLM
    word LM scored in C++ (``torchaudio.models.decoder.ctc_decoder(lexicon=...)``).

    Only words of ``words`` can come out; ``unk_score=-inf`` (the default) forbids anything else.
    Each word adds ``lm_weight * log10 P(word | history) + word_score``, the same scale as
    :class:`BeamSearchDecoder`, so the weight grid means the same for both. Words the model's units
    cannot spell are left out of the lexicon (``lexicon_info`` counts them).
    """

    def __init__(self, vocab: CharVocab, lm_path: str | os.PathLike, words: Sequence[str], beam_size: int = 50,
                 lm_weight: float = 2.0, word_score: float = 0.0, beam_threshold: float = 25.0,
                 unk_score: float = float("-inf"), beam_size_token: int | None = None, *,
                 _lexicon_file: str | None = None, _lexicon_info: dict | None = None, _kenlm=None):
        import tempfile

        from torchaudio.models.decoder import ctc_decoder

        self.vocab, self.lm_path, self.words = vocab, lm_path, words
        self.beam_size, self.lm_weight, self.word_score = beam_size, lm_weight, word_score
        self.beam_threshold, self.unk_score, self.beam_size_token = beam_threshold, unk_score, beam_size_token
        if _lexicon_file is None:
            fd, _lexicon_file = tempfile.mkstemp(prefix="asrflow-lexicon-", suffix=".txt")
            os.close(fd)
            self._owns_file = True
            _lexicon_info = write_lexicon(words, vocab, _lexicon_file)
        else:
            self._owns_file = False
        self.lexicon_file, self.lexicon_info = _lexicon_file, _lexicon_info or {}
        self._kenlm = _kenlm if _kenlm is not None else _shared_kenlm(lm_path, _lexicon_file)
        self._decoder = ctc_decoder(
            lexicon=_lexicon_file, tokens=list(vocab.symbols), lm=self._kenlm, nbest=1, beam_size=beam_size,
            beam_size_token=beam_size_token, beam_threshold=beam_threshold, lm_weight=lm_weight,
            word_score=word_score, unk_score=unk_score, sil_score=0.0, log_add=False, blank_token=BLANK,
            sil_token=SPACE, unk_word=UNK)

    has_lm = True

    def __del__(self):
        if getattr(self, "_owns_file", False):
            try:
                os.unlink(self.lexicon_file)
            except OSError:
                pass

    def with_weights(self, lm_weight: float, word_score: float, beam_size: int | None = None) -> "LexiconBeamSearchDecoder":
        """Same lexicon (file shared), other weights or beam; the parent must outlive it."""
        child = LexiconBeamSearchDecoder(
            self.vocab, self.lm_path, self.words, beam_size=beam_size or self.beam_size, lm_weight=lm_weight,
            word_score=word_score, beam_threshold=self.beam_threshold, unk_score=self.unk_score,
            beam_size_token=self.beam_size_token, _lexicon_file=self.lexicon_file, _lexicon_info=self.lexicon_info,
            _kenlm=self._kenlm)
        child._parent = self  # keeps the lexicon file alive
        return child

    def decode(self, log_probs, lengths=None) -> list[str]:
        x, lens = _as_batch(log_probs, lengths)
        if x.shape[-1] != len(self.vocab):
            raise ValueError(f"log_probs has {x.shape[-1]} classes, vocabulary has {len(self.vocab)}")
        hypos = self._decoder(x.contiguous(), torch.tensor(lens, dtype=torch.int32))
        return [" ".join(w for w in h[0].words if w != UNK) if h else "" for h in hypos]


# --------------------------------------------------------------------------- LM weight tuning


@dataclass
class TuningResult:
    """Best (lm_weight, word_score[, beam_size]) on dev, with every grid point's dev WER for the record."""

    lm_weight: float
    word_score: float
    wer: float
    table: list[dict] = field(default_factory=list)
    beam_size: int | None = None  # set when the grid searched beam sizes too

    @property
    def best(self) -> tuple[float, float]:
        return self.lm_weight, self.word_score

    def to_dict(self) -> dict:
        d = {"lm_weight": self.lm_weight, "word_score": self.word_score, "wer": self.wer, "table": list(self.table)}
        if self.beam_size is not None:
            d["beam_size"] = self.beam_size
        return d


def weight_grid(lm_weights: Iterable[float], word_scores: Iterable[float],
                beam_sizes: Iterable[int] | None = None) -> list[tuple]:
    """Every (lm_weight, word_score) pair, lm_weight-major, for :func:`tune_lm_weights`; with
    ``beam_sizes``, (lm_weight, word_score, beam_size) triples, smallest beam first (ties keep it)."""
    if beam_sizes is None:
        return list(itertools.product(lm_weights, word_scores))
    return [(w, ws, b) for b in sorted(beam_sizes) for w, ws in itertools.product(lm_weights, word_scores)]


def tune_lm_weights(
    decoder_factory: Callable[..., BeamSearchDecoder],
    dev_log_probs: Sequence,
    dev_refs: Sequence[str],
    grid: Iterable[tuple],
) -> TuningResult:
    """Grid-search (lm_weight, word_score) or (lm_weight, word_score, beam_size) by corpus WER on the **dev** set.

    Pass dev data only: choosing weights on test would make the reported test WER optimistic.
    ``dev_log_probs`` is a sequence of per-utterance (T, V) log-probabilities (variable length, no
    padding); ``decoder_factory(*point)`` builds a decoder, e.g. ``base.with_weights`` (the lexicon
    decoder's takes a beam size too). Ties keep the earliest grid point, so results do not depend on
    float noise.
    """
    from asrflow.evaluate.scoring import score_corpus

    if len(dev_log_probs) != len(dev_refs):
        raise ValueError(f"{len(dev_log_probs)} dev emissions but {len(dev_refs)} references")
    table: list[dict] = []
    best: dict | None = None
    for point in grid:
        lm_weight, word_score = point[0], point[1]
        decoder = decoder_factory(*point)
        hyps = [decoder.decode(lp)[0] for lp in dev_log_probs]
        stats = score_corpus(dev_refs, hyps)
        row = {"lm_weight": lm_weight, "word_score": word_score, "wer": stats.wer,
               "word_errors": stats.words.errors, "ref_words": stats.words.ref_len}
        if len(point) > 2:
            row["beam_size"] = point[2]
        table.append(row)
        if best is None or row["word_errors"] < best["word_errors"]:
            best = row
    if best is None:
        raise ValueError("empty weight grid")
    return TuningResult(best["lm_weight"], best["word_score"], best["wer"], table, best.get("beam_size"))
