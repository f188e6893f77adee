"""The max-duration cap, without ever separating audio from its words.

An utterance over the cap is split only at boundaries that are known to be right: sentence segments
recorded with the audio (``extra["segments"]`` as ``[start_s, end_s, text]`` triples, as the embedded
corpus generator and forced-aligned corpora provide). Without them it is dropped. Every utterance gets an
``action`` (kept / split / dropped) in the report.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asrflow.audio import read_audio, write_audio
from asrflow.manifest import Utterance
from asrflow.text import normalize_text


@dataclass(frozen=True)
class TruncateSettings:
    max_duration: float = 15.0
    splits: tuple[str, ...] = ("train", "dev", "test")
    split_on_segments: bool = True


def pack_segments(segments: list[tuple[float, float, str]], max_duration: float) -> list[list[tuple[float, float, str]]] | None:
    """Greedily group consecutive segments into pieces no longer than the cap.

    A piece runs from its first segment's start to its last segment's end, so the pause between two
    sentences of one piece stays in it and the pause between pieces is cut. Returns None when a single
    segment alone exceeds the cap (no correct split exists).
    """
    pieces: list[list[tuple[float, float, str]]] = []
    current: list[tuple[float, float, str]] = []
    for seg in segments:
        start, end, _ = seg
        if end - start > max_duration:
            return None
        if current and end - current[0][0] > max_duration:
            pieces.append(current)
            current = []
        current.append(seg)
    if current:
        pieces.append(current)
    return pieces


def valid_segments(utt: Utterance) -> list[tuple[float, float, str]] | None:
    """Segments that tile the transcript in order, or None if absent or inconsistent with the text."""
    raw = utt.extra.get("segments")
    if not raw:
        return None
    try:
        segs = [(float(s), float(e), normalize_text(str(t))) for s, e, t in raw]
    except (TypeError, ValueError):
        return None
    ordered = all(0 <= s < e for s, e, _ in segs) and all(a[1] <= b[0] + 1e-6 for a, b in zip(segs, segs[1:]))
    covers_text = " ".join(t for _, _, t in segs) == normalize_text(utt.text)
    inside = segs[-1][1] <= utt.duration + 0.05
    return segs if ordered and covers_text and inside else None


def split_utterance(utt: Utterance, pieces: list[list[tuple[float, float, str]]], out_dir: Path) -> list[Utterance]:
    samples, sr = read_audio(utt.audio)
    out = []
    for i, piece in enumerate(pieces):
        start, end = piece[0][0], piece[-1][1]
        a, b = int(round(start * sr)), min(len(samples), int(round(end * sr)))
        path = out_dir / f"{utt.id}__part{i}.wav"
        write_audio(path, samples[a:b], sr)
        extra = {k: v for k, v in utt.extra.items() if k != "segments"}
        extra.update({"parent_id": utt.id, "offset": round(start, 4)})
        out.append(Utterance(id=f"{utt.id}__part{i}", audio=str(path.resolve()),
                             text=" ".join(t for _, _, t in piece), duration=round((b - a) / sr, 4),
                             sample_rate=sr, speaker=utt.speaker, dialect=utt.dialect, split=utt.split, extra=extra))
    return out


def truncate(utts: list[Utterance], settings: TruncateSettings, out_dir: Path) -> tuple[list[Utterance], list[dict]]:
    """Apply the cap; return the resulting utterances and one report row per input utterance."""
    kept: list[Utterance] = []
    report: list[dict] = []
    for utt in utts:
        row = {"id": utt.id, "split": utt.split, "dialect": utt.dialect, "duration": utt.duration}
        if utt.split not in settings.splits or utt.duration <= settings.max_duration:
            kept.append(utt)
            report.append({**row, "action": "kept"})
            continue
        segs = valid_segments(utt) if settings.split_on_segments else None
        pieces = pack_segments(segs, settings.max_duration) if segs else None
        if pieces is None:
            reason = ("no sentence segments to split at" if segs is None
                      else "a single sentence is longer than the cap")
            report.append({**row, "action": "dropped", "reason": f"{utt.duration:.2f} s > {settings.max_duration} s and {reason}"})
            continue
        parts = split_utterance(utt, pieces, out_dir)
        kept.extend(parts)
        report.append({**row, "action": "split", "parts": [p.id for p in parts],
                       "audio_kept_s": round(sum(p.duration for p in parts), 3)})
    return kept, report


def summarize(report: list[dict]) -> dict:
    actions = [r["action"] for r in report]
    durations = np.array([r["duration"] for r in report]) if report else np.zeros(0)
    return {
        "utterances_in": len(report),
        "kept": actions.count("kept"),
        "split": actions.count("split"),
        "dropped": actions.count("dropped"),
        "pieces_from_splits": sum(len(r.get("parts", [])) for r in report),
        "dropped_hours": float(sum(r["duration"] for r in report if r["action"] == "dropped") / 3600),
        "max_input_duration": float(durations.max()) if durations.size else 0.0,
    }
