"""Training data in memory: 16-bit waveforms by utterance id, batches padded for the model and CTC."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from asrflow.audio import read_audio
from asrflow.manifest import Utterance, read_manifest, read_records
from asrflow.text import CharVocab


@dataclass
class Batch:
    ids: list[str]
    waves: torch.Tensor        # (B, T) float32
    wave_lens: torch.Tensor    # (B,) samples
    targets: torch.Tensor      # (B, S) int64, padded with 0 beyond target_lens
    target_lens: torch.Tensor  # (B,)
    dialects: list[str]

    @property
    def audio_seconds(self) -> float:
        return float(self.wave_lens.sum()) / 16000.0


class AudioStore:
    """All utterances of some splits, decoded once and kept as int16 (half the memory of float32)."""

    def __init__(self, utterances: Sequence[Utterance], vocab: CharVocab, sample_rate: int = 16000):
        self.utts = {u.id: u for u in utterances}
        self.vocab = vocab
        self.sample_rate = sample_rate
        self.audio: dict[str, np.ndarray] = {}
        for u in utterances:
            x, sr = read_audio(u.audio)
            if sr != sample_rate:
                raise ValueError(f"{u.audio}: {sr} Hz, expected {sample_rate} Hz (run the resampling step)")
            self.audio[u.id] = np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)

    @classmethod
    def from_manifest(cls, path: str | Path, splits: Sequence[str], vocab: CharVocab, ids: set[str] | None = None) -> "AudioStore":
        utts = [u for u in read_manifest(path) if u.split in splits and (ids is None or u.id in ids)]
        return cls(utts, vocab)

    def __len__(self) -> int:
        return len(self.utts)

    def ids(self) -> list[str]:
        return sorted(self.utts)

    def collate(self, ids: Sequence[str]) -> Batch:
        waves = [torch.from_numpy(self.audio[i].astype(np.float32) / 32767.0) for i in ids]
        lens = torch.tensor([len(w) for w in waves], dtype=torch.long)
        padded = torch.zeros(len(waves), int(lens.max()))
        for row, w in enumerate(waves):
            padded[row, : len(w)] = w
        encoded = [self.vocab.encode(self.utts[i].text) for i in ids]
        tlens = torch.tensor([len(t) for t in encoded], dtype=torch.long)
        targets = torch.zeros(len(ids), max(1, int(tlens.max())), dtype=torch.long)
        for row, t in enumerate(encoded):
            targets[row, : len(t)] = torch.tensor(t, dtype=torch.long)
        return Batch(list(ids), padded, lens, targets, tlens, [self.utts[i].dialect for i in ids])


def dialect_class_weights(dialects: Sequence[str], power: float = 0.5) -> dict[str, float]:
    """Loss weight per dialect ∝ (1/frequency)^power, normalized so the mean weight over utterances is 1."""
    counts = Counter(dialects)
    raw = {d: (1.0 / c) ** power for d, c in counts.items()}
    mean = sum(raw[d] for d in dialects) / len(dialects)
    return {d: w / mean for d, w in raw.items()}


def load_noise(noise_manifest: str | Path, split: str = "train") -> list[torch.Tensor]:
    """The noise recordings of one split (train or heldout environments) as float32 tensors."""
    out = []
    for r in read_records(noise_manifest):
        if r["split"] != split:
            continue
        path = Path(r["audio"])
        if not path.is_absolute():
            path = Path(noise_manifest).resolve().parent / path
        x, _ = read_audio(path)
        out.append(torch.from_numpy(x))
    if not out:
        raise ValueError(f"{noise_manifest}: no noise recordings in split {split!r}")
    return out
