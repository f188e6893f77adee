"""Word n-gram language model in ARPA format, estimated in pure Python.

KenLM's ``lmplz`` is not available in the workflow's environment, so this module estimates the model
itself: **interpolated modified Kneser-Ney** smoothing (Chen & Goodman 1998), the same estimator
``lmplz`` implements, written out as an ARPA file that ``kenlm.Model`` and flashlight's KenLM
wrapper load (the ARPA backoff form of an interpolated model is exact: the backoff weight of a
context is its interpolation weight).

Estimation, for an order-N model over sentences padded as ``<s> w1 .. wk </s>``:

* Adjusted counts ``a``: raw counts for order N and for n-grams starting with ``<s>`` (nothing can
  precede them); otherwise the continuation count, i.e. the number of distinct words seen
  immediately to the left of the n-gram.
* Discounts per order from count-of-counts ``n_k`` of the adjusted counts:
  ``Y = n1/(n1+2 n2)``, ``D1 = 1-2Y n2/n1``, ``D2 = 2-3Y n3/n2``, ``D3+ = 3-4Y n4/n3``.
  Tiny corpora often lack some ``n_k`` (``lmplz`` then refuses to build); we fall back to a single
  absolute discount ``D = Y`` (Ney's estimate) for that order, or ``D = 0.5`` when even ``Y`` is
  undefined. ``LMStats.discounts`` records what was used.
* ``p(w|h) = (a(hw) - D(a(hw))) / a(h.) + gamma(h) p(w|h')`` with
  ``gamma(h) = (D1 N1(h.) + D2 N2(h.) + D3+ N3+(h.)) / a(h.)``; unigrams interpolate with the
  uniform distribution over the vocabulary (every word, ``</s>`` and ``<unk>``; not ``<s>``), which
  is what gives ``<unk>`` its probability.

No dev or test text may go in: the LM is used to decode dev/test, and any dev/test text in it would
leak into the reported error rates. ``asrflow.evaluate.lm_text`` assembles the workflow's LM text
(the embedded corpus's sentence sources, or the training transcripts) with those sentences excluded.
Cost, measured: the default text (306k words, 50k sentences) gives 33k unigrams, 170k bigrams and
255k trigrams (13.5 MB ARPA) in 5 s and 260 MB on one idle CPU core (14 s, 860 MB peak with
the dev/test exclusion, while other jobs ran), so no pruning is needed.

The order must be at least 2: KenLM refuses to load unigram-only models.
"""
from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from asrflow.manifest import atomic_write_text, iter_manifest
from asrflow.text import normalize_text

BOS = "<s>"
EOS = "</s>"
UNK = "<unk>"

# log10 probability written for <s>: it is never predicted, only used as context (SRILM/lmplz use -99).
_BOS_LOG10PROB = -99.0
_FALLBACK_DISCOUNT = 0.5

Ngram = tuple[str, ...]


@dataclass
class LMStats:
    """What went into the LM and how big it came out; ``to_dict`` is JSON/MLflow friendly."""

    order: int
    sentences: int
    tokens: int  # training words, not counting <s>/</s>
    word_types: int  # distinct training words
    vocab_size: int  # unigram entries in the ARPA file: word types + <s>, </s>, <unk>
    ngram_counts: dict[int, int] = field(default_factory=dict)
    discounts: dict[int, list[float]] = field(default_factory=dict)  # order -> [D1, D2, D3+]
    modified_kn: dict[int, bool] = field(default_factory=dict)  # order -> False if fallback used

    def to_dict(self) -> dict:
        d = asdict(self)
        # JSON object keys must be strings.
        for key in ("ngram_counts", "discounts", "modified_kn"):
            d[key] = {str(k): v for k, v in d[key].items()}
        return d


