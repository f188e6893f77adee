"""The text the word LM is estimated from, with every dev and test sentence taken out.

Embedded corpus (``corpus.source: embedded``): all the text the sentence pool is drawn from, i.e.
every WordNet gloss example and every fortune sentence (``asrflow.corpus.sentences``), normalized by
``asrflow.text.normalize_text`` but not filtered by length or speakability as the pool is: about
50k sentences and 300k words, some 20 times the training transcripts. Optionally the WordNet
definitions too (1.2M more words, in dictionary style). Real corpora: the training transcripts plus
an optional user text file (``evaluation.lm_text``, one sentence per line).

Held out, whatever the source: any sentence equal to the normalized text of a dev or test utterance
of the prepared manifest, and any sentence that contains one as a run of whole words (so a sentence
spoken in dev/test cannot reach the LM inside a longer line either). ``LMText.excluded`` counts them.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from asrflow.manifest import iter_manifest
from asrflow.text import normalize_text

HELDOUT_SPLITS = ("dev", "test")
_QUOTED = re.compile(r'"[^"]+"')


@dataclass
class LMText:
    """Sentences for the LM (normalized, non-empty) and what was left out; ``info`` is JSON friendly."""

    sentences: list[str]
    sources: list[str]
    candidates: int  # sentences before the exclusion
    excluded_exact: int  # equal to a dev/test text
    excluded_containing: int  # containing a dev/test text as a run of words
    heldout_texts: int
    extra: dict = field(default_factory=dict)

    @property
    def excluded(self) -> int:
        return self.excluded_exact + self.excluded_containing

    def info(self) -> dict:
        return {"sources": self.sources, "candidate_sentences": self.candidates, "sentences": len(self.sentences),
                "excluded_exact": self.excluded_exact, "excluded_containing": self.excluded_containing,
                "heldout_texts": self.heldout_texts, **self.extra}


def heldout_texts(manifest: str | os.PathLike, splits: Sequence[str] = HELDOUT_SPLITS) -> set[str]:
    """Normalized transcripts of the manifest's dev and test utterances."""
    return {t for t in (normalize_text(u.text) for u in iter_manifest(manifest) if u.split in splits) if t}


def wordnet_definitions(wordnet_dir: Path | None = None) -> list[str]:
    """The definitions of WordNet's glosses (the gloss without its quoted examples), one per ``;`` part."""
    from asrflow.corpus import sentences as src

    wordnet_dir = wordnet_dir or src.WORDNET_DIR
    paths = [wordnet_dir / name for name in src.WORDNET_FILES]
    src._require(paths, "wordnet-base")
    out = []
    for path in paths:
        with open(path, encoding="latin-1") as fh:
            for line in fh:
                if line.startswith("  "):
                    continue
                _, sep, gloss = line.partition(" | ")
                if sep:
                    out.extend(p for p in _QUOTED.sub(" ", gloss).split(";") if p.strip())
    return out


def embedded_source_texts(definitions: bool = False, wordnet_dir: Path | None = None,
                          fortunes_dir: Path | None = None) -> tuple[list[str], list[str]]:
    """(raw sentences, source names) of the embedded corpus's sentence sources."""
    from asrflow.corpus import sentences as src

    texts = list(src.wordnet_examples(wordnet_dir or src.WORDNET_DIR))
    texts += src.fortune_sentences(fortunes_dir or src.FORTUNES_DIR)
    names = ["wordnet-examples", "fortunes"]
    if definitions:
        texts += wordnet_definitions(wordnet_dir)
        names.append("wordnet-definitions")
    return texts, names


def read_text_file(path: str | os.PathLike) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return [line for line in fh if line.strip()]


def exclude_heldout(sentences: Iterable[str], heldout: set[str]) -> tuple[list[str], int, int]:
    """(kept, dropped as equal, dropped as containing) for normalized ``sentences``."""
    by_first: dict[str, list[list[str]]] = defaultdict(list)
    for h in heldout:
        words = h.split()
        by_first[words[0]].append(words)
    kept, exact, containing = [], 0, 0
    for s in sentences:
        if s in heldout:
            exact += 1
            continue
        words = s.split()
        hit = False
        for i, w in enumerate(words):
            for h in by_first.get(w, ()):
                if words[i:i + len(h)] == h:
                    hit = True
                    break
            if hit:
                break
        if hit:
            containing += 1
        else:
            kept.append(s)
    return kept, exact, containing


def lm_text(manifest: str | os.PathLike, corpus_source: str = "embedded", user_text: str | os.PathLike | None = None,
            definitions: bool = False, wordnet_dir: Path | None = None, fortunes_dir: Path | None = None) -> LMText:
    """The LM's sentences for this corpus (see the module docstring), dev and test sentences excluded."""
    if corpus_source == "embedded":
        raw, names = embedded_source_texts(definitions, wordnet_dir, fortunes_dir)
    else:
        raw = [u.text for u in iter_manifest(manifest) if u.split == "train"]
        if not raw:
            raise ValueError(f"{manifest}: no training transcripts for the language model")
        names = ["train-transcripts"]
    if user_text:
        raw += read_text_file(user_text)
        names.append(str(user_text))
    normalized = [t for t in (normalize_text(r) for r in raw) if t]
    heldout = heldout_texts(manifest)
    kept, exact, containing = exclude_heldout(normalized, heldout)
    if not kept:
        raise ValueError("no sentences left for the language model")
    return LMText(sentences=kept, sources=names, candidates=len(normalized), excluded_exact=exact,
                  excluded_containing=containing, heldout_texts=len(heldout))
