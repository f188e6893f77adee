"""Importers: corpora in their native layouts -> manifest ``Utterance``s plus a list of rejects.

Every importer returns an ``ImportResult``. Nothing is dropped silently: an utterance whose audio is
missing, unreadable or empty, whose transcript cannot be normalized without guessing, or whose
metadata is incomplete becomes a ``Reject`` carrying a short ``kind`` and a readable ``reason``, so
the caller can write a report (``write_import_report``) and a reviewer can see what was lost and why.
Problems with the layout itself (a missing ``text`` file, an unknown corpus kind) raise instead.

Audio paths in the returned utterances are absolute; ``write_manifest`` decides how to store them.
Duration and sample rate always come from the audio header (``audio_info``), never from metadata, so a
user's manifest needs only ``id``, ``audio`` and ``text``.
"""
from __future__ import annotations

import csv
import os
import re
import shlex
import shutil
import subprocess
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from asrflow.audio import AudioError, audio_info
from asrflow.manifest import SPLITS, ManifestError, Utterance, iter_json_lines, write_json
from asrflow.text import is_clean, normalize_text

UNKNOWN_DIALECT = "unknown"

# Symbols a speaker would read aloud ("and", "percent", ...). normalize_text would turn them into a
# space, leaving a transcript that disagrees with the audio, so such lines are rejected instead.
_SPOKEN_SYMBOLS = frozenset("&%$@#+=€£¥§°")
_MARKUP = re.compile(r"<[^<>\s]*>|\[[^\[\]]*\]|\{[^{}]*\}")


class UnsupportedLayoutError(ValueError):
    """A corpus folder uses a feature this importer does not support (e.g. Kaldi ``segments``)."""


@dataclass
class Reject:
    """One item that did not make it into the manifest.

    ``kind`` is a stable short code for counting (missing_audio, unreadable_audio, bad_transcript,
    no_transcript, no_audio_entry, no_speaker, unsupported_audio, no_split, duplicate, malformed);
    ``reason`` is the human-readable detail; ``source`` is the file (and line) it came from.
    """

    id: str
    source: str
    kind: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class ImportResult:
    utterances: list[Utterance] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)

    def add(self, item: Utterance | Reject) -> None:
        (self.rejects if isinstance(item, Reject) else self.utterances).append(item)

    def extend(self, other: "ImportResult") -> None:
        self.utterances.extend(other.utterances)
        self.rejects.extend(other.rejects)

    def summary(self) -> dict[str, Any]:
        per_split = Counter(u.split for u in self.utterances)
        hours = Counter()
        for u in self.utterances:
            hours[u.split] += u.duration / 3600.0
        return {
            "imported": len(self.utterances),
            "rejected": len(self.rejects),
            "utterances_per_split": dict(sorted(per_split.items())),
            "hours_per_split": {k: round(v, 4) for k, v in sorted(hours.items())},
            "rejects_per_kind": dict(sorted(Counter(r.kind for r in self.rejects).items())),
        }


def write_import_report(path: str | os.PathLike, result: ImportResult, **context: Any) -> None:
    """JSON report: counts, hours per split, rejects per kind and every reject; ``context`` is added
    verbatim (e.g. corpus kind and root) so the report can be read on its own."""
    report = dict(context)
    report.update(result.summary())
    report["rejects"] = [r.to_dict() for r in result.rejects]
    write_json(path, report)


# --------------------------------------------------------------------------------------------------
# Shared pieces: dialect slugs, transcript normalization, audio probing
# --------------------------------------------------------------------------------------------------

def dialect_slug(value: str | None) -> str:
    """Lower-case ASCII slug (``"United States English"`` -> ``"united-states-english"``); empty -> unknown."""
    text = unicodedata.normalize("NFKD", value or "")
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    slug = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    return slug or UNKNOWN_DIALECT


