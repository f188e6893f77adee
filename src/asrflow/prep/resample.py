"""Resampling to 16 kHz mono 16-bit with loudness normalization, with quarantine of bad input.

Each utterance is checked before and after sox; anything unusable goes to a quarantine list with a
reason (and a copy of the offending file) instead of crashing the shard or vanishing silently.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asrflow import loudness
from asrflow.audio import SAMPLE_RATE, AudioError, audio_info, read_audio, run_sox
from asrflow.loudness import active_rms_dbfs  # noqa: F401  (re-exported: tests and reports use it from here)
from asrflow.manifest import Utterance
from asrflow.text import is_clean, normalize_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResampleSettings:
    sample_rate: int = SAMPLE_RATE
    target_rms_dbfs: float = loudness.DEFAULT_TARGET_RMS_DBFS
    peak_ceiling_dbfs: float = loudness.DEFAULT_PEAK_CEILING_DBFS
    silence_dbfs: float = -60.0  # peak level below which a recording is silent
    min_dynamic_range_db: float = 6.0  # loudest frames above the file's own noise floor, at least
    clip_fraction: float = 0.01
    min_duration: float = 0.2


def shard_of(utt_id: str, num_shards: int) -> int:
    """Stable shard assignment by id hash: adding utterances never moves the others."""
    digest = hashlib.md5(utt_id.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % num_shards


def resolve_audio_path(audio: str, manifest_dir: Path) -> Path:
    path = Path(audio)
    return path if path.is_absolute() else manifest_dir / path


# Silence is judged on 20-ms frames: the noise floor is the 5th percentile of their levels (a pause
# of 5% of the file shows it), the signal the 95th (robust to a click or two).
SILENCE_FRAME_MS = 20.0
FLOOR_PERCENTILE = 5.0
SIGNAL_PERCENTILE = 95.0
MIN_FRAMES_FOR_FLOOR = 10  # shorter files (< 0.2 s) are judged by their peak alone


def frame_levels_dbfs(samples: np.ndarray, sample_rate: int, frame_ms: float = SILENCE_FRAME_MS) -> np.ndarray:
    """Mean-square level (dBFS) of each whole frame; all-zero frames get -200 dBFS instead of -inf."""
    frame = max(1, int(sample_rate * frame_ms / 1000))
    n = len(samples) // frame
    if n == 0:
        return np.zeros(0)
    frames = np.asarray(samples[: n * frame], dtype=np.float64).reshape(n, frame)
    return 10.0 * np.log10(np.maximum(np.mean(frames * frames, axis=1), 1e-20))


def inspect_source(samples: np.ndarray, settings: ResampleSettings, sample_rate: int | None = None) -> str | None:
    """Return why the decoded source audio is unusable, or None if it is fine (``sample_rate``: the
    samples' own rate, default ``settings.sample_rate``).

    Silence is not judged by absolute RMS: a quiet but clean recording (speech at -61 dBFS RMS with a
    floor far below it) is what loudness normalization is for. A recording is silent when it has no
    non-zero sample (digital silence) or its peak is below ``silence_dbfs``; it is noise only when its
    loudest frames rise less than ``min_dynamic_range_db`` above its own noise floor, whatever its
    level (steady hiss, hum, room tone: speech always rises above the floor it was recorded over).
    Noise whose level itself swings (passing traffic, babble) can rise as far as speech in noise does,
    and is not caught by level alone.
    """
    if samples.size == 0:
        return "empty audio (no samples)"
    if not np.all(np.isfinite(samples)):
        return "non-finite samples (NaN or Inf)"
    peak = float(np.max(np.abs(samples)))
    if peak == 0.0:
        return "silent (digital silence: every sample is zero)"
    peak_dbfs = 20.0 * float(np.log10(peak))
    if peak_dbfs < settings.silence_dbfs:
        return f"silent (peak {peak_dbfs:.1f} dBFS < {settings.silence_dbfs} dBFS)"
    levels = frame_levels_dbfs(samples, sample_rate or settings.sample_rate)
    if levels.size >= MIN_FRAMES_FOR_FLOOR:
        floor = float(np.percentile(levels, FLOOR_PERCENTILE))
        rise = float(np.percentile(levels, SIGNAL_PERCENTILE)) - floor
        if rise < settings.min_dynamic_range_db:
            return (f"noise only (its loudest frames rise {rise:.1f} dB above its own noise floor of {floor:.1f} dBFS, "
                    f"< {settings.min_dynamic_range_db} dB; speech rises above the floor it was recorded over)")
    clipped = float(np.mean(np.abs(samples) >= 0.999))
    if clipped > settings.clip_fraction:
        return f"clipped ({clipped:.1%} of samples at full scale > {settings.clip_fraction:.1%})"
    return None


def normalization_gain_db(samples: np.ndarray, sample_rate: int, settings: ResampleSettings) -> float:
    """Gain that brings active speech to the target RMS without pushing the peak above the ceiling
    (:func:`asrflow.loudness.normalization_gain_db`, the one definition inference applies too)."""
    return loudness.normalization_gain_db(samples, sample_rate, settings.target_rms_dbfs, settings.peak_ceiling_dbfs)


def resample_one(src: Path, dst: Path, settings: ResampleSettings, workdir: Path) -> dict:
    """sox to mono float at the target rate, measure, then sox again to apply the gain and dither to 16 bit.

    The output equals ``asrflow.loudness.loudness_normalize`` of the first sox pass up to the 16-bit
    dither (tests/test_loudness.py checks it), so inference can apply the same normalization.
    """
    info = audio_info(src)
    samples, _ = read_audio(src)
    problem = inspect_source(samples, settings, info["sample_rate"])
    if problem:
        raise AudioError(problem)
    tmp = workdir / (dst.stem + ".float.wav")
    run_sox([src, "-e", "floating-point", "-b", "32", tmp, "remix", "-", "rate", "-v", str(settings.sample_rate)])
    mono, sr = read_audio(tmp)
    gain = normalization_gain_db(mono, sr, settings)
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(f".{dst.name}.part.wav")
    # -R: no random dither seed from the clock, so reruns are byte-identical.
    run_sox(["-R", tmp, "-b", "16", "-e", "signed-integer", part, "gain", f"{gain:.3f}"])
    os.replace(part, dst)
    tmp.unlink(missing_ok=True)
    out_info = audio_info(dst)
    if out_info["frames"] == 0:
        raise AudioError("resampled output is empty")
    return {
        "duration": out_info["duration"],
        "source_sample_rate": info["sample_rate"],
        "source_channels": info["channels"],
        "gain_db": round(gain, 3),
    }


def reason_kind(reason: str) -> str:
    """A short category for the report's tally (the full reason stays in the record)."""
    for key, kind in (("bad transcript", "bad_transcript"), ("unreadable", "unreadable"), ("empty", "empty"),
                      ("non-finite", "non_finite"), ("silent", "silent"), ("noise only", "noise_only"), ("clipped", "clipped"),
                      ("too short", "too_short"), ("sox", "sox_failed")):
        if key in reason:
            return kind
    return "other"


def quarantine(utt: Utterance, reason: str, src: Path, quarantine_dir: Path) -> dict:
    """Record why an utterance was set aside and keep a copy of its source for inspection."""
    copy = None
    if src.is_file():
        quarantine_dir.mkdir(parents=True, exist_ok=True)
        copy = quarantine_dir / f"{utt.id}{src.suffix}"
        shutil.copyfile(src, copy)
    log.warning("quarantined %s: %s", utt.id, reason)
    return {"id": utt.id, "audio": str(src), "reason": reason, "kind": reason_kind(reason), "copy": str(copy) if copy else None,
            "split": utt.split, "dialect": utt.dialect, "speaker": utt.speaker, "text": utt.text}


def resample_shard(utts: list[Utterance], manifest_dir: Path, out_wav_dir: Path, quarantine_dir: Path,
                   settings: ResampleSettings) -> tuple[list[Utterance], list[dict]]:
    """Resample every utterance of one shard; return (kept, quarantined)."""
    kept: list[Utterance] = []
    bad: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="asrflow-resample-") as tmpdir:
        for utt in utts:
            src = resolve_audio_path(utt.audio, manifest_dir)
            text = normalize_text(utt.text)
            if not is_clean(text):
                bad.append(quarantine(utt, f"bad transcript: {utt.text!r} normalizes to nothing usable", src, quarantine_dir))
                continue
            dst = out_wav_dir / f"{utt.id}.wav"
            try:
                facts = resample_one(src, dst, settings, Path(tmpdir))
            except (AudioError, OSError) as exc:
                bad.append(quarantine(utt, str(exc), src, quarantine_dir))
                continue
            if facts["duration"] < settings.min_duration:
                dst.unlink(missing_ok=True)
                bad.append(quarantine(utt, f"too short ({facts['duration']:.3f} s < {settings.min_duration} s)", src, quarantine_dir))
                continue
            extra = dict(utt.extra)
            extra.update({k: v for k, v in facts.items() if k != "duration"})
            kept.append(Utterance(id=utt.id, audio=str(dst.resolve()), text=text, duration=round(facts["duration"], 4),
                                  sample_rate=settings.sample_rate, speaker=utt.speaker, dialect=utt.dialect,
                                  split=utt.split, extra=extra))
    return kept, bad


def run_resample_shard(manifest: Path, shard: int, num_shards: int, out_manifest: Path, out_quarantine: Path,
                       wav_dir: Path, settings: ResampleSettings) -> dict:
    """The resample_shard rule: this shard's utterances in, resampled manifest and quarantine list out."""
    from asrflow.manifest import read_manifest, write_manifest

    utts = [u for u in read_manifest(manifest) if shard_of(u.id, num_shards) == shard]
    wav_dir.mkdir(parents=True, exist_ok=True)
    kept, bad = resample_shard(utts, Path(manifest).parent, wav_dir, wav_dir.parent / "quarantined_files", settings)
    write_manifest(out_manifest, kept)
    write_manifest(out_quarantine, bad, relative_audio=False)
    return {"utterances_in": len(utts), "utterances_out": len(kept), "quarantined": len(bad),
            "hours_out": sum(u.duration for u in kept) / 3600.0}
