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
            # '|' (characters) and a piece's leading '▁' (BPE) both mean "a word starts here"
            out.append(" " if s == SPACE else s.replace(WORD_START, " "))
        return re.sub(r"\s+", " ", "".join(out)).strip()

    @property
    def units(self) -> str:
        return "char"

    def identity(self) -> list[str]:
        """What a checkpoint must agree on to be trained further with this vocabulary."""
        return list(self.symbols)

    def to_dict(self) -> dict:
        return {"type": "char", "symbols": self.symbols}

    def save(self, path: str | Path) -> None:
        from asrflow.manifest import write_json

        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "CharVocab":
        """Either kind of vocabulary file (characters or BPE), by its ``type``."""
        with open(path, encoding="utf-8") as fh:
            return vocab_from_dict(json.load(fh))


WORD_START = "\u2581"  # sentencepiece's "▁": the piece begins a word


def _sentencepiece(model_proto: bytes):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model_proto)
    return sp


class BpeVocab(CharVocab):
    """Byte-pair-encoding units (sentencepiece), trained on the training transcripts.

    Symbols: blank, '|', the pieces, <unk>, as for characters. The model never learns to emit '|'
    (no target contains it: pieces carry the word boundary as a leading '▁'); it is kept because
    flashlight's lexicon-free beam search needs a silence token. The sentencepiece model travels
    inside the vocabulary file (and every checkpoint), so the artifact is self-contained.
    """

    def __init__(self, symbols: list[str], model_proto: bytes):
        super().__init__(symbols)
        self.model_proto = model_proto
        self._sp = _sentencepiece(model_proto)

    @property
    def units(self) -> str:
        return "bpe"

    @classmethod
    def build(cls, texts: Iterable[str], vocab_size: int = 256) -> "BpeVocab":  # type: ignore[override]
        """Deterministic: one thread, input in the order given, no sampling of sentences."""
        import io

        import sentencepiece as spm

        sentences = [t for t in texts if t]
        if not sentences:
            raise ValueError("no transcripts to train the BPE model on")
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
            character_coverage=1.0, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, num_threads=1,
            hard_vocab_limit=False, shuffle_input_sentence=False, input_sentence_size=0,
            minloglevel=2)
        proto = buf.getvalue()
        sp = _sentencepiece(proto)
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not sp.is_unknown(i)]
        return cls([BLANK, SPACE] + pieces + [UNK], proto)

    def encode(self, text: str) -> list[int]:
        unk = self.index[UNK]
        return [self.index.get(piece, unk) for piece in self._sp.encode(text, out_type=str)]

    def identity(self) -> list[str]:
        import hashlib

        return list(self.symbols) + ["sentencepiece:" + hashlib.sha256(self.model_proto).hexdigest()[:16]]

    def to_dict(self) -> dict:
        import base64

        return {"type": "bpe", "symbols": self.symbols,
                "sentencepiece_model": base64.b64encode(self.model_proto).decode("ascii")}


def build_vocab(texts: Iterable[str], units: str = "char", bpe_vocab_size: int = 256) -> CharVocab:
    if units == "char":
        return CharVocab.build(texts)
    if units == "bpe":
        return BpeVocab.build(texts, bpe_vocab_size)
    raise ValueError(f"unknown output units {units!r}: char or bpe")


def vocab_from_dict(data: dict | list) -> CharVocab:
    """A vocabulary file's (or checkpoint's) content; a bare list is a character vocabulary."""
    if isinstance(data, list):
        return CharVocab(data)
    kind = data.get("type", "char")
    if kind == "char":
        return CharVocab(data["symbols"])
    if kind == "bpe":
        import base64

        return BpeVocab(data["symbols"], base64.b64decode(data["sentencepiece_model"]))
    raise ValueError(f"unknown vocabulary type {kind!r}")