def normalize_transcript(raw: str) -> tuple[str | None, str | None]:
    """Return ``(text, None)`` or ``(None, reason)``.

    On top of ``normalize_text`` this refuses lines whose normalization would lose or invent words:
    letters outside A-Z after accent stripping (another script, ``ß``), symbols read aloud (``&``,
    ``%``) and Kaldi-style tags (``[noise]``, ``<unk>``, ``{breath}``), which ``normalize_text``
    would turn into the words NOISE, UNK, BREATH.
    """
    markup = _MARKUP.findall(raw)
    if markup:
        return None, f"markup token(s) {' '.join(markup[:5])} (noise/unknown-word tags are not speech text)"
    decomposed = "".join(c for c in unicodedata.normalize("NFKD", raw) if not unicodedata.combining(c))
    foreign = sorted({c for c in decomposed if c.isalpha() and not c.isascii()})
    if foreign:
        return None, f"letters outside A-Z ({''.join(foreign[:12])}) would be dropped"
    symbols = sorted({c for c in raw if c in _SPOKEN_SYMBOLS})
    if symbols:
        return None, f"spoken symbol(s) {''.join(symbols)} would have to be guessed"
    text = normalize_text(raw)
    if not is_clean(text):
        return None, "transcript is empty after normalization"
    return text, None


def _soxi_info(path: Path) -> tuple[float, int]:
    """Duration and rate from sox's own header reader, for formats this libsndfile cannot open."""
    exe = shutil.which("soxi")
    if exe is None:
        raise AudioError(f"{path}: soxi not installed")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    rate = re.search(r"Sample Rate\s*:\s*(\d+)", proc.stdout)
    samples = re.search(r"=\s*(\d+)\s+samples", proc.stdout)
    if proc.returncode != 0 or not rate or not samples:
        raise AudioError(f"{path}: soxi cannot read it ({proc.stderr.strip() or 'no header'})")
    return int(samples.group(1)) / int(rate.group(1)), int(rate.group(1))


def probe_audio(path: str | os.PathLike) -> tuple[float, int, dict[str, Any]]:
    """Return (duration_s, sample_rate, extra fields) from the header; raise AudioError if unusable.

    soundfile (what ``read_audio`` uses) is tried first so the duration matches what training will
    decode. Only if it cannot open the file is ``soxi`` asked; such utterances get
    ``extra["decoder"] = "sox"`` because ``read_audio`` will not read them either and they must be
    converted with sox first. Zero-length audio is refused: it can carry no transcript.
    """
    path = Path(path)
    try:
        info = audio_info(path)
        duration, rate, extra = info["duration"], info["sample_rate"], {}
    except AudioError as sf_error:
        try:
            duration, rate = _soxi_info(path)
        except (AudioError, OSError, subprocess.SubprocessError) as sox_error:
            raise AudioError(f"{sf_error}; {sox_error}") from sox_error
        extra = {"decoder": "sox"}
    if duration <= 0.0:
        raise AudioError(f"{path}: empty audio (0 samples)")
    return duration, rate, extra


def build_utterance(uid: str, audio: Path, raw_text: str, speaker: str, dialect: str, split: str,
                    source: str, extra: Mapping[str, Any] | None = None) -> Utterance | Reject:
    """Check audio exists, normalize the transcript, read the header; the first failure is the reject."""
    if not audio.is_file():
        return Reject(uid, source, "missing_audio", f"{audio} does not exist")
    text, why = normalize_transcript(raw_text)
    if why:
        return Reject(uid, source, "bad_transcript", f"{why}: {raw_text!r}")
    try:
        duration, rate, probe_extra = probe_audio(audio)
    except AudioError as exc:
        return Reject(uid, source, "unreadable_audio", str(exc))
    return Utterance(id=uid, audio=str(audio.resolve()), text=text, duration=duration, sample_rate=rate,
                     speaker=speaker, dialect=dialect, split=split, extra={**(extra or {}), **probe_extra})


def _check_split(split: str, what: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"{what}: split {split!r} is not one of {', '.join(SPLITS)}")
    return split


def _require_dir(root: str | os.PathLike, what: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{what} folder {root} does not exist")
    return root


# --------------------------------------------------------------------------------------------------
# LibriSpeech: <root>/<subset>/<spk>/<chapter>/<spk>-<chapter>.trans.txt + <spk>-<chapter>-<utt>.flac
# --------------------------------------------------------------------------------------------------

def librispeech_split(subset: str) -> str | None:
    """train-clean-100 -> train, dev-other -> dev, test-clean -> test; anything else -> None."""
    prefix = subset.split("-", 1)[0]
    return prefix if prefix in SPLITS else None


def _has_chapters(folder: Path) -> bool:
    return next(folder.glob("*/*/*.trans.txt"), None) is not None


def _librispeech_subsets(root: Path, split_map: Mapping[str, str] | None,
                         result: ImportResult) -> list[tuple[Path, str]]:
    if split_map is not None:
        subsets = []
        for name, split in split_map.items():
            folder = root / name
            if not folder.is_dir():
                raise FileNotFoundError(f"LibriSpeech subset {folder} (from split_map) does not exist")
            subsets.append((folder, _check_split(split, f"split_map[{name!r}]")))
        return subsets
    if _has_chapters(root):  # root is itself one subset folder
        split = librispeech_split(root.name)
        if split is None:
            raise ValueError(f"{root}: cannot tell the split from the folder name; pass split_map={{...}}")
        return [(root, split)]
    subsets = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and _has_chapters(p)):
        split = librispeech_split(folder.name)
        if split is None:
            result.add(Reject(folder.name, str(folder), "no_split",
                              "subset name does not start with train-/dev-/test-; map it with split_map"))
        else:
            subsets.append((folder, split))
    return subsets


