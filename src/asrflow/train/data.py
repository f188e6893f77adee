"""The training data path: utterance metadata in memory, audio read lazily by DataLoader workers.

Layout follows lhotse's split of responsibilities:

* ``UtteranceIndex`` holds the only per-utterance state a rank keeps: id, audio path, transcript,
  dialect and the duration prep measured (no audio header is read again). For LibriSpeech's 281k
  utterances that is tens of MB, against ~110 GB of decoded audio.
* The sampler (``asrflow.train.sampler.BucketBatchSampler``) decides the batches from metadata alone,
  in the training process, from (seed, epoch): every random draw of training stays keyed to
  (seed, epoch, batch, rank), never to a worker's stream.
* ``BatchReader`` is the map-style dataset the workers run: a batch request (each utterance's id
  and metadata, looked up in the training process) -> one padded ``Batch`` (file reads and
  collation, nothing random). Workers hold no per-utterance state at all, so the copy-on-write
  growth of Python containers indexed in forked workers (pytorch#13246) cannot happen. Features,
  CMVN and augmentation run on the training device.
* ``BatchLoader`` wraps ``torch.utils.data.DataLoader`` (workers, prefetching, persistent workers,
  pinned memory on CUDA) and runs one epoch's remaining batches in order, so a resumed run reads
  exactly the batches an uninterrupted one would have.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import soundfile as sf
import torch

from asrflow.audio import SAMPLE_RATE, AudioError
from asrflow.manifest import Utterance
from asrflow.text import CharVocab


@dataclass
class Batch:
    ids: list[str]
    waves: torch.Tensor        # (B, T) float32
    wave_lens: torch.Tensor    # (B,) samples
    targets: torch.Tensor      # (B, S) int64, padded with 0 beyond target_lens
    target_lens: torch.Tensor  # (B,)
    dialects: list[str]
    # a run trained from the frozen-encoder cache (asrflow.train.pretrained.encoder_cache) reads the
    # encoder's cached outputs instead of audio: waves is then (B, 0) and wave_lens the measured durations
    encoded: torch.Tensor | None = None       # (B, T', d_model) float32
    encoded_lens: torch.Tensor | None = None  # (B,)
    # the transcripts' espeak-ng phones (asrflow.phones), for a run with an auxiliary phone CTC head
    phone_targets: torch.Tensor | None = None      # (B, P) int64, padded with 0
    phone_target_lens: torch.Tensor | None = None  # (B,)
    # the transcripts themselves, for a loss that tokenizes them its own way (Whisper's auxiliary decoder)
    texts: list[str] | None = None
    # who speaks each utterance, for the voice adversary (asrflow.train.adversary): the manifest's speaker
    # and its "engine:voice" ("" where it has none)
    speakers: list[str] | None = None
    voices: list[str] | None = None

    @property
    def audio_seconds(self) -> float:
        return float(self.wave_lens.sum()) / SAMPLE_RATE

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pinning thread on CUDA (``pin_memory=True``)."""
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return Batch(self.ids, pin(self.waves), pin(self.wave_lens), pin(self.targets), pin(self.target_lens),
                     self.dialects, pin(self.encoded), pin(self.encoded_lens), pin(self.phone_targets),
                     pin(self.phone_target_lens), self.texts, self.speakers, self.voices)


@dataclass(frozen=True, slots=True)
class UtteranceMeta:
    audio: str
    text: str
    dialect: str
    duration: float
    speaker: str = ""
    voice: str = ""  # "engine:voice" where the manifest names them (the synthetic corpus), else ""


class UtteranceIndex:
    """id -> metadata for some utterances; no audio. One small frozen record per utterance."""

    def __init__(self, utterances: Iterable[Utterance]):
        self.meta: dict[str, UtteranceMeta] = {}
        for u in utterances:
            self.add(u)

    def add(self, u: Utterance) -> None:
        engine, voice = u.extra.get("engine"), u.extra.get("voice")
        self.meta[u.id] = UtteranceMeta(str(u.audio), u.text, sys.intern(u.dialect), float(u.duration),
                                        sys.intern(str(u.speaker)),
                                        sys.intern(f"{engine}:{voice}") if engine and voice else "")

    def __len__(self) -> int:
        return len(self.meta)

    def __getitem__(self, uid: str) -> UtteranceMeta:
        return self.meta[uid]

    def ids(self) -> list[str]:
        return sorted(self.meta)

    def text(self, uid: str) -> str:
        return self.meta[uid].text

    def request(self, ids: Sequence[str]) -> "BatchRequest":
        return [(uid, self.meta[uid]) for uid in ids]


BatchRequest = list[tuple[str, UtteranceMeta]]  # what a loader worker is sent for one batch


def read_samples(path: str) -> np.ndarray:
    """One prepared utterance as float32 mono at ``SAMPLE_RATE`` (prep wrote 16-bit mono wav)."""
    try:
        with sf.SoundFile(path) as fh:
            if fh.samplerate != SAMPLE_RATE:
                raise AudioError(f"{path}: {fh.samplerate} Hz, the trainer needs {SAMPLE_RATE} Hz "
                                 "(run the resampling step)")
            x = fh.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as exc:
        raise AudioError(f"{path}: unreadable audio ({exc})") from exc
    return x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]


