"""Log-mel features and global mean/variance normalization, as torch modules.

Both run on whatever device their input is on, so feature extraction happens on the GPU when training
on one. Padded positions never leak into real frames: ``LogMel`` uses ``center=False`` framing, so a
frame counted as real only covers real samples, and the frame count follows exactly from the sample
count (see ``LogMel.frame_lengths``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import torch
import torchaudio
from torch import nn

from asrflow.audio import FEATURE_HOP_MS, SAMPLE_RATE

LOG_EPS = 1e-6  # added to mel energies before the log; keeps digital silence at a finite, modest floor


def mel_band_centres_hz(n_mels: int, f_min: float, f_max: float, mel_scale: str = "htk") -> torch.Tensor:
    """Centre frequencies (Hz) of the ``n_mels`` triangular filters of a mel filterbank over [f_min, f_max]
    (``torchaudio.functional.melscale_fbanks``' points: ``n_mels + 2`` equally spaced mels, ends dropped)."""
    if mel_scale == "htk":
        to_mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
        to_hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    elif mel_scale == "slaney":  # linear below 1 kHz, logarithmic above (Slaney's Auditory Toolbox, librosa)
        step, log_step = 200.0 / 3, math.log(6.4) / 27.0
        to_mel = lambda f: f / step if f < 1000.0 else 15.0 + math.log(f / 1000.0) / log_step  # noqa: E731
        to_hz = lambda m: m * step if m < 15.0 else 1000.0 * math.exp(log_step * (m - 15.0))  # noqa: E731
    else:
        raise ValueError(f"mel_scale must be htk or slaney, got {mel_scale!r}")
    low, high = to_mel(float(f_min)), to_mel(float(f_max))
    points = [low + (high - low) * k / (n_mels + 1) for k in range(1, n_mels + 1)]
    return torch.tensor([to_hz(m) for m in points], dtype=torch.float64)


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool mask, True on real positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class LogMel(nn.Module):
    """Waveforms (B, T) + sample lengths -> log-mel (B, frames, n_mels) + frame lengths.

    Framing is ``center=False`` with frame size ``n_fft`` (= the window, 25 ms by default) and hop
    ``hop_ms``: an utterance of ``L`` samples has ``(L - n_fft) // hop + 1`` frames (0 if shorter than one
    frame), each made only of its own samples, so features do not depend on how much a batch is padded.
    Padded frames of the output are zero. Computed in fp32 even under autocast (an fp16 STFT/power
    spectrum overflows and loses the low-energy bins).
    """

    def __init__(self, n_mels: int = 80, sample_rate: int = SAMPLE_RATE, win_ms: float = 25.0, hop_ms: float = FEATURE_HOP_MS,
                 n_fft: int | None = None):
        super().__init__()
        self.n_mels = int(n_mels)
        self.sample_rate = int(sample_rate)
        self.win_length = int(round(sample_rate * win_ms / 1000.0))
        self.hop_length = int(round(sample_rate * hop_ms / 1000.0))
        # n_fft = window keeps "frame = window" so the exact length formula holds; a larger n_fft would
        # make every frame span n_fft samples (torch.stft frames by n_fft when center=False).
        self.n_fft = int(n_fft) if n_fft is not None else self.win_length
        if self.n_fft < self.win_length:
            raise ValueError(f"n_fft={self.n_fft} is shorter than the window ({self.win_length} samples)")
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=self.sample_rate, n_fft=self.n_fft, win_length=self.win_length,
            hop_length=self.hop_length, n_mels=self.n_mels, power=2.0, center=False,
        )

    # the features are natural logs of power: a gain of g dB (power x 10^(g/10)) adds g * ln(10) / 10
    units_per_db = math.log(10.0) / 10.0

    def band_centres_hz(self) -> torch.Tensor:
        """Each mel band's centre frequency (torchaudio's MelSpectrogram: HTK mels over 0 to Nyquist)."""
        return mel_band_centres_hz(self.n_mels, 0.0, self.sample_rate / 2, "htk")

    def frame_lengths(self, sample_lengths: torch.Tensor) -> torch.Tensor:
        """Exact number of frames for each sample length (0 for utterances shorter than one frame)."""
        n = torch.div(sample_lengths - self.n_fft, self.hop_length, rounding_mode="floor") + 1
        return n.clamp_min(0)

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if waves.dim() != 2:
            raise ValueError(f"expected waveforms (B, T), got shape {tuple(waves.shape)}")
        lengths = lengths.to(waves.device)
        x = waves.float()
        if x.size(1) < self.n_fft:  # a batch of only very short clips: pad so one (unreal) frame exists
            x = nn.functional.pad(x, (0, self.n_fft - x.size(1)))
        with torch.autocast(device_type=x.device.type, enabled=False):
            mel = self.mel(x)  # (B, n_mels, frames)
            feats = torch.log(mel + LOG_EPS).transpose(1, 2)  # (B, frames, n_mels)
        frame_lens = self.frame_lengths(lengths)
        feats = feats.masked_fill(~lengths_to_mask(frame_lens, feats.size(1))[:, :, None], 0.0)
        return feats, frame_lens