@dataclass
class ArpaModel:
    """An estimated model: per order, n-gram -> (log10 prob, log10 backoff or None)."""

    order: int
    entries: dict[int, dict[Ngram, tuple[float, float | None]]]

    def to_arpa(self) -> str:
        """ARPA text with n-grams sorted within each order, so equal input gives identical bytes."""
        lines = ["", "\\data\\"]
        lines += [f"ngram {n}={len(self.entries[n])}" for n in range(1, self.order + 1)]
        for n in range(1, self.order + 1):
            lines += ["", f"\\{n}-grams:"]
            for gram in sorted(self.entries[n]):
                logp, bow = self.entries[n][gram]
                line = f"{_fmt(logp)}\t{' '.join(gram)}"
                if bow is not None:
                    line += f"\t{_fmt(bow)}"
                lines.append(line)
        lines += ["", "\\end\\", ""]
        return "\n".join(lines)


def _fmt(x: float) -> str:
    text = f"{x:.6f}"
    return "0.000000" if text == "-0.000000" else text


# --------------------------------------------------------------------------- input


def tokenize(text: str) -> list[str]:
    """Normalize like the acoustic model's targets, so LM words match what the decoder spells."""
    return normalize_text(text).split()


def read_training_texts(manifest_path: str | os.PathLike, split: str = "train") -> list[str]:
    """Transcripts of the ``split`` utterances of a manifest.

    Filtering on ``split`` (rather than trusting the file to hold only training data) keeps dev/test
    text out of the LM even if a combined manifest is passed.
    """
    texts = [u.text for u in iter_manifest(manifest_path) if u.split == split]
    if not texts:
        raise ValueError(f"{manifest_path}: no utterances with split={split!r}")
    return texts


# --------------------------------------------------------------------------- estimation


def count_ngrams(sentences: Iterable[Sequence[str]], order: int) -> list[Counter]:
    """Raw counts per order (index n holds n-grams of length n; index 0 unused)."""
    counts: list[Counter] = [Counter() for _ in range(order + 1)]
    for words in sentences:
        padded = [BOS, *words, EOS]
        for n in range(1, order + 1):
            for i in range(len(padded) - n + 1):
                counts[n][tuple(padded[i : i + n])] += 1
    return counts


def adjusted_counts(raw: list[Counter], order: int) -> list[dict[Ngram, int]]:
    """Kneser-Ney counts: continuation counts below the top order, raw counts where no left context exists."""
    adjusted: list[dict[Ngram, int]] = [{} for _ in range(order + 1)]
    adjusted[order] = dict(raw[order])
    for n in range(1, order):
        left_types = Counter(gram[1:] for gram in raw[n + 1])
        adjusted[n] = {
            gram: (count if gram[0] == BOS else left_types[gram]) for gram, count in raw[n].items()
        }
    # <s> is context only; it never gets probability mass of its own.
    adjusted[1].pop((BOS,), None)
    return adjusted


def estimate_discounts(counts: Iterable[int]) -> tuple[list[float], bool]:
    """Modified-KN discounts [D1, D2, D3+] from count-of-counts; (discounts, True if modified KN held)."""
    n = Counter(c for c in counts if c <= 4)
    n1, n2, n3, n4 = n[1], n[2], n[3], n[4]
    if n1 > 0 and n2 > 0 and n3 > 0 and n4 > 0:
        y = n1 / (n1 + 2 * n2)
        d = [1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3]
        if all(0.0 < dk < k for k, dk in enumerate(d, start=1)):
            return d, True
    y = n1 / (n1 + 2 * n2) if n1 > 0 else 0.0
    single = y if 0.0 < y < 1.0 else _FALLBACK_DISCOUNT
    return [single] * 3, False


def _discount(discounts: list[float], count: int) -> float:
    return discounts[min(count, 3) - 1]


def _context_totals(
    grams: dict[Ngram, int], discounts: list[float]
) -> dict[Ngram, tuple[int, float]]:
    """Per context h: (sum of adjusted counts a(h.), discounted mass sum_w D(a(hw)))."""
    totals: dict[Ngram, list] = defaultdict(lambda: [0, 0.0])
    for gram, count in grams.items():
        entry = totals[gram[:-1]]
        entry[0] += count
        entry[1] += _discount(discounts, count)
    return {h: (total, mass) for h, (total, mass) in totals.items()}


