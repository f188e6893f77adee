"""DEMAND noise: pinned, resumable, md5-verified download; safe extraction; a noise manifest.

DEMAND (Thiemann, Ito & Vincent, 2013; Zenodo record 1227121, CC BY-SA 3.0) holds 18 acoustic
environments, each one ~5 minute recording with a 16-microphone array. Each environment is a zip
``<ENV>_16k.zip`` (and ``<ENV>_48k.zip``) with ``<ENV>/ch01.wav … ch16.wav``. SCAFE is published
only at 48 kHz, so it has no 16 kHz archive and is not offered here.

Why so careful: these archives are ~100 MB each and come from one public server. A truncated or
silently corrupted zip would otherwise only surface later as odd training noise, so nothing is
renamed to its final name before its md5 matches a pin, and extraction refuses archives that could
write outside their target.
"""
from __future__ import annotations

import http.client
import json
import logging
import math
import operator
import os
import re
import shutil
import stat
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Mapping, Sequence

from asrflow.audio import SAMPLE_RATE, audio_info, read_audio, rms_dbfs
from asrflow.manifest import write_manifest
from asrflow.tracking import file_digest

log = logging.getLogger(__name__)

ZENODO_RECORD = "1227121"
ZENODO_URL_TEMPLATE = "https://zenodo.org/records/1227121/files/{name}?download=1"
N_CHANNELS = 16
ONLY_48K = ("SCAFE",)
MD5SUMS_NAME = "MD5SUMS"

# md5 of every <ENV>_16k.zip on Zenodo record 1227121 (the 17 environments that have a 16 kHz file):
# the values Zenodo publishes for the record's files, as pinned independently by several public
# projects (a DEMAND download script, a noise-manifest preparer, a benchmark asset table), which agree
# on all 17. They were not re-checked against zenodo.org from here (no internet); a wrong pin shows
# up as an md5 mismatch naming both values. An environment whose value is None is unpinned:
# downloading it requires an explicit ``md5=`` or a mirror whose MD5SUMS lists it (see
# ``download_environment``).
DEMAND_16K_MD5: dict[str, str | None] = {
    "DKITCHEN": "7ffbf52d7f4699f96927846103dc8788",
    "DLIVING": "46741384d9e434a0bd8b3ec1830b6052",
    "DWASHING": "7e5ee9437ce9409c5f9a779b6212a240",
    "NFIELD": "a740046c6f4e174e16f5d568aaec5024",
    "NPARK": "80f1385a34d7f1705758926b57f138ce",
    "NRIVER": "54264db61d3fe073fb81f2e40e0d19b5",
    "OHALLWAY": "fe918bbb0e63e73d09ba7f4843ef33f1",
    "OMEETING": "62f7cfe7fe6d30b7d8a215fe37c2dfd2",
    "OOFFICE": "7b61cc2d182d5a654cb9c3101ddd4041",
    "PCAFETER": "99927d148128254141a9417d051510bb",
    "PRESTO": "b98d2e6854eeebb397f29a8ad7457092",
    "PSTATION": "d7448009f6c2aeb6ba570375df1750a3",
    "SPSQUARE": "205d0e7b8fe74504a2f8d252fc414b9e",
    "STRAFFIC": "2efa87262f272bbf9ba578088e81939c",
    "TBUS": "706b11b0d8504f9f3b3f3211e91b3863",
    "TCAR": "4d930012796bd298932245a26189f973",
    "TMETRO": "95daf4df678e13b120e14211e6d89571",
}
ENVIRONMENTS_16K = tuple(DEMAND_16K_MD5)

NOISE_FIELDS = ("id", "env", "channel", "audio", "duration", "sample_rate", "split", "rms_dbfs")
NOISE_SPLITS = ("train", "heldout")

# HTTP statuses worth retrying; every other 4xx means the URL or the request is wrong.
_TRANSIENT_HTTP = {408, 425, 429}
_MD5_RE = re.compile(r"^[0-9a-fA-F]{32}$")


class DownloadError(RuntimeError):
    """A DEMAND archive could not be fetched and verified; the message names the file."""


class NotAZipError(DownloadError):
    """A file that should be a DEMAND zip is something else (an HTML error page, say); the message
    names the file, where it came from, what it looks like and where it was kept."""


class UnsafeArchiveError(ValueError):
    """An archive member could land outside the target folder; the message names the member."""


class NoiseDataError(ValueError):
    """Extracted noise that does not fit what the workflow expects (channels, rate, env split)."""