class CMVNAccumulator:
    """Streaming per-dimension sums in float64 over real (unpadded) frames.

    ``merge`` (or summing ``count``/``sum``/``sumsq`` across ranks) combines shards exactly.
    """

    def __init__(self, dim: int | None = None):
        self.count = 0
        self.sum: torch.Tensor | None = None if dim is None else torch.zeros(dim, dtype=torch.float64)
        self.sumsq: torch.Tensor | None = None if dim is None else torch.zeros(dim, dtype=torch.float64)

    def update(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        """feats (B, T, D) with lengths (B,), or (T, D) for one utterance."""
        if feats.dim() == 2:
            feats = feats[None]
            lengths = torch.tensor([feats.size(1)]) if lengths is None else lengths.reshape(1)
        if lengths is None:
            lengths = torch.full((feats.size(0),), feats.size(1))
        x = feats.detach().to("cpu", torch.float64)
        mask = lengths_to_mask(lengths.to("cpu"), x.size(1))
        real = x[mask]  # (N, D): only real frames count
        if self.sum is None:
            self.sum = torch.zeros(x.size(-1), dtype=torch.float64)
            self.sumsq = torch.zeros(x.size(-1), dtype=torch.float64)
        self.count += int(real.size(0))
        self.sum += real.sum(0)
        self.sumsq += (real * real).sum(0)

    def merge(self, other: "CMVNAccumulator") -> "CMVNAccumulator":
        if other.sum is not None:
            if self.sum is None:
                self.sum, self.sumsq = other.sum.clone(), other.sumsq.clone()
            else:
                self.sum += other.sum
                self.sumsq += other.sumsq
            self.count += other.count
        return self

    def mean_std(self, min_std: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count == 0 or self.sum is None:
            raise ValueError("no frames accumulated: cannot compute CMVN statistics")
        mean = self.sum / self.count
        # clamp: E[x^2] - E[x]^2 can dip below zero by rounding for near-constant dimensions
        var = (self.sumsq / self.count - mean * mean).clamp_min(0.0)
        return mean, var.sqrt().clamp_min(min_std)


class GlobalCMVN(nn.Module):
    """(x - mean) / std per feature dimension; statistics are buffers, so they travel in the state dict.

    With ``lengths`` the padded frames of the output are set to zero again (otherwise they would become
    -mean/std).
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, count: int = 0):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.shape != std.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and std {tuple(std.shape)} differ in shape")
        if not bool((std > 0).all()):
            raise ValueError("CMVN std must be positive")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.count = int(count)

    @property
    def dim(self) -> int:
        return int(self.mean.numel())

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        out = (feats - self.mean.to(feats.dtype)) / self.std.to(feats.dtype)
        if lengths is not None:
            out = out.masked_fill(~lengths_to_mask(lengths.to(out.device), out.size(1))[:, :, None], 0.0)
        return out

    @classmethod
    def from_accumulator(cls, acc: CMVNAccumulator, min_std: float = 1e-5) -> "GlobalCMVN":
        mean, std = acc.mean_std(min_std)
        return cls(mean, std, count=acc.count)

    def save(self, path: str | Path) -> None:
        """``.json`` -> readable lists; any other suffix -> ``torch.save`` of a dict of tensors."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            record = {"type": "global_cmvn", "dim": self.dim, "count": self.count,
                      "mean": self.mean.tolist(), "std": self.std.tolist()}
            path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        else:
            torch.save({"mean": self.mean.cpu(), "std": self.std.cpu(), "count": self.count}, path)

    @classmethod
    def load(cls, path: str | Path) -> "GlobalCMVN":
        path = Path(path)
        if path.suffix == ".json":
            record = json.loads(path.read_text(encoding="utf-8"))
        else:
            record = torch.load(path, map_location="cpu", weights_only=True)
        cmvn = cls(torch.as_tensor(record["mean"]), torch.as_tensor(record["std"]), int(record.get("count", 0)))
        if not all(math.isfinite(v) for v in cmvn.mean.tolist() + cmvn.std.tolist()):
            raise ValueError(f"{path}: non-finite CMVN statistics")
        return cmvn


def compute_cmvn_stats(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], min_std: float = 1e-5) -> GlobalCMVN:
    """Global CMVN from an iterable of (feats (B, T, D), lengths (B,)); padded frames are ignored."""
    acc = CMVNAccumulator()
    for feats, lengths in batches:
        acc.update(feats, lengths)
    return GlobalCMVN.from_accumulator(acc, min_std)
