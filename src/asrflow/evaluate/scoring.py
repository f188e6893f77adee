"""Word and character error rates with sclite-style counts, computed with jiwer.

Conventions (documented because published numbers depend on them):

* **Corpus aggregation.** Rates are total errors over total reference length,
  ``(S + D + I) / (S + D + H)`` summed over utterances, never the mean of per-utterance rates
  (which would let a one-word utterance weigh as much as a fifty-word one).
* **Text.** Strings are compared as given, after collapsing runs of whitespace and stripping the
  ends; pass ``normalize_text`` output for references and decoder output for hypotheses, which are
  already in the same (upper-case) alphabet.
* **CER counts spaces.** Characters include the single space between words, as in sclite's CER and
  jiwer's default: a word-boundary error (``NEWYORK`` vs ``NEW YORK``) is one character error.
* **Empty references.** An empty reference contributes nothing to the reference length and each
  hypothesis word/character counts as an insertion. When a whole corpus/group has reference length
  0, the rate is 0.0 if there are no errors and ``inf`` otherwise (an error rate relative to nothing).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Sequence

import jiwer


@dataclass(frozen=True)
class ErrorCounts:
    """Alignment counts at one level (words or characters)."""

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    hits: int = 0

    @property
    def ref_len(self) -> int:
        return self.hits + self.substitutions + self.deletions

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        if self.ref_len == 0:
            return 0.0 if self.errors == 0 else math.inf
        return self.errors / self.ref_len

    def __add__(self, other: "ErrorCounts") -> "ErrorCounts":
        return ErrorCounts(
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
            self.hits + other.hits,
        )


@dataclass(frozen=True)
class ErrorStats:
    """WER and CER of a set of utterances, with the counts behind them."""

    words: ErrorCounts = field(default_factory=ErrorCounts)
    chars: ErrorCounts = field(default_factory=ErrorCounts)
    utterances: int = 0

    @property
    def wer(self) -> float:
        return self.words.rate

    @property
    def cer(self) -> float:
        return self.chars.rate

    def __add__(self, other: "ErrorStats") -> "ErrorStats":
        """Pool two disjoint sets of utterances (counts add, rates are recomputed)."""
        return ErrorStats(self.words + other.words, self.chars + other.chars,
                          self.utterances + other.utterances)

    def to_dict(self) -> dict[str, float | int]:
        """Flat dict for JSON reports and MLflow metrics."""
        out: dict[str, float | int] = {"wer": self.wer, "cer": self.cer, "utterances": self.utterances}
        for level, counts in (("word", self.words), ("char", self.chars)):
            out[f"{level}_substitutions"] = counts.substitutions
            out[f"{level}_deletions"] = counts.deletions
            out[f"{level}_insertions"] = counts.insertions
            out[f"{level}_hits"] = counts.hits
            out[f"{level}_errors"] = counts.errors
            out[f"ref_{level}s"] = counts.ref_len
        return out


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _counts(output: Any) -> ErrorCounts:
    return ErrorCounts(output.substitutions, output.deletions, output.insertions, output.hits)


def score_corpus(refs: Sequence[str], hyps: Sequence[str]) -> ErrorStats:
    """Corpus-level WER/CER of aligned reference/hypothesis lists (see module doc for conventions)."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        return ErrorStats()
    refs = [_clean(r) for r in refs]
    hyps = [_clean(h) for h in hyps]
    # jiwer sums S/D/I/H over all sentence pairs, which is exactly the corpus aggregation we want.
    words = _counts(jiwer.process_words(refs, hyps))
    chars = _counts(jiwer.process_characters(refs, hyps))
    return ErrorStats(words=words, chars=chars, utterances=len(refs))


def score_utterance(ref: str, hyp: str) -> ErrorStats:
    return score_corpus([ref], [hyp])


def _field(record: Any, name: str) -> Any:
    if isinstance(record, Mapping):
        return record[name]
    return getattr(record, name)


def score_by_group(
    records: Iterable[Any],
    key: str | Callable[[Any], Hashable],
    ref_field: str = "ref",
    hyp_field: str = "hyp",
) -> dict[Hashable, ErrorStats]:
    """Corpus-level stats per group, e.g. per dialect, speaker group or SNR bucket.

    ``records`` are mappings or objects with ``ref``/``hyp`` fields and a group field named by
    ``key`` (or ``key`` is a function of the record, e.g. to bucket SNR). A record lacking the field
    raises ``KeyError``/``AttributeError`` rather than being silently dropped. Groups come back
    sorted by their string form, so reports are stable.
    """
    get_group = key if callable(key) else (lambda r: _field(r, key))
    grouped: dict[Hashable, tuple[list[str], list[str]]] = {}
    for record in records:
        refs, hyps = grouped.setdefault(get_group(record), ([], []))
        refs.append(_field(record, ref_field))
        hyps.append(_field(record, hyp_field))
    return {g: score_corpus(*grouped[g]) for g in sorted(grouped, key=str)}