def _read_librispeech_chapter(trans: Path, split: str, dialect: str, subset: str) -> Iterable[Utterance | Reject]:
    chapter_dir = trans.parent
    speaker, chapter = chapter_dir.parent.name, chapter_dir.name
    seen: set[str] = set()
    for lineno, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        source = f"{trans}:{lineno}"
        uid, _, raw = line.strip().partition(" ")
        if not raw.strip():
            yield Reject(uid, source, "malformed", "transcript line has an id but no text")
            continue
        seen.add(uid)
        yield build_utterance(uid, chapter_dir / f"{uid}.flac", raw, speaker, dialect, split, source,
                              {"corpus": "librispeech", "subset": subset, "chapter": chapter})
    for orphan in sorted(chapter_dir.glob("*.flac")):
        if orphan.stem not in seen:
            yield Reject(orphan.stem, str(orphan), "no_transcript", f"not listed in {trans.name}")


def import_librispeech(root: str | os.PathLike, split_map: Mapping[str, str] | None = None,
                       dialect: str = "en-us") -> ImportResult:
    """Import LibriSpeech subsets under ``root`` (or ``root`` itself if it is one subset).

    The split comes from the subset name (train-*, dev-*, test-*) unless ``split_map``
    ({subset folder: split}) is given, which then also selects which subsets are imported.
    Speaker is the speaker folder; subset and chapter go to ``extra``.
    """
    root = _require_dir(root, "LibriSpeech")
    result = ImportResult()
    subsets = _librispeech_subsets(root, split_map, result)
    if not subsets and not result.rejects:
        raise FileNotFoundError(f"{root}: no LibriSpeech transcripts found; expected "
                                "<root>/<subset>/<spk>/<chapter>/<spk>-<chapter>.trans.txt")
    for folder, split in subsets:
        for trans in sorted(folder.glob("*/*/*.trans.txt")):
            for item in _read_librispeech_chapter(trans, split, dialect, folder.name):
                result.add(item)
    return result


# --------------------------------------------------------------------------------------------------
# Common Voice: <root>/{train,dev,test,validated,...}.tsv + <root>/clips/*.mp3
# --------------------------------------------------------------------------------------------------

CV_DEFAULT_SPLITS = {"train.tsv": "train", "dev.tsv": "dev", "test.tsv": "test"}
_CV_REQUIRED_COLUMNS = ("client_id", "path", "sentence")
_CV_EXTRA_COLUMNS = ("age", "gender", "locale", "variant")


def _cv_split_map(root: Path, split_map: Mapping[str, str] | None) -> dict[Path, str]:
    """{tsv path: split}. By default train/dev/test.tsv; ``validated.tsv`` overlaps them, so it is
    only read when asked for (e.g. ``split_map={"validated": "train"}``)."""
    if split_map is None:
        chosen = {root / name: split for name, split in CV_DEFAULT_SPLITS.items() if (root / name).is_file()}
        if not chosen:
            raise FileNotFoundError(f"{root}: none of {', '.join(CV_DEFAULT_SPLITS)} found; pass split_map")
        return chosen
    chosen = {}
    for name, split in split_map.items():
        tsv = root / (name if name.endswith(".tsv") else f"{name}.tsv")
        if not tsv.is_file():
            raise FileNotFoundError(f"Common Voice table {tsv} (from split_map) does not exist")
        chosen[tsv] = _check_split(split, f"split_map[{name!r}]")
    return chosen


