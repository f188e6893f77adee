"""Clean English sentences for the embedded corpus, taken from Debian packages available offline.

Sources: the example sentences in WordNet's glosses (package ``wordnet-base``, double-quoted text after
the ``|`` of each ``/usr/share/wordnet/data.*`` line) and the fortune cookies of ``fortunes-min``.
The result depends only on the installed package versions, never on the machine or a random seed.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from asrflow.text import is_clean, normalize_text

WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_FILES = ("data.adj", "data.adv", "data.noun", "data.verb")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNE_FILES = ("fortunes", "literature", "riddles")

# Synthesizers expand these instead of reading them as written, so the transcript would be wrong.
_ABBREVIATIONS = frozenset({
    "CO", "DR", "ETC", "FT", "INC", "JR", "LB", "LBS", "LTD", "MR", "MRS", "MS", "MT", "OZ", "SR", "ST", "VS",
})
_VOWELS = re.compile(r"[AEIOUY]")
_QUOTED = re.compile(r'"([^"]+)"')
# A sentence ends at . ! ? (possibly followed by closing quotes) and whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


class SentenceSourceError(RuntimeError):
    """The Debian packages that hold the sentence sources are not installed."""


def _require(paths: list[Path], package: str) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SentenceSourceError(
            f"sentence source missing: {', '.join(missing)}; install the Debian package "
            f"'{package}' (apt-get install {package})"
        )


def wordnet_examples(wordnet_dir: Path = WORDNET_DIR) -> list[str]:
    """Quoted usage examples from WordNet glosses, raw (not normalized)."""
    paths = [wordnet_dir / name for name in WORDNET_FILES]
    _require(paths, "wordnet-base")
    examples = []
    for path in paths:
        with open(path, encoding="latin-1") as fh:  # WordNet 3.0 data files are not all valid UTF-8
            for line in fh:
                if line.startswith("  "):  # license header
                    continue
                _, sep, gloss = line.partition(" | ")
                if sep:
                    examples.extend(_QUOTED.findall(gloss))
    return examples


def _fortune_entries(text: str) -> list[str]:
    """Split a fortune file into entries, dropping attribution lines ("-- Mark Twain")."""
    text = re.sub(r".\x08", "", text)  # nroff overstriking: "_\bA" is an underlined A
    entries = []
    for entry in re.split(r"^%\s*$", text, flags=re.MULTILINE):
        lines = [ln for ln in entry.splitlines() if not ln.strip().startswith("--")]
        entries.append(" ".join(ln.strip() for ln in lines))
    return entries


def fortune_sentences(fortunes_dir: Path = FORTUNES_DIR) -> list[str]:
    """Sentences of the fortune cookies, raw (not normalized)."""
    paths = [fortunes_dir / name for name in FORTUNE_FILES]
    _require(paths, "fortunes-min")
    sentences = []
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")
        for entry in _fortune_entries(text):
            sentences.extend(s for s in _SENTENCE_END.split(entry) if s.strip())
    return sentences


def speakable(text: str) -> bool:
    """True if a synthesizer reads every word of the normalized ``text`` as written.

    Words without a vowel ("MR", "HMM", the "Q" of a riddle) and common abbreviations are expanded or
    spelled out by the engines, so the transcript would not match the audio.
    """
    return all(_VOWELS.search(w) and w.strip("'") not in _ABBREVIATIONS for w in text.split())


@lru_cache(maxsize=8)
def _load(min_words: int, max_words: int) -> tuple[str, ...]:
    kept = set()
    for raw in wordnet_examples() + fortune_sentences():
        text = normalize_text(raw)
        if is_clean(text) and min_words <= len(text.split()) <= max_words and speakable(text):
            kept.add(text)
    return tuple(sorted(kept))


def load_sentences(min_words: int = 3, max_words: int = 20) -> list[str]:
    """Deduplicated, normalized, clean sentences of ``min_words``..``max_words`` words, sorted."""
    if min_words < 1 or max_words < min_words:
        raise ValueError(f"bad word range {min_words}..{max_words}")
    return list(_load(min_words, max_words))