def estimate_kneser_ney(
    sentences: Sequence[Sequence[str]], order: int = 3
) -> tuple[ArpaModel, LMStats]:
    """Interpolated modified Kneser-Ney estimate of an order-``order`` word model."""
    if order < 2:
        # KenLM (and so flashlight) refuses unigram-only models: "assumes at least a bigram model".
        raise ValueError(f"order must be >= 2 (KenLM cannot load unigram models), got {order}")
    sentences = [list(s) for s in sentences if s]
    if not sentences:
        raise ValueError("no non-empty training sentences for the language model")

    raw = count_ngrams(sentences, order)
    adjusted = adjusted_counts(raw, order)
    stats = LMStats(
        order=order,
        sentences=len(sentences),
        tokens=sum(len(s) for s in sentences),
        word_types=len({w for s in sentences for w in s}),
        vocab_size=0,
    )

    # Interpolated probabilities, lowest order first: each order needs p(w|h') from the one below.
    probs: list[dict[Ngram, float]] = [{} for _ in range(order + 1)]
    gammas: dict[Ngram, float] = {}
    for n in range(1, order + 1):
        discounts, modified = estimate_discounts(adjusted[n].values())
        stats.discounts[n] = [round(d, 6) for d in discounts]
        stats.modified_kn[n] = modified
        totals = _context_totals(adjusted[n], discounts)
        for context, (total, mass) in totals.items():
            gammas[context] = mass / total
        if n == 1:
            # Uniform base over everything predictable: seen words, </s> and <unk>.
            uniform = 1.0 / (len(adjusted[1]) + (0 if (UNK,) in adjusted[1] else 1))
            lower = lambda gram: uniform  # noqa: E731
        else:
            lower = lambda gram, below=probs[n - 1]: below[gram[1:]]  # noqa: E731
        for gram, count in adjusted[n].items():
            total, _ = totals[gram[:-1]]
            discounted = (count - _discount(discounts, count)) / total
            probs[n][gram] = discounted + gammas[gram[:-1]] * lower(gram)
        if n == 1 and (UNK,) not in probs[1]:
            probs[1][(UNK,)] = gammas[()] * uniform

    entries: dict[int, dict[Ngram, tuple[float, float | None]]] = {}
    for n in range(1, order + 1):
        entries[n] = {}
        for gram, p in probs[n].items():
            entries[n][gram] = (math.log10(p), _backoff(gram, gammas, n, order))
        if n == 1:
            entries[1][(BOS,)] = (_BOS_LOG10PROB, _backoff((BOS,), gammas, 1, order))
        stats.ngram_counts[n] = len(entries[n])
    stats.vocab_size = len(entries[1])
    return ArpaModel(order=order, entries=entries), stats


def _backoff(gram: Ngram, gammas: dict[Ngram, float], n: int, order: int) -> float | None:
    """log10 backoff weight: the interpolation weight of ``gram`` as a context, if it is one."""
    if n == order or gram not in gammas:
        return None
    return math.log10(gammas[gram]) if gammas[gram] > 0 else _BOS_LOG10PROB


# --------------------------------------------------------------------------- entry point


def build_lm(
    source: str | os.PathLike | Iterable[str],
    out_path: str | os.PathLike,
    order: int = 3,
    split: str = "train",
) -> LMStats:
    """Estimate an order-``order`` LM and write it as ARPA to ``out_path``.

    ``source`` is either a manifest path (only its ``split`` utterances are used, default train) or
    an iterable of transcripts. Text is normalized with ``normalize_text`` so LM words are spelled
    exactly like the acoustic model's output. The file is written atomically.
    """
    if isinstance(source, (str, os.PathLike)):
        texts = read_training_texts(source, split=split)
    else:
        texts = list(source)
    model, stats = estimate_kneser_ney([tokenize(t) for t in texts], order=order)
    atomic_write_text(Path(out_path), model.to_arpa())
    return stats