class _ShortReadError(OSError):
    """The server closed the connection before sending what it announced (retryable)."""


class _PermanentError(Exception):
    """A failure that retrying cannot fix (404, missing mirror file)."""


# --------------------------------------------------------------------------------------------------
# Names, pins and checksums
# --------------------------------------------------------------------------------------------------

def check_environment(env: str) -> str:
    """Return the canonical (upper-case) environment name, or raise DownloadError saying why not."""
    name = str(env).strip().upper()
    if name in ONLY_48K:
        raise DownloadError(
            f"DEMAND environment {name} is published only at 48 kHz ({name}_48k.zip); this workflow "
            f"uses the 16 kHz archives. Choose from: {', '.join(ENVIRONMENTS_16K)}")
    if name not in DEMAND_16K_MD5:
        raise DownloadError(
            f"unknown DEMAND environment {env!r}; 16 kHz environments: {', '.join(ENVIRONMENTS_16K)}")
    return name


def archive_name(env: str) -> str:
    return f"{check_environment(env)}_16k.zip"


def zenodo_url(env: str) -> str:
    return ZENODO_URL_TEMPLATE.format(name=archive_name(env))


def md5_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    return file_digest(path, "md5", chunk)


# What a file that should be a zip often is instead, by its first bytes (after a BOM and blanks).
_CONTENT_KINDS = (
    ((b"<!doctype html", b"<html", b"<head", b"<body", b"<!--"), "an HTML page"),
    ((b"<?xml",), "an XML document"),
    ((b"{", b"["), "JSON text"),
    ((b"\x1f\x8b",), "gzip data"),
    ((b"PK\x03\x04", b"PK\x05\x06"), "the start of a zip whose end is missing or damaged"),
)


def describe_non_zip(path: str | os.PathLike) -> str:
    """What ``path`` looks like instead of a zip, e.g. "starts with '<!DOCTYPE html' — an HTML page,
    not a zip (612 bytes)"."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes), not a zip"
    with open(path, "rb") as fh:
        head = fh.read(256)
    body = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    shown = body[:14].decode("latin-1")
    kind = next((what for prefixes, what in _CONTENT_KINDS
                 if body.lower().startswith(tuple(p.lower() for p in prefixes))), None)
    if kind is None:
        printable = all(32 <= b < 127 or b in (9, 10, 13) for b in body[:64])
        kind = "text" if printable and body else "unrecognized binary data"
    return f"starts with {shown!r} — {kind}, not a zip ({size} bytes)"


def _refuse_non_zip(path: Path, final: Path, source: str, mirror: str | os.PathLike | None, md5: str,
                    pin_source: str) -> None:
    """Raise NotAZipError if ``path`` (its md5 already matched) is not a zip, after moving it to
    ``<final>.not-a-zip``: kept for inspection, under a name no rule trusts or cleans up."""
    if zipfile.is_zipfile(path):
        return
    looks = describe_non_zip(path)
    kept = final.with_name(final.name + ".not-a-zip")
    os.replace(path, kept)
    origin = f"mirror {mirror}" if mirror is not None else f"Zenodo record {ZENODO_RECORD}"
    raise NotAZipError(
        f"{final.name} from {origin} ({source}) is not a zip: it {looks}. Its md5 {md5} matches the "
        f"{pin_source}, so the checksum was made from this same wrong file (a mirror that saved an error or "
        f"login page under the archive's name, say). The file is kept as {kept}; put the real archive "
        f"(and its md5) on the mirror, then run again.")


def parse_md5sums(text: str) -> dict[str, str]:
    """Parse ``md5sum`` output (``<md5>  <name>`` or ``<md5> *<name>``) into {basename: md5}.

    Keys are base names because a mirror's MD5SUMS is usually written from inside its folder
    (``./DKITCHEN_16k.zip``) while we look files up by name.
    """
    sums: dict[str, str] = {}
    for line in text.splitlines():
        match = re.match(r"^\s*([0-9a-fA-F]{32})\s+\*?(.+?)\s*$", line)
        if match:
            sums[os.path.basename(match.group(2).replace("\\", "/"))] = match.group(1).lower()
    return sums


def _is_url(mirror: str | os.PathLike) -> bool:
    return str(mirror).startswith(("http://", "https://"))


def _mirror_file_url(mirror: str, name: str) -> str:
    return f"{str(mirror).rstrip('/')}/{name}"


def _read_mirror_md5sums(mirror: str | os.PathLike, timeout: float) -> dict[str, str]:
    """The mirror's MD5SUMS as a dict; empty if the mirror has none."""
    if not _is_url(mirror):
        path = Path(mirror) / MD5SUMS_NAME
        return parse_md5sums(path.read_text(encoding="utf-8")) if path.is_file() else {}
    url = _mirror_file_url(str(mirror), MD5SUMS_NAME)
    try:
        with urllib.request.urlopen(_request(url), timeout=timeout) as resp:
            return parse_md5sums(resp.read().decode("utf-8", errors="replace"))
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return {}
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason} while reading the mirror's MD5SUMS") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise DownloadError(f"{url}: could not read the mirror's MD5SUMS ({exc})") from exc


