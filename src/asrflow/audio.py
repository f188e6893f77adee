"""Audio I/O through soundfile (torchaudio.load needs torchcodec) and the sox command line."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf


# The one sample rate of training, features and inference: prep resamples every corpus to it, and the
# schema accepts no other `prep.sample_rate` (the log-mel filterbank and the noise are defined at it).
SAMPLE_RATE = 16000
# The log-mel hop. The batch plan counts frames at this rate, so it must be derived, not mirrored.
FEATURE_HOP_MS = 10.0
FRAMES_PER_SECOND = int(round(1000.0 / FEATURE_HOP_MS))


class AudioError(RuntimeError):
    """Audio that cannot be read or processed; the message says which file and why."""


def read_audio(path: str | os.PathLike, mono: bool = True) -> tuple[np.ndarray, int]:
    """Return float32 samples in [-1, 1] and the sample rate; mono averages channels.

    Shape is (samples,) when ``mono`` else (channels, samples).
    """
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types for corrupt headers
        raise AudioError(f"{path}: unreadable audio ({exc})") from exc
    data = data.T  # (channels, samples)
    if mono:
        return data.mean(axis=0), int(sr)
    return data, int(sr)


def write_audio(path: str | os.PathLike, samples: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> None:
    """Write a wav atomically (temp file then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.wav")
    data = np.asarray(samples, dtype=np.float32)
    if data.ndim == 2:
        data = data.T
    sf.write(str(tmp), data, int(sample_rate), subtype=subtype)
    os.replace(tmp, path)


def audio_info(path: str | os.PathLike) -> dict:
    try:
        info = sf.info(str(path))
    except Exception as exc:
        raise AudioError(f"{path}: unreadable audio header ({exc})") from exc
    return {"sample_rate": int(info.samplerate), "channels": int(info.channels),
            "frames": int(info.frames), "duration": float(info.frames) / float(info.samplerate)}


def sox_binary() -> str:
    exe = shutil.which("sox")
    if exe is None:
        raise AudioError("the sox command line tool is not installed (apt-get install sox libsox-fmt-all)")
    return exe


def run_sox(args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run sox with ``args``; raise AudioError carrying sox's own message on failure."""
    cmd = [sox_binary(), "-V1", *map(str, args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AudioError(f"sox timed out after {timeout}s: {' '.join(cmd)}") from exc
    if proc.returncode != 0:
        raise AudioError(f"sox failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def rms_dbfs(samples: np.ndarray) -> float:
    x = np.asarray(samples, dtype=np.float64)
    rms = np.sqrt(np.mean(x * x)) if x.size else 0.0
    return float(20.0 * np.log10(rms)) if rms > 0 else float("-inf")