def _cv_row(row: Mapping[str, str | None], accent_column: str | None, split: str, clips: Path,
            source: str) -> Utterance | Reject:
    clip = (row.get("path") or "").strip()
    sentence = row.get("sentence")
    if not clip or sentence is None or None in row:
        return Reject(clip or "?", source, "malformed", "row has a different number of fields than the header")
    accent = (row.get(accent_column) or "").strip() if accent_column else ""
    extra = {"corpus": "common_voice", "clip": clip, "accent": accent}
    extra.update({k: row[k] for k in _CV_EXTRA_COLUMNS if row.get(k)})
    speaker = (row.get("client_id") or "").strip()
    if not speaker:
        return Reject(Path(clip).stem, source, "no_speaker", "empty client_id")
    return build_utterance(Path(clip).stem, clips / clip, sentence, speaker, dialect_slug(accent), split,
                           source, extra)


def import_common_voice(root: str | os.PathLike, split_map: Mapping[str, str] | None = None,
                        clips_dir: str = "clips") -> ImportResult:
    """Import a Common Voice language folder.

    ``split_map`` maps TSV names (``"train"`` or ``"train.tsv"``) to splits; default train/dev/test.
    Speaker is ``client_id``; dialect is a slug of ``accents`` (newer releases) or ``accent``
    (older), "unknown" when empty; the raw accent text, age and gender go to ``extra``. The id is the
    clip name without extension. A clip listed in two tables is imported once, then rejected as a
    duplicate. MP3 clips are read by libsndfile >= 1.1 (soundfile wheels ship it), else via soxi.
    """
    root = _require_dir(root, "Common Voice")
    result = ImportResult()
    first_seen: dict[str, str] = {}
    for tsv, split in _cv_split_map(root, split_map).items():
        _import_cv_table(tsv, split, root / clips_dir, first_seen, result)
    return result