def expected_md5(env: str, md5: str | None = None, mirror: str | os.PathLike | None = None,
                 timeout: float = 60) -> tuple[str, str]:
    """Return (md5, where it came from). Order: explicit ``md5``, the pinned table, mirror MD5SUMS.

    The pinned table beats a mirror's MD5SUMS so that a mirror cannot vouch for its own altered
    copy; an explicit ``md5`` beats both because the user then takes responsibility.
    """
    env = check_environment(env)
    name = archive_name(env)
    if md5 is not None:
        if not _MD5_RE.match(md5.strip()):
            raise DownloadError(f"{name}: md5 argument {md5!r} is not 32 hex digits")
        return md5.strip().lower(), "md5 argument"
    pinned = DEMAND_16K_MD5.get(env)
    if pinned:
        return pinned, "pinned DEMAND_16K_MD5 table"
    if mirror is not None:
        listed = _read_mirror_md5sums(mirror, timeout).get(name)
        if listed:
            return listed, f"{MD5SUMS_NAME} of mirror {mirror}"
    raise DownloadError(
        f"{name}: no md5 is pinned for {env}, so an unverified download is refused. Pass md5='<32 hex>' "
        f"or use a mirror (URL or folder) whose {MD5SUMS_NAME} file lists {name}.")


# --------------------------------------------------------------------------------------------------
# Fetching one file into <name>.part
# --------------------------------------------------------------------------------------------------

