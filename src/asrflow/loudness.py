"""The audio front end shared by prep, training data and inference: mono, the model's sample rate,
and loudness normalization of active speech to a target RMS, limited by a peak ceiling.

This module is the one owner of the normalization. Prep (``asrflow.prep.resample``) measures the
gain here and lets sox apply it while dithering to 16 bit; ``asrflow-transcribe`` and the evaluation
apply :func:`prepare_waveform`, so a recording reaches the model at the level training audio had,
whatever level it was recorded at. The settings travel in the exported model under the ``frontend``
key (:meth:`Frontend.to_dict`); :meth:`Frontend.from_checkpoint` falls back to the prep defaults for
models exported before the key existed.

The normalization is scale invariant: multiplying the input by any gain ``g`` changes the measured
active level and peak by the same ``g`` dB, so the output is the same up to float rounding (inputs
that clip are the exception: their lost samples cannot be restored).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import numpy as np

from asrflow.audio import SAMPLE_RATE as DEFAULT_SAMPLE_RATE  # the one owner of the rate

DEFAULT_TARGET_RMS_DBFS = -23.0
DEFAULT_PEAK_CEILING_DBFS = -1.0


@dataclass(frozen=True)
class Frontend:
    """What every waveform goes through before the log-mel features (stored in ``model.pt``)."""

    sample_rate: int = DEFAULT_SAMPLE_RATE
    target_rms_dbfs: float = DEFAULT_TARGET_RMS_DBFS
    peak_ceiling_dbfs: float = DEFAULT_PEAK_CEILING_DBFS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, defaults: "Frontend | None" = None) -> "Frontend":
        """Known keys of ``d`` over ``defaults`` (the prep defaults if not given); unknown keys ignored."""
        base = (defaults or cls()).to_dict()
        for f in fields(cls):
            if d and d.get(f.name) is not None:
                base[f.name] = type(base[f.name])(d[f.name])
        return cls(**base)

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any], defaults: "Frontend | None" = None) -> "Frontend":
        """The ``frontend`` entry of an exported model; its top-level ``sample_rate`` if that is all it has."""
        d = dict(ckpt.get("frontend") or {})
        if "sample_rate" not in d and ckpt.get("sample_rate") is not None:
            d["sample_rate"] = ckpt["sample_rate"]
        return cls.from_dict(d, defaults)

    def normalize(self, samples: np.ndarray) -> np.ndarray:
        """Loudness-normalize mono samples already at ``sample_rate``."""
        return loudness_normalize(samples, self.sample_rate, self.target_rms_dbfs, self.peak_ceiling_dbfs)[0]


def active_rms_dbfs(samples: np.ndarray, sample_rate: int, frame_ms: float = 20.0, floor_db: float = 40.0) -> float:
    """RMS over the frames within ``floor_db`` of the loudest frame, so leading and trailing pauses do
    not make a quiet speaker look quieter than a talkative one (a crude speech-activity gate)."""
    samples = np.asarray(samples)
    frame = max(1, int(sample_rate * frame_ms / 1000))
    n = len(samples) // frame
    if n == 0:
        x = samples.astype(np.float64)
        rms = math.sqrt(float(np.mean(x * x))) if x.size else 0.0
        return 20.0 * math.log10(rms) if rms > 0 else float("-inf")
    frames = samples[: n * frame].reshape(n, frame).astype(np.float64)
    energy = np.mean(frames * frames, axis=1)
    peak = energy.max()
    if peak <= 0:
        return float("-inf")
    active = energy[energy >= peak * 10 ** (-floor_db / 10)]
    return float(10 * np.log10(np.mean(active)))


def normalization_gain_db(samples: np.ndarray, sample_rate: int, target_rms_dbfs: float = DEFAULT_TARGET_RMS_DBFS,
                          peak_ceiling_dbfs: float = DEFAULT_PEAK_CEILING_DBFS) -> float:
    """Gain that brings active speech to the target RMS without pushing the peak above the ceiling.

    Digital silence (no non-zero sample) gets 0 dB: there is no level to measure.
    """
    samples = np.asarray(samples)
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    level = active_rms_dbfs(samples, sample_rate)
    if peak <= 0 or not math.isfinite(level):
        return 0.0
    return min(target_rms_dbfs - level, peak_ceiling_dbfs - 20 * math.log10(peak))


def loudness_normalize(samples: np.ndarray, sample_rate: int, target_rms_dbfs: float = DEFAULT_TARGET_RMS_DBFS,
                       peak_ceiling_dbfs: float = DEFAULT_PEAK_CEILING_DBFS) -> tuple[np.ndarray, float]:
    """(float32 samples scaled by :func:`normalization_gain_db`, the gain in dB)."""
    x = np.asarray(samples, dtype=np.float32)
    gain = normalization_gain_db(x, sample_rate, target_rms_dbfs, peak_ceiling_dbfs)
    return (x.astype(np.float64) * 10 ** (gain / 20)).astype(np.float32), gain


def to_mono(samples: np.ndarray) -> np.ndarray:
    """(samples,) stays; (channels, samples) is averaged over channels."""
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim == 1:
        return x
    if x.ndim != 2:
        raise ValueError(f"expected (samples,) or (channels, samples), got shape {x.shape}")
    return x.mean(axis=0)


def resample(samples: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    """torchaudio's band-limited sinc resampler (prep uses sox's; both are transparent below 7.6 kHz)."""
    if int(sample_rate) == int(target_rate):
        return np.asarray(samples, dtype=np.float32)
    import torch
    import torchaudio

    wave = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    return torchaudio.functional.resample(wave, int(sample_rate), int(target_rate)).numpy()


def prepare_waveform(samples: np.ndarray, sample_rate: int, frontend: Frontend | None = None):
    """Any audio in (mono or (channels, samples), any rate): the model's input waveform out.

    Mono, then resampled to ``frontend.sample_rate``, then loudness-normalized: the order prep uses
    (sox remix + rate, then the gain measured on the result). Returns a float32 torch tensor.
    """
    import torch

    fe = frontend or Frontend()
    x = resample(to_mono(samples), sample_rate, fe.sample_rate)
    return torch.from_numpy(np.ascontiguousarray(fe.normalize(x)))