class BatchReader(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches: ``reader[request] -> Batch``, where a request
    is ``UtteranceIndex.request(ids)``; ``reader[ids]`` also works in the training process.

    Runs in the loader workers. Deterministic: the same request gives the same tensors in any process.
    """

    def __init__(self, vocab: CharVocab, index: UtteranceIndex | None = None, encoded=None, phones=None):
        self.vocab, self.index = vocab, index
        self.encoded = encoded  # an EncoderCache: read cached encoder outputs instead of audio
        self.phones = phones    # an asrflow.phones.PhoneLexicon: also return phone targets

    def __getitem__(self, item: "BatchRequest | Sequence[str]") -> Batch:
        request = item if item and isinstance(item[0], tuple) else self.index.request(item)
        ids = [uid for uid, _ in request]
        metas = [m for _, m in request]
        hidden = hidden_lens = None
        if self.encoded is not None:
            hidden, hidden_lens = self.encoded.read(ids)
            lens = torch.tensor([round(m.duration * SAMPLE_RATE) for m in metas], dtype=torch.long)
            padded = torch.zeros(len(ids), 0)
        else:
            waves = [read_samples(m.audio) for m in metas]
            lens = torch.tensor([len(w) for w in waves], dtype=torch.long)
            padded = torch.zeros(len(waves), max(1, int(lens.max())))
            for row, w in enumerate(waves):
                padded[row, : len(w)] = torch.from_numpy(w)
        targets, tlens = pad_targets([self.vocab.encode(m.text) for m in metas])
        phones = phone_lens = None
        if self.phones is not None:
            phones, phone_lens = pad_targets([self.phones.encode(m.text) for m in metas])
        return Batch(ids, padded, lens, targets, tlens, [m.dialect for m in metas], hidden, hidden_lens,
                     phones, phone_lens, [m.text for m in metas], [m.speaker for m in metas], [m.voice for m in metas])

    def __len__(self) -> int:  # DataLoader asks; sampling is by request, never by position
        return len(self.index) if self.index is not None else 0


def pad_targets(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> ((B, S) int64 padded with 0, (B,) lengths)."""
    lens = torch.tensor([len(t) for t in sequences], dtype=torch.long)
    padded = torch.zeros(len(sequences), max(1, int(lens.max())), dtype=torch.long)
    for row, t in enumerate(sequences):
        padded[row, : len(t)] = torch.tensor(t, dtype=torch.long)
    return padded, lens


class _EpochOrder(torch.utils.data.Sampler):
    """The batch list the loader walks next; set before each ``iter(DataLoader)``. The batches are
    decided by the bucket sampler in this process; workers are sent each batch's request."""

    def __init__(self, index: UtteranceIndex) -> None:
        self.index = index
        self.batches: list[list[str]] = []

    def __iter__(self) -> Iterator[BatchRequest]:
        return (self.index.request(b) for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class BatchLoader:
    """Reads given batches ahead in ``workers`` processes; ``workers=0`` reads in this process.

    ``wait_seconds`` accumulates the time the training loop blocked waiting for the next batch, the
    figure the benchmark reports as the loader-wait share of step time.
    """

    def __init__(self, index: UtteranceIndex, vocab: CharVocab, workers: int = 1, prefetch_factor: int = 2,
                 persistent_workers: bool = True, pin_memory: bool = False, encoded=None, phones=None):
        self.index, self.workers = index, int(workers)
        self.reader = BatchReader(vocab, index, encoded, phones)  # for reads in this process (tests, probes)
        self.order = _EpochOrder(index)
        options = {}
        if self.workers > 0:
            options = {"prefetch_factor": int(prefetch_factor), "persistent_workers": bool(persistent_workers)}
        # batch_size=None: the sampler's items are already batches; the workers' reader has no index
        self.loader = torch.utils.data.DataLoader(BatchReader(vocab, encoded=encoded, phones=phones), sampler=self.order, batch_size=None,
                                                  num_workers=self.workers, pin_memory=pin_memory, **options)
        self.wait_seconds = 0.0

    def batches(self, batch_ids: Sequence[Sequence[str]]) -> Iterator[Batch]:
        """The batches for ``batch_ids``, in that order."""
        if not batch_ids:
            return
        self.order.batches = [list(b) for b in batch_ids]
        it = iter(self.loader)
        for _ in range(len(batch_ids)):
            t0 = time.perf_counter()
            batch = next(it)
            self.wait_seconds += time.perf_counter() - t0
            yield batch

    def take_wait(self) -> float:
        s, self.wait_seconds = self.wait_seconds, 0.0
        return s


def dialect_class_weights(dialects: Sequence[str], power: float = 0.5) -> dict[str, float]:
    """Loss weight per dialect ∝ (1/frequency)^power, normalized so the mean weight over utterances is 1."""
    counts = Counter(dialects)
    raw = {d: (1.0 / c) ** power for d, c in counts.items()}
    mean = sum(raw[d] for d in dialects) / len(dialects)
    return {d: w / mean for d, w in raw.items()}