def _request(url: str, offset: int = 0) -> urllib.request.Request:
    headers = {"User-Agent": "asrflow-demand/1.0"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.Request(url, headers=headers)


def _resume_offset(resp: http.client.HTTPResponse, offset: int, part: Path) -> int:
    """Decide where the response body starts in the file: ``offset`` on a 206, 0 otherwise.

    A server that ignores Range answers 200 with the whole file; appending that would corrupt the
    .part, so it is restarted instead.
    """
    if not offset:
        return 0
    if resp.status != 206:
        log.info("%s: server ignored the Range request (HTTP %s); restarting from byte 0", part.name, resp.status)
        return 0
    match = re.match(r"bytes\s+(\d+)-", resp.headers.get("Content-Range", ""))
    if not match or int(match.group(1)) != offset:
        part.unlink(missing_ok=True)
        raise _ShortReadError(f"unexpected Content-Range {resp.headers.get('Content-Range')!r} "
                              f"for a resume at byte {offset}; the partial file was discarded")
    return offset


def _copy_body(resp: http.client.HTTPResponse, part: Path, start: int, chunk: int) -> int:
    """Write the body at ``start`` (truncating anything after it); return the bytes written.

    Bytes that did arrive before a connection drop are kept, so the next attempt resumes after them.
    """
    written = 0
    with open(part, "r+b" if start and part.exists() else "wb") as fh:
        fh.seek(start)
        fh.truncate()
        while True:
            try:
                block = resp.read(chunk)
            except http.client.IncompleteRead as exc:
                fh.write(exc.partial)
                written += len(exc.partial)
                raise _ShortReadError(f"connection closed after {start + written} bytes") from exc
            if not block:
                return written
            fh.write(block)
            written += len(block)


def _fetch_http(url: str, part: Path, timeout: float, chunk: int) -> None:
    """Fetch ``url`` into ``part``, resuming from its current size with an HTTP Range request."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        resp = urllib.request.urlopen(_request(url, offset), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            return  # nothing left to send: the .part is complete (or too long); the md5 check decides
        if exc.code in _TRANSIENT_HTTP or exc.code >= 500:
            raise
        raise _PermanentError(f"HTTP {exc.code} {exc.reason} for {url}") from exc
    with resp:
        start = _resume_offset(resp, offset, part)
        announced = resp.headers.get("Content-Length")
        written = _copy_body(resp, part, start, chunk)
    if announced is not None and written < int(announced):
        raise _ShortReadError(f"got {written} of the {announced} bytes announced")


def _fetch_local(src: Path, part: Path, chunk: int) -> None:
    """Copy from a mirror folder (air-gapped clusters); always whole-file, local copies are cheap."""
    if not src.is_file():
        raise _PermanentError(f"{src} is not in the mirror folder")
    with open(src, "rb") as fin, open(part, "wb") as fout:
        shutil.copyfileobj(fin, fout, chunk)


def _fetcher(env: str, mirror: str | os.PathLike | None, timeout: float,
             chunk: int) -> tuple[str, Callable[[Path], None]]:
    name = archive_name(env)
    if mirror is None:
        url = zenodo_url(env)
        return url, lambda part: _fetch_http(url, part, timeout, chunk)
    if _is_url(mirror):
        url = _mirror_file_url(str(mirror), name)
        return url, lambda part: _fetch_http(url, part, timeout, chunk)
    src = Path(mirror) / name
    return str(src), lambda part: _fetch_local(src, part, chunk)


def download_environment(env: str, dest_dir: str | os.PathLike, mirror: str | os.PathLike | None = None,
                         md5: str | None = None, retries: int = 4, backoff: float = 1.0,
                         timeout: float = 60, chunk: int = 1 << 20) -> Path:
    """Download ``<ENV>_16k.zip`` into ``dest_dir`` and return its path once its md5 matches.

    The data goes to ``<name>.part`` first and is renamed only after verification, so the final
    name always means "verified" (Snakemake may trust it). Network errors and short reads are
    retried up to ``retries`` times with exponential backoff (``backoff * 2**k`` seconds), resuming
    the .part with a Range request; a .part whose md5 turns out wrong is deleted and fetched again
    from scratch. An already present final file is re-verified and reused.

    ``mirror``: None for Zenodo, an http(s) base URL, or a local folder holding the zips; either may
    hold an ``MD5SUMS`` file (md5sum format) which pins archives the table leaves unpinned.
    ``md5`` overrides every other source of the expected checksum.
    """
    env = check_environment(env)
    name = archive_name(env)
    want, pin_source = expected_md5(env, md5, mirror, timeout)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    final, part = dest / name, dest / f"{name}.part"
    source, fetch = _fetcher(env, mirror, timeout, chunk)
    if final.exists():
        if md5_of(final, chunk) == want:
            _refuse_non_zip(final, final, source, mirror, want, pin_source)
            return final
        log.warning("%s: existing file does not match md5 %s; downloading it again", final, want)
        final.unlink()
    history: list[str] = []
    actual = None
    for attempt in range(1, retries + 2):
        actual = None
        try:
            fetch(part)
        except _PermanentError as exc:
            raise DownloadError(f"{name}: {exc}") from exc
        except (OSError, http.client.HTTPException) as exc:
            history.append(f"attempt {attempt}: {type(exc).__name__}: {exc}")
        else:
            actual = md5_of(part, chunk)
            if actual == want:
                _refuse_non_zip(part, final, source, mirror, want, pin_source)
                os.replace(part, final)
                log.info("%s: verified md5 %s (%s) from %s", final, want, pin_source, source)
                return final
            looks = "" if zipfile.is_zipfile(part) else f" (it {describe_non_zip(part)})"
            part.unlink()
            history.append(f"attempt {attempt}: md5 {actual} != expected {want}{looks}; deleted")
        if attempt <= retries:
            time.sleep(backoff * 2 ** (attempt - 1))
    raise DownloadError(_failure_message(name, source, want, pin_source, actual, part, history))


def _failure_message(name: str, source: str, want: str, pin_source: str, actual: str | None,
                     part: Path, history: list[str]) -> str:
    if actual is not None:
        head = (f"{name}: md5 mismatch: expected {want} ({pin_source}), actual {actual}; "
                f"the download from {source} was deleted")
    else:
        kept = f"; {part.stat().st_size} bytes kept in {part} for a later resume" if part.exists() else ""
        head = f"{name}: download from {source} failed after {len(history)} attempt(s){kept}"
    return head + "\n  " + "\n  ".join(history)


# --------------------------------------------------------------------------------------------------
# Safe, atomic extraction
# --------------------------------------------------------------------------------------------------

def _member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why this member must not be extracted, or None if it is a plain file or folder inside."""
    name = info.filename
    if not name or "\x00" in name:
        return "empty name or NUL byte in name"
    if "\\" in name:
        return "backslash in path (Windows separator or escape attempt)"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in PurePosixPath(name).parts:
        return "'..' component escapes the target folder"
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "special file (device, fifo or socket)"
    return None


def check_archive(zf: zipfile.ZipFile, label: str) -> None:
    """Raise UnsafeArchiveError for the first unsafe member; the whole archive is then refused."""
    for info in zf.infolist():
        problem = _member_problem(info)
        if problem:
            raise UnsafeArchiveError(f"{label}: refusing member {info.filename!r}: {problem}")


def _inside(root: Path, path: Path) -> bool:
    root_real = os.path.realpath(root)
    return os.path.commonpath([root_real, os.path.realpath(path)]) == root_real


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, staging: Path, label: str) -> None:
    dest = staging / info.filename
    if not _inside(staging, dest):
        raise UnsafeArchiveError(f"{label}: refusing member {info.filename!r}: resolves outside the target")
    if info.is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(info) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)


