"""Transcript normalization and the output vocabulary."""
from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable

BLANK = "<blank>"
SPACE = "|"  # word boundary token, as in wav2vec2/flashlight lexicon-free decoding
UNK = "<unk>"

_NUMBER_WORDS = {
    "0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five",
    "6": "six", "7": "seven", "8": "eight", "9": "nine",
}


def normalize_text(text: str) -> str:
    """Upper-case letters, apostrophes and single spaces; digits spelled out one by one.

    What a synthesizer says for punctuation or digits is ambiguous, so transcripts that still contain
    anything else after this are rejected by ``is_clean`` rather than guessed at.
    """
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = text.replace("’", "'").replace("`", "'")
    text = re.sub(r"[-_/]", " ", text)
    text = re.sub(r"\d", lambda m: f" {_NUMBER_WORDS[m.group(0)]} ", text)
    text = re.sub(r"[^A-Za-z' ]+", " ", text)
    text = re.sub(r"(?<![A-Za-z])'|'(?![A-Za-z])", " ", text)
    return re.sub(r"\s+", " ", text).strip().upper()


def is_clean(text: str) -> bool:
    return bool(text) and re.fullmatch(r"[A-Z' ]+", text) is not None


class CharVocab:
    """Character units with blank at index 0 and '|' as the word separator."""

    def __init__(self, symbols: list[str]):
        if not symbols or symbols[0] != BLANK:
            raise ValueError("vocabulary must start with the blank symbol")
        if len(set(symbols)) != len(symbols):
            raise ValueError("vocabulary has duplicate symbols")
        self.symbols = list(symbols)
        self.index = {s: i for i, s in enumerate(self.symbols)}

    def __len__(self) -> int:
        return len(self.symbols)

    @property
    def blank_id(self) -> int:
        return 0

    @classmethod
    def build(cls, texts: Iterable[str]) -> "CharVocab":
        counts: Counter[str] = Counter()
        for t in texts:
            counts.update(SPACE if c == " " else c for c in t)
        return cls([BLANK, SPACE] + sorted(s for s in counts if s != SPACE) + [UNK])

    def encode(self, text: str) -> list[int]:
        unk = self.index[UNK]
        return [self.index.get(SPACE if c == " " else c, unk) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            s = self.symbols[int(i)]
            if s in (BLANK, UNK):
                continue
            out.append(" " if s == SPACE else s)
        return re.sub(r"\s+", " ", "".join(out)).strip()

    def save(self, path: str | Path) -> None:
        from asrflow.manifest import write_json

        write_json(path, {"type": "char", "symbols": self.symbols})

    @classmethod
    def load(cls, path: str | Path) -> "CharVocab":
        with open(path, encoding="utf-8") as fh:
            return cls(json.load(fh)["symbols"])