def _import_cv_table(tsv: Path, split: str, clips: Path, first_seen: dict[str, str], result: ImportResult) -> None:
    """Stream one TSV (the English train.tsv has ~1M rows) into ``result``."""
    # Sentences contain quote characters, so quoting must be off or csv would merge lines.
    with open(tsv, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        columns = list(reader.fieldnames or [])
        missing = [c for c in _CV_REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"{tsv}: missing column(s) {', '.join(missing)}; is this a Common Voice table?")
        accent_column = next((c for c in ("accents", "accent") if c in columns), None)
        for lineno, row in enumerate(reader, 2):
            source = f"{tsv}:{lineno}"
            clip = (row.get("path") or "").strip()
            if clip in first_seen:
                result.add(Reject(Path(clip).stem, source, "duplicate", f"already imported from {first_seen[clip]}"))
                continue
            item = _cv_row(row, accent_column, split, clips, source)
            if isinstance(item, Utterance):
                first_seen[clip] = source
            result.add(item)


# --------------------------------------------------------------------------------------------------
# Kaldi data dir: wav.scp, text, utt2spk, optional utt2dialect; segments not supported
# --------------------------------------------------------------------------------------------------

# Format-only options that may sit between the input file and "-t wav -" in a sox pipe.
_SOX_FORMAT_OPTIONS = {"-r", "--rate", "-b", "--bits", "-e", "--encoding", "-c", "--channels", "-t", "--type"}


def read_kaldi_table(path: Path) -> tuple[dict[str, str], dict[str, int]]:
    """Read ``<key> <value...>`` lines; return ({key: value}, {duplicated key: line number})."""
    table: dict[str, str] = {}
    duplicates: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        if key in table:
            duplicates[key] = lineno
            continue
        table[key] = value.strip()
    return table, duplicates


def _sox_pipe_input(command: str) -> str | None:
    """The input file of ``sox <file> [format options] -t wav - |``, else None.

    Only pure format conversion is accepted: effects after the output ``-`` (remix, rate, trim...)
    would change the audio, and training reads the file itself, so such lines are rejected.
    """
    try:
        tokens = shlex.split(command)
    except ValueError:
        return None
    if len(tokens) < 5 or os.path.basename(tokens[0]) != "sox" or tokens[1].startswith("-"):
        return None
    if tokens[-3:] != ["-t", "wav", "-"]:
        return None
    middle = tokens[2:-3]
    if len(middle) % 2 or any(flag not in _SOX_FORMAT_OPTIONS for flag in middle[0::2]):
        return None
    return tokens[1]


def kaldi_audio_path(rxfilename: str, audio_root: Path) -> tuple[Path | None, str | None]:
    """Resolve a wav.scp entry to a file: ``(path, None)`` or ``(None, reason)``.

    Supported: a plain path (relative ones resolved against ``audio_root``: Kaldi scripts run
    from the recipe folder) and ``sox <file> [format options] -t wav - |``. Other pipes
    (``sph2pipe``, ``ffmpeg``, sox with effects) and ark offsets are rejected with the reason:
    convert those recordings to files first (e.g. run the pipe once per line into a wav).
    """
    value = rxfilename.strip()
    if value.endswith("|"):
        source = _sox_pipe_input(value[:-1])
        if source is None:
            return None, (f"piped command not supported: {value!r}; only 'sox <file> [-r/-b/-e/-c ...] -t wav - |' "
                          "is; write the audio to files first")
        value = source
    elif re.search(r"\.ark:\d+$", value) or value.startswith(("ark:", "scp:")):
        return None, f"archive entry not supported: {value!r}; extract the audio to files first"
    path = Path(value)
    return (path if path.is_absolute() else audio_root / path), None


def import_kaldi(data_dir: str | os.PathLike, split: str, dialect: str = UNKNOWN_DIALECT,
                 audio_root: str | os.PathLike | None = None) -> ImportResult:
    """Import a Kaldi data folder as one split.

    Requires ``wav.scp``, ``text`` and ``utt2spk``; ``utt2dialect`` (optional) overrides ``dialect``
    per utterance. A ``segments`` file raises UnsupportedLayoutError: the manifest has no
    start/end fields, so segmented recordings must be cut first (Kaldi ``extract-segments``).
    Relative paths in wav.scp are resolved against ``audio_root`` (default: the current folder,
    as in Kaldi). An id present in only one of wav.scp/text, or without a speaker, is rejected.
    """
    data_dir = _require_dir(data_dir, "Kaldi data")
    _check_split(split, str(data_dir))
    if (data_dir / "segments").exists():
        raise UnsupportedLayoutError(
            f"{data_dir}/segments: segmented recordings are not supported (the manifest has no offsets); "
            "cut them first, e.g. `extract-segments scp:wav.scp segments ark,scp:...` or sox trim, and "
            "point wav.scp at the per-utterance files")
    for required in ("wav.scp", "text", "utt2spk"):
        if not (data_dir / required).is_file():
            raise FileNotFoundError(f"{data_dir}: missing {required}")
    root = Path(audio_root) if audio_root is not None else Path.cwd()
    wavs, wav_dups = read_kaldi_table(data_dir / "wav.scp")
    texts, text_dups = read_kaldi_table(data_dir / "text")
    speakers, _ = read_kaldi_table(data_dir / "utt2spk")
    dialects = read_kaldi_table(data_dir / "utt2dialect")[0] if (data_dir / "utt2dialect").is_file() else {}
    duplicates = {uid: f"wav.scp line {n}" for uid, n in wav_dups.items()}
    duplicates.update({uid: f"text line {n}" for uid, n in text_dups.items()})
    result = ImportResult()
    for uid in sorted(set(wavs) | set(texts)):
        result.add(_kaldi_utterance(uid, data_dir, root, wavs, texts, speakers, dialects, split, dialect,
                                    duplicates))
    return result


def _kaldi_utterance(uid: str, data_dir: Path, root: Path, wavs: Mapping[str, str], texts: Mapping[str, str],
                     speakers: Mapping[str, str], dialects: Mapping[str, str], split: str, dialect: str,
                     duplicates: Mapping[str, str]) -> Utterance | Reject:
    if uid in duplicates:
        return Reject(uid, str(data_dir), "duplicate", f"id listed twice (again at {duplicates[uid]})")
    if uid not in wavs:
        return Reject(uid, str(data_dir / "text"), "no_audio_entry", "id is in text but not in wav.scp")
    if uid not in texts:
        return Reject(uid, str(data_dir / "wav.scp"), "no_transcript", "id is in wav.scp but not in text")
    if not speakers.get(uid):
        return Reject(uid, str(data_dir / "utt2spk"), "no_speaker", "id is not in utt2spk")
    audio, why = kaldi_audio_path(wavs[uid], root)
    if audio is None:
        return Reject(uid, str(data_dir / "wav.scp"), "unsupported_audio", why)
    extra: dict[str, Any] = {"corpus": "kaldi"}
    if wavs[uid].strip().endswith("|"):
        extra["wav_scp"] = wavs[uid].strip()
    return build_utterance(uid, audio, texts[uid], speakers[uid], dialect_slug(dialects.get(uid, dialect)), split,
                           str(data_dir / "text"), extra)


# --------------------------------------------------------------------------------------------------
# A user's own manifest
# --------------------------------------------------------------------------------------------------

# What a user's manifest must give: the rest (duration, sample rate, speaker, dialect, split) is
# measured from the audio header, defaulted, or taken from ``corpus.split``.
MANIFEST_REQUIRED = ("id", "audio", "text")
MANIFEST_OPTIONAL = ("speaker", "dialect", "split")
UNKNOWN_SPEAKER = "unknown"
# Contract fields the importer always recomputes; a user's values for them are not kept.
_MEASURED = ("duration", "sample_rate")


def _manifest_records(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line number, record) of every non-empty line; ManifestError names the line of a broken one."""
    seen: dict[str, int] = {}
    for lineno, where, record in iter_json_lines(path):
        missing = [k for k in MANIFEST_REQUIRED if not isinstance(record.get(k), str) or not record[k].strip()]
        if missing:
            raise ManifestError(
                f"{where}missing or empty field(s) {', '.join(missing)}; every line needs "
                f"{', '.join(MANIFEST_REQUIRED)} (strings). duration and sample_rate are read from the audio, "
                f"speaker and dialect default to {UNKNOWN_SPEAKER!r}, split comes from corpus.split")
        uid = record["id"]
        if uid in seen:
            raise ManifestError(f"{where}duplicate utterance id {uid!r} (first at line {seen[uid]})")
        seen[uid] = lineno
        yield lineno, record


def import_manifest(path: str | os.PathLike, split: str | None = None) -> ImportResult:
    """Import a user's JSONL manifest; only ``id``, ``audio`` and ``text`` are required per line.

    ``speaker``, ``dialect`` and ``split`` are optional: speaker and dialect default to "unknown"
    (the dialect is turned into a slug), and a line without a ``split`` takes ``split``
    (``corpus.split`` in the workflow); a line's own split is never overridden, so dev and test
    utterances cannot be moved into training by a config value. ``duration`` and ``sample_rate`` are
    always measured from the audio header, whatever a line declares (hand-written values are often
    wrong). A broken line (not JSON, missing id/audio/text, duplicate id), or a line without a split
    when ``split`` is not given, raises ManifestError naming the file and line. Everything else is
    checked like any corpus and goes to the rejects with its reason: relative audio resolved against
    the manifest's folder, audio present and readable, transcript normalized, split one of
    train/dev/test. Other fields are kept.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    base = path.resolve().parent
    if split is not None:
        _check_split(split, f"{path} (corpus.split)")
    result = ImportResult()
    for lineno, record in _manifest_records(path):
        source = f"{path}:{lineno}"
        uid = record["id"]
        line_split = record.get("split")
        if line_split is None:
            if split is None:
                raise ManifestError(f"{source}: {uid!r} has no split and corpus.split is not set; add a "
                                    f"\"split\" ({', '.join(SPLITS)}) to each line or set corpus.split")
            line_split = split
        if line_split not in SPLITS:
            result.add(Reject(uid, source, "no_split", f"split {line_split!r} is not one of {', '.join(SPLITS)}"))
            continue
        speaker = str(record.get("speaker") or "").strip() or UNKNOWN_SPEAKER
        extra = {k: v for k, v in record.items()
                 if k not in MANIFEST_REQUIRED + MANIFEST_OPTIONAL + _MEASURED}
        audio = Path(record["audio"])
        audio = audio if audio.is_absolute() else base / audio
        result.add(build_utterance(uid, audio, record["text"], speaker, dialect_slug(str(record.get("dialect") or "")),
                                   line_split, source, extra))
    return result


# --------------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------------

IMPORTERS: dict[str, Callable[..., ImportResult]] = {
    "librispeech": import_librispeech,
    "common_voice": import_common_voice,
    "kaldi": import_kaldi,
    "manifest": import_manifest,
}
_ALIASES = {"commonvoice": "common_voice", "cv": "common_voice", "jsonl": "manifest"}


def import_corpus(kind: str, root: str | os.PathLike, **kwargs: Any) -> ImportResult:
    """``import_corpus("librispeech", "/data/LibriSpeech")``; kwargs go to the importer."""
    key = str(kind).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in IMPORTERS:
        raise ValueError(f"unknown corpus kind {kind!r}; known kinds: {', '.join(IMPORTERS)}")
    return IMPORTERS[key](root, **kwargs)