def _top_level(names: Iterable[str]) -> list[str]:
    return sorted({PurePosixPath(n).parts[0] for n in names})


def _move_into_place(staging: Path, target: Path, tops: list[str]) -> None:
    """Rename each extracted top-level entry into ``target``, replacing an older copy.

    Renames inside one file system are atomic, so ``target/<ENV>`` is either the old complete
    folder, absent for an instant, or the new complete folder, never a partial one.
    """
    for top in tops:
        src, dst = staging / top, target / top
        if dst.is_dir() and not dst.is_symlink():
            os.replace(dst, staging / f".replaced-{top}")
        os.replace(src, dst)


def _remove_stale_staging(target: Path, prefix: str) -> None:
    for stale in target.glob(f"{prefix}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def safe_extract(zip_path: str | os.PathLike, target_dir: str | os.PathLike,
                 members_prefix: str | None = None) -> list[Path]:
    """Extract ``zip_path`` into ``target_dir`` after refusing unsafe members; return the files.

    Every member is checked first (absolute paths, ``..``, symlinks, special files, backslashes);
    one bad member refuses the whole archive, since it is evidence of a tampered download. Files
    are written to a hidden staging folder inside ``target_dir`` and renamed into place at the end,
    so a killed job leaves only that staging folder (removed by the next call) and never a
    half-extracted environment. Each top-level entry (``DKITCHEN/``) is replaced as a whole, so
    re-extracting never mixes old and new files. ``members_prefix`` (e.g. ``"DKITCHEN/"``) limits
    what is extracted; every member is still checked. Sizes are not limited (no zip-bomb guard):
    only extract archives whose md5 was verified.
    """
    zip_path, target = Path(zip_path), Path(target_dir)
    target.mkdir(parents=True, exist_ok=True)
    staging_prefix = f".{zip_path.name}.extracting-"
    _remove_stale_staging(target, staging_prefix)
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as exc:
        raise NotAZipError(f"{zip_path}: cannot be extracted: it {describe_non_zip(zip_path)}") from exc
    with zf:
        check_archive(zf, str(zip_path))
        chosen = [i for i in zf.infolist() if members_prefix is None or i.filename.startswith(members_prefix)]
        if not chosen:
            raise UnsafeArchiveError(f"{zip_path}: no member starts with {members_prefix!r}")
        staging = Path(tempfile.mkdtemp(prefix=staging_prefix, dir=target))
        try:
            for info in chosen:
                _extract_member(zf, info, staging, str(zip_path))
            _move_into_place(staging, target, _top_level(i.filename for i in chosen))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return [target / i.filename for i in chosen if not i.is_dir()]


# --------------------------------------------------------------------------------------------------
# Channels and the noise manifest
# --------------------------------------------------------------------------------------------------

def _channel_number(channel: Any) -> int:
    if isinstance(channel, bool):
        raise NoiseDataError(f"channel {channel!r} is not a channel number")
    try:
        number = operator.index(channel)
    except TypeError as exc:
        raise NoiseDataError(f"channel {channel!r} is not an integer") from exc
    if not 1 <= number <= N_CHANNELS:
        raise NoiseDataError(f"channel {number} out of range: DEMAND has ch01..ch{N_CHANNELS:02d}")
    return number


