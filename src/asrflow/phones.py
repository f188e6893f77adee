"""Phone targets for an auxiliary CTC loss: espeak-ng's own phonemes of the transcripts.

A character CTC model has to learn English spelling and acoustics at once. A second CTC head that
predicts phones at a middle layer gives the lower layers a target that follows the sound directly
(hierarchical multitask CTC: Fernández et al. 2007, Sanabria & Metze 2018; phone targets at an
intermediate layer, Krishna et al. 2018). The phones come from the synthesizer family most of the
corpus was spoken by: ``espeak-ng -x`` prints its phoneme mnemonics for any text, offline.

The lexicon is built once per corpus (rule ``phone_lexicon``) from the training and dev transcripts'
words, each phonemized alone, so a word always maps to the same phones whatever surrounds it. Stress
and syllabicity marks are dropped: they are prosody, not phone identity. Inference never uses phones.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterable

from asrflow.text import BLANK

ESPEAK_VOICE = "en-us"
_SEPARATOR = "_"


class PhoneLexiconError(ValueError):
    """A lexicon that cannot be built or cannot encode a transcript."""


def phonemize_words(words: Iterable[str], voice: str = ESPEAK_VOICE) -> dict[str, list[str]]:
    """Each word (upper-case, as our transcripts are) -> espeak-ng's phones for it, in one espeak-ng call.

    espeak-ng reads one word per line and prints one line per word; a count mismatch (a word espeak
    splits or joins) is an error naming the words, never a silent misalignment.
    """
    words = sorted(set(words))
    if not words:
        return {}
    program = shutil.which("espeak-ng")
    if program is None:
        raise PhoneLexiconError("espeak-ng is not installed (apt-get install espeak-ng): it makes the phone targets")
    # each word alone, lower-cased (espeak reads an all-caps word letter by letter as an acronym)
    text = "".join(f"{w.lower()}\n" for w in words)
    done = subprocess.run([program, "-q", "-x", f"--sep={_SEPARATOR}", "-v", voice], input=text,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise PhoneLexiconError(f"espeak-ng failed ({done.returncode}): {done.stderr.strip()[:300]}")
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    if len(lines) != len(words):
        raise PhoneLexiconError(f"espeak-ng printed {len(lines)} phone lines for {len(words)} words "
                                f"(first words: {words[:5]}): cannot align them")
    lexicon = {}
    for word, line in zip(words, lines):
        phones = [p for p in (strip_prosody(tok) for tok in re.split(rf"[{_SEPARATOR}\s]+", line)) if p]
        if not phones:
            raise PhoneLexiconError(f"espeak-ng gave no phones for {word!r} ({line!r})")
        lexicon[word] = phones
    return lexicon


def strip_prosody(token: str) -> str:
    """``'oU`` -> ``oU``, ``,E`` -> ``E``: the phone without its stress or syllabicity mark."""
    return re.sub(r"[',%=]", "", token)


class PhoneLexicon:
    """Word -> phone ids, with the blank at index 0. ``encode(text)`` concatenates its words' phones."""

    def __init__(self, symbols: list[str], words: dict[str, list[str]], voice: str = ESPEAK_VOICE):
        if not symbols or symbols[0] != BLANK:
            raise PhoneLexiconError("the phone inventory must start with the blank symbol")
        self.symbols = list(symbols)
        self.voice = voice  # the espeak-ng voice that phonemized the words
        self.index = {s: i for i, s in enumerate(self.symbols)}
        self.words = {w: [self.index[p] for p in phones] for w, phones in words.items()}

    def __len__(self) -> int:
        return len(self.symbols)

    @classmethod
    def build(cls, texts: Iterable[str], voice: str = ESPEAK_VOICE) -> "PhoneLexicon":
        words = phonemize_words((w for t in texts for w in t.split()), voice)
        inventory = sorted({p for phones in words.values() for p in phones})
        return cls([BLANK] + inventory, words, voice)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in text.split():
            phones = self.words.get(word)
            if phones is None:
                raise PhoneLexiconError(f"{word!r} is not in the phone lexicon (rule phone_lexicon builds it from "
                                        f"the training and dev transcripts): rebuild it for this corpus")
            ids.extend(phones)
        return ids

    def to_dict(self) -> dict:
        return {"symbols": self.symbols, "voice": self.voice,
                "words": {w: [self.symbols[i] for i in ids] for w, ids in sorted(self.words.items())}}

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=0, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: Path) -> "PhoneLexicon":
        data = json.loads(Path(path).read_text())
        return cls(data["symbols"], data["words"], data.get("voice", ESPEAK_VOICE))
