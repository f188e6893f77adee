"""The data contract: one JSON Lines manifest format for every stage of the workflow.

Each line is one utterance with at least the fields in ``REQUIRED_FIELDS``. Importers produce it,
every data-prep rule reads one and writes one, and the trainer consumes the last.

Audio paths: a relative ``audio`` path is relative to the manifest's own folder, so a results tree can
be moved or shared as a whole. Readers hand out absolute paths; writers store them relative again.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

REQUIRED_FIELDS = ("id", "audio", "text", "duration", "sample_rate", "speaker", "dialect", "split")
SPLITS = ("train", "dev", "test")


class ManifestError(ValueError):
    """A manifest line that breaks the data contract; the message names file and line."""


@dataclass
class Utterance:
    id: str
    audio: str
    text: str
    duration: float
    sample_rate: int
    speaker: str
    dialect: str
    split: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        extra = record.pop("extra")
        record.update(extra)
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any], where: str = "") -> "Utterance":
        missing = [k for k in REQUIRED_FIELDS if k not in record]
        if missing:
            raise ManifestError(f"{where}missing field(s) {', '.join(missing)}")
        try:
            duration = float(record["duration"])
            sample_rate = int(record["sample_rate"])
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"{where}duration/sample_rate not numeric: {exc}") from exc
        if not (duration >= 0.0):
            raise ManifestError(f"{where}negative or NaN duration {record['duration']!r}")
        if sample_rate <= 0:
            raise ManifestError(f"{where}non-positive sample_rate {sample_rate}")
        if not str(record["id"]).strip():
            raise ManifestError(f"{where}empty id")
        extra = {k: v for k, v in record.items() if k not in REQUIRED_FIELDS}
        return cls(
            id=str(record["id"]),
            audio=str(record["audio"]),
            text=str(record["text"]),
            duration=duration,
            sample_rate=sample_rate,
            speaker=str(record["speaker"]),
            dialect=str(record["dialect"]),
            split=str(record["split"]),
            extra=extra,
        )


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(line number, "path:line: " for messages, record) of every non-empty line of a JSON Lines file;
    ManifestError names the line of one that is not a JSON object."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}: "
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{where}not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise ManifestError(f"{where}expected a JSON object, got {type(record).__name__}")
            yield lineno, where, record


def iter_manifest(path: str | os.PathLike, resolve_audio: bool = True) -> Iterator[Utterance]:
    """Yield utterances; raise ManifestError naming the file and line of the first bad one."""
    base = Path(path).resolve().parent
    for _, where, record in iter_json_lines(path):
        utt = Utterance.from_dict(record, where)
        if resolve_audio and not os.path.isabs(utt.audio):
            utt.audio = str(base / utt.audio)
        yield utt


def read_manifest(path: str | os.PathLike, resolve_audio: bool = True) -> list[Utterance]:
    utts = list(iter_manifest(path, resolve_audio))
    seen: set[str] = set()
    for u in utts:
        if u.id in seen:
            raise ManifestError(f"{path}: duplicate utterance id {u.id!r}")
        seen.add(u.id)
    return utts


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write then rename, so a killed job never leaves a half-written output that Snakemake trusts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; outputs should be as readable as any file
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_manifest(path: str | os.PathLike, utts: Iterable[Utterance | dict[str, Any]],
                   relative_audio: bool = True) -> int:
    """Write atomically; absolute audio paths are stored relative to the manifest's folder."""
    base = Path(path).resolve().parent
    lines = []
    for u in utts:
        record = u.to_dict() if isinstance(u, Utterance) else dict(u)
        audio = record.get("audio")
        if relative_audio and isinstance(audio, str) and os.path.isabs(audio):
            record["audio"] = os.path.relpath(audio, base)
        lines.append(json.dumps(record, ensure_ascii=False, sort_keys=True))
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Plain JSON Lines records (reports, quarantine lists) without the utterance contract."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