def select_channels(env_dir: str | os.PathLike, channels: Sequence[int]) -> list[Path]:
    """Paths of ``<env_dir>/chNN.wav`` for ``channels`` (1-based), checked to exist and be 16 kHz mono.

    Adjacent microphones of the array record nearly the same signal, so using a few spread-out
    channels (e.g. [1, 5, 9]) adds variety without near-duplicates; callers choose.
    """
    env_dir = Path(env_dir)
    numbers = [_channel_number(c) for c in channels]
    if not numbers:
        raise NoiseDataError(f"{env_dir}: no channels selected")
    if len(set(numbers)) != len(numbers):
        raise NoiseDataError(f"{env_dir}: duplicate channels in {list(channels)}")
    paths = []
    for number in numbers:
        path = env_dir / f"ch{number:02d}.wav"
        if not path.is_file():
            raise NoiseDataError(f"{path}: missing; is {env_dir} an extracted DEMAND environment folder?")
        info = audio_info(path)
        if info["sample_rate"] != SAMPLE_RATE or info["channels"] != 1:
            raise NoiseDataError(f"{path}: expected {SAMPLE_RATE} Hz mono, found {info['sample_rate']} Hz with "
                                 f"{info['channels']} channel(s); use the _16k archives")
        paths.append(path)
    return paths


def _check_env_split(env_dirs: Mapping[str, Any], train_envs: Iterable[str],
                     heldout_envs: Iterable[str]) -> tuple[set[str], set[str]]:
    """Both env sets must be disjoint and cover exactly the given environments.

    Held-out noise must be unseen environments, otherwise a noisy test set measures memorised
    noise; an unassigned environment is almost always a configuration slip, so it is an error too.
    """
    train, heldout, known = set(train_envs), set(heldout_envs), set(env_dirs)
    both = sorted(train & heldout)
    if both:
        raise NoiseDataError(f"environment(s) {', '.join(both)} are in both train_envs and heldout_envs; "
                             "noise environments must not overlap between splits")
    unassigned = sorted(known - train - heldout)
    if unassigned:
        raise NoiseDataError(f"environment(s) {', '.join(unassigned)} are assigned to neither train_envs nor "
                             "heldout_envs")
    unknown = sorted((train | heldout) - known)
    if unknown:
        raise NoiseDataError(f"environment(s) {', '.join(unknown)} are assigned to a split but have no folder "
                             "in env_dirs")
    return train, heldout


def _noise_record(env: str, channel: int, path: Path, split: str) -> dict[str, Any]:
    samples, sr = read_audio(path)
    level = rms_dbfs(samples)
    if not math.isfinite(level):
        raise NoiseDataError(f"{path}: digital silence (RMS is -inf dBFS); it cannot be mixed at an SNR")
    return {"id": f"demand-{env}-ch{channel:02d}", "env": env, "channel": channel,
            "audio": str(path.resolve()), "duration": len(samples) / float(sr), "sample_rate": sr,
            "split": split, "rms_dbfs": round(level, 3)}


def build_noise_manifest(env_dirs: Mapping[str, str | os.PathLike], train_envs: Iterable[str],
                         heldout_envs: Iterable[str], channels: Sequence[int]) -> list[dict[str, Any]]:
    """One record per (environment, channel): id, env, channel, audio, duration, sample_rate,
    split ("train" or "heldout"), rms_dbfs (so mixing at an SNR needs no second pass over audio).
    """
    train, _ = _check_env_split(env_dirs, train_envs, heldout_envs)
    records = []
    for env in sorted(env_dirs):
        split = "train" if env in train else "heldout"
        for number, path in zip([_channel_number(c) for c in channels], select_channels(env_dirs[env], channels)):
            records.append(_noise_record(env, number, path, split))
    return records


def _check_noise_record(record: Mapping[str, Any], index: int) -> None:
    missing = [k for k in NOISE_FIELDS if k not in record]
    if missing:
        raise NoiseDataError(f"noise record {index}: missing field(s) {', '.join(missing)}")
    if record["split"] not in NOISE_SPLITS:
        raise NoiseDataError(f"noise record {index}: split {record['split']!r} is not one of {NOISE_SPLITS}")
    if not math.isfinite(float(record["rms_dbfs"])):
        raise NoiseDataError(f"noise record {index}: rms_dbfs must be finite (JSON has no -inf)")


def write_noise_manifest(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    """Validate and write records as JSON Lines atomically (via the manifest module's writer)."""
    records = [dict(r) for r in records]
    for index, record in enumerate(records):
        _check_noise_record(record, index)
    return write_manifest(path, records)


def read_noise_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a noise manifest; relative audio paths are resolved against the manifest's folder."""
    base = Path(path).resolve().parent
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            _check_noise_record(record, lineno)
            if not os.path.isabs(record["audio"]):
                record["audio"] = str(base / record["audio"])
            records.append(record)
    return records
