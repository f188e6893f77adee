"""DEMAND download/extract/manifest against a real HTTP server on 127.0.0.1 (no internet).

The server serves zips built here in DEMAND's layout from short synthetic 16 kHz wavs and can be
told to truncate responses or ignore Range requests, to exercise the downloader's failure paths.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
import stat
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from asrflow.data import demand
from asrflow.data.demand import (DownloadError, NoiseDataError, NotAZipError, UnsafeArchiveError, build_noise_manifest,
                                 download_environment, read_noise_manifest, safe_extract, select_channels,
                                 write_noise_manifest)

SR = 16000
FAST = dict(backoff=0.0, timeout=5)


# ------------------------------------------------------------------------------------------ helpers

def wav_bytes(seed: int, seconds: float = 0.05, sr: int = SR, amplitude: float = 0.1) -> bytes:
    x = np.random.default_rng(seed).standard_normal(int(sr * seconds)).astype(np.float32) * amplitude
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def demand_zip(env: str, channels: int = 16) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{env}/", b"")
        for ch in range(1, channels + 1):
            zf.writestr(f"{env}/ch{ch:02d}.wav", wav_bytes(seed=ch))
    return buf.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def write_env_dir(root: Path, env: str, channels=(1, 2, 3), sr: int = SR, seconds: float = 0.05) -> Path:
    env_dir = root / env
    env_dir.mkdir(parents=True)
    for ch in channels:
        (env_dir / f"ch{ch:02d}.wav").write_bytes(wav_bytes(seed=ch, sr=sr, seconds=seconds))
    return env_dir


class Handler(BaseHTTPRequestHandler):
    """Serves ``state.files``; honours ``bytes=N-`` ranges unless told not to; can truncate bodies."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        state = self.server.state
        if self.path.startswith("/moved/"):  # like Zenodo's ?download=1 redirecting to the content URL
            self.send_response(302)
            self.send_header("Location", self.path.replace("/moved/", "/records/", 1))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        name = self.path.split("?", 1)[0].rsplit("/", 1)[-1]
        rng = self.headers.get("Range")
        state.requests.append((name, rng))
        if name not in state.files:
            self.send_error(404)
            return
        data = state.files[name]
        status, body, extra = 200, data, {}
        match = re.match(r"bytes=(\d+)-$", rng or "")
        if match and not state.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status, body = 206, data[start:]
            extra["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()
        if state.truncate.get(name, 0) > 0:
            state.truncate[name] -= 1
            body = body[: max(1, len(body) // 2)]  # announce everything, send half, hang up
            self.close_connection = True
        state.sent.append(len(body))  # before writing: the client may finish before this thread resumes
        self.wfile.write(body)


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.state = SimpleNamespace(files={}, truncate={}, ignore_range=False, requests=[], sent=[])
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}/records/1227121/files"
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def kitchen_zip() -> bytes:
    return demand_zip("DKITCHEN")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------------ download

def test_pinned_table_covers_the_16k_environments():
    assert len(demand.ENVIRONMENTS_16K) == 17 and "SCAFE" not in demand.ENVIRONMENTS_16K
    for env, value in demand.DEMAND_16K_MD5.items():
        assert value is None or re.fullmatch(r"[0-9a-f]{32}", value), env
    assert demand.zenodo_url("dkitchen") == "https://zenodo.org/records/1227121/files/DKITCHEN_16k.zip?download=1"


def test_good_download_verifies_md5_and_extracts(server, kitchen_zip, tmp_path, monkeypatch):
    server.state.files["DKITCHEN_16k.zip"] = kitchen_zip
    monkeypatch.setitem(demand.DEMAND_16K_MD5, "DKITCHEN", md5(kitchen_zip))  # stand-in for the real pin
    dl = tmp_path / "downloads"
    path = download_environment("DKITCHEN", dl, mirror=server.base, **FAST)
    assert path == dl / "DKITCHEN_16k.zip" and path.read_bytes() == kitchen_zip
    assert leftovers(dl) == ["DKITCHEN_16k.zip"]  # no .part left behind

    files = safe_extract(path, tmp_path / "noise")
    assert len(files) == 16 and all(f.is_file() for f in files)
    assert leftovers(tmp_path / "noise") == ["DKITCHEN"]  # no staging folder left behind
    assert sf.info(str(tmp_path / "noise" / "DKITCHEN" / "ch16.wav")).samplerate == SR

    n_requests = len(server.state.requests)
    assert download_environment("DKITCHEN", dl, mirror=server.base, **FAST) == path
    assert len(server.state.requests) == n_requests  # verified file reused, nothing fetched


def test_corrupted_file_is_rejected_and_nothing_kept(server, kitchen_zip, tmp_path):
    corrupted = bytearray(kitchen_zip)
    corrupted[100] ^= 0xFF
    server.state.files["DKITCHEN_16k.zip"] = bytes(corrupted)
    dl = tmp_path / "downloads"
    with pytest.raises(DownloadError) as err:
        download_environment("DKITCHEN", dl, mirror=server.base, md5=md5(kitchen_zip), retries=1, **FAST)
    message = str(err.value)
    assert "DKITCHEN_16k.zip" in message and md5(kitchen_zip) in message and md5(bytes(corrupted)) in message
    assert leftovers(dl) == []  # neither a final file nor a .part to be trusted later
    assert len(server.state.requests) == 2  # one retry after the mismatch


def test_truncated_transfer_is_resumed(server, kitchen_zip, tmp_path):
    server.state.files["DKITCHEN_16k.zip"] = kitchen_zip
    server.state.truncate["DKITCHEN_16k.zip"] = 1
    path = download_environment("DKITCHEN", tmp_path, mirror=server.base, md5=md5(kitchen_zip), **FAST)
    assert path.read_bytes() == kitchen_zip
    (first, r1), (second, r2) = server.state.requests
    assert r1 is None and r2 == f"bytes={len(kitchen_zip) // 2}-"  # second attempt resumed
    assert sum(server.state.sent) == len(kitchen_zip)  # nothing fetched twice


def test_resume_works_through_a_redirect(server, kitchen_zip, tmp_path):
    server.state.files["DKITCHEN_16k.zip"] = kitchen_zip
    server.state.truncate["DKITCHEN_16k.zip"] = 1
    moved = server.base.replace("/records/", "/moved/")
    path = download_environment("DKITCHEN", tmp_path, mirror=moved, md5=md5(kitchen_zip), **FAST)
    assert path.read_bytes() == kitchen_zip
    assert server.state.requests[-1][1] == f"bytes={len(kitchen_zip) // 2}-"  # Range survived the 302


def test_always_truncated_transfer_fails_clearly(server, kitchen_zip, tmp_path):
    server.state.files["DKITCHEN_16k.zip"] = kitchen_zip
    server.state.truncate["DKITCHEN_16k.zip"] = 10**6
    with pytest.raises(DownloadError, match=r"DKITCHEN_16k\.zip: download .* failed after 3 attempt"):
        download_environment("DKITCHEN", tmp_path, mirror=server.base, md5=md5(kitchen_zip), retries=2, **FAST)
    assert not (tmp_path / "DKITCHEN_16k.zip").exists()
    assert len(server.state.requests) == 3


def test_resume_from_existing_part(server, kitchen_zip, tmp_path):
    server.state.files["DKITCHEN_16k.zip"] = kitchen_zip
    cut = len(kitchen_zip) // 3
    (tmp_path / "DKITCHEN_16k.zip.part").write_bytes(kitchen_zip[:cut])
    path = download_environment("DKITCHEN", tmp_path, mirror=server.base, md5=md5(kitchen_zip), **FAST)
    assert path.read_bytes() == kitchen_zip
    assert server.state.requests == [("DKITCHEN_16k.zip", f"bytes={cut}-")]
    assert server.state.sent == [len(kitchen_zip) - cut]


def test_server_ignoring_range_restarts_from_zero(server, kitchen_zip, tmp_path):
    server.state.files["DKITCHEN_16k.zip"] = kitchen_zip
    server.state.ignore_range = True
    (tmp_path / "DKITCHEN_16k.zip.part").write_bytes(kitchen_zip[:500])
    path = download_environment("DKITCHEN", tmp_path, mirror=server.base, md5=md5(kitchen_zip), **FAST)
    assert path.read_bytes() == kitchen_zip  # the 200 body was not appended to the old prefix


def test_stale_part_with_wrong_bytes_is_not_trusted(server, kitchen_zip, tmp_path):
    server.state.files["DKITCHEN_16k.zip"] = kitchen_zip
    (tmp_path / "DKITCHEN_16k.zip.part").write_bytes(b"x" * 700)  # e.g. from another file version
    path = download_environment("DKITCHEN", tmp_path, mirror=server.base, md5=md5(kitchen_zip), **FAST)
    assert path.read_bytes() == kitchen_zip
    assert [r for _, r in server.state.requests] == ["bytes=700-", None]  # mismatch, then from scratch


def test_part_already_complete_gets_416_and_is_verified(server, kitchen_zip, tmp_path):
    server.state.files["DKITCHEN_16k.zip"] = kitchen_zip
    (tmp_path / "DKITCHEN_16k.zip.part").write_bytes(kitchen_zip)
    path = download_environment("DKITCHEN", tmp_path, mirror=server.base, md5=md5(kitchen_zip), **FAST)
    assert path.read_bytes() == kitchen_zip and len(server.state.requests) == 1


def test_missing_file_is_not_retried(server, tmp_path):
    with pytest.raises(DownloadError, match=r"DKITCHEN_16k\.zip: HTTP 404"):
        download_environment("DKITCHEN", tmp_path, mirror=server.base, md5="0" * 32, retries=3, **FAST)
    assert len(server.state.requests) == 1


def test_environment_names_are_checked(tmp_path):
    with pytest.raises(DownloadError, match="only at 48 kHz"):
        download_environment("SCAFE", tmp_path, **FAST)
    with pytest.raises(DownloadError, match="unknown DEMAND environment"):
        download_environment("KITCHEN", tmp_path, **FAST)


def test_unpinned_file_needs_an_md5(tmp_path, monkeypatch):
    monkeypatch.setitem(demand.DEMAND_16K_MD5, "NPARK", None)
    with pytest.raises(DownloadError, match="no md5 is pinned for NPARK"):
        download_environment("NPARK", tmp_path / "dl", mirror=tmp_path, **FAST)
    assert not (tmp_path / "dl").exists()  # refused before touching anything


def test_local_folder_mirror_with_md5sums(tmp_path, monkeypatch):
    monkeypatch.setitem(demand.DEMAND_16K_MD5, "NPARK", None)
    data = demand_zip("NPARK", channels=2)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "NPARK_16k.zip").write_bytes(data)
    (mirror / "MD5SUMS").write_text(f"{md5(data)}  ./NPARK_16k.zip\n{'1' * 32} *OTHER_16k.zip\n")
    path = download_environment("NPARK", tmp_path / "dl", mirror=mirror, **FAST)
    assert path.read_bytes() == data

    (mirror / "NPARK_16k.zip").write_bytes(data[:-10])  # a damaged mirror copy is caught as well
    with pytest.raises(DownloadError, match=f"expected {md5(data)}"):
        download_environment("NPARK", tmp_path / "dl2", mirror=mirror, retries=0, **FAST)
    assert leftovers(tmp_path / "dl2") == []


def test_http_mirror_md5sums(server, tmp_path, monkeypatch):
    monkeypatch.setitem(demand.DEMAND_16K_MD5, "TBUS", None)
    data = demand_zip("TBUS", channels=1)
    server.state.files.update({"TBUS_16k.zip": data, "MD5SUMS": f"{md5(data)}  TBUS_16k.zip\n".encode()})
    assert download_environment("TBUS", tmp_path, mirror=server.base, **FAST).read_bytes() == data


# ------------------------------------------------------------------------------------------ not a zip
ERROR_PAGE = (b"<!DOCTYPE html>\n<html><head><title>503 Service Unavailable</title></head>\n"
              b"<body><h1>Service Unavailable</h1><p>The mirror is down for maintenance.</p></body></html>\n")
HTML_LOOKS = "starts with '<!DOCTYPE html' — an HTML page, not a zip"


def test_html_page_with_matching_md5sums_is_named_and_kept(server, tmp_path, monkeypatch):
    """An error page saved under the archive's name on a mirror whose MD5SUMS was made from it."""
    monkeypatch.setitem(demand.DEMAND_16K_MD5, "TBUS", None)
    server.state.files.update({"TBUS_16k.zip": ERROR_PAGE, "MD5SUMS": f"{md5(ERROR_PAGE)}  TBUS_16k.zip\n".encode()})
    dl = tmp_path / "downloads"
    with pytest.raises(NotAZipError) as err:
        download_environment("TBUS", dl, mirror=server.base, **FAST)
    message = str(err.value)
    kept = dl / "TBUS_16k.zip.not-a-zip"
    assert "TBUS_16k.zip" in message and f"mirror {server.base}" in message
    assert HTML_LOOKS in message and f"({len(ERROR_PAGE)} bytes)" in message
    assert md5(ERROR_PAGE) in message and f"MD5SUMS of mirror {server.base}" in message
    assert f"kept as {kept}" in message
    assert isinstance(err.value, DownloadError)  # callers that handle download failures catch it too
    # kept byte for byte under a name no rule trusts (nor deletes); no final zip, no .part
    assert leftovers(dl) == ["TBUS_16k.zip.not-a-zip"] and kept.read_bytes() == ERROR_PAGE
    assert [n for n, _ in server.state.requests].count("TBUS_16k.zip") == 1  # not retried: it would not change


def test_html_page_in_a_folder_mirror_with_explicit_md5_and_already_downloaded(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "NPARK_16k.zip").write_bytes(b"\xef\xbb\xbf  " + ERROR_PAGE)  # BOM and blanks first
    with pytest.raises(NotAZipError, match=f"from mirror {re.escape(str(mirror))} .*{re.escape(HTML_LOOKS)}"):
        download_environment("NPARK", tmp_path / "dl", mirror=mirror, md5=md5(b"\xef\xbb\xbf  " + ERROR_PAGE), **FAST)
    assert leftovers(tmp_path / "dl") == ["NPARK_16k.zip.not-a-zip"]

    # a file already at the final name (an older download) is checked as well, and moved aside
    (tmp_path / "dl2").mkdir()
    (tmp_path / "dl2" / "NPARK_16k.zip").write_bytes(ERROR_PAGE)
    with pytest.raises(NotAZipError, match=r"kept as .*dl2/NPARK_16k.zip.not-a-zip"):
        download_environment("NPARK", tmp_path / "dl2", mirror=mirror, md5=md5(ERROR_PAGE), **FAST)
    assert leftovers(tmp_path / "dl2") == ["NPARK_16k.zip.not-a-zip"]


def test_html_page_against_a_pinned_md5_is_a_mismatch_that_says_what_came(server, tmp_path, monkeypatch):
    monkeypatch.setitem(demand.DEMAND_16K_MD5, "TBUS", "0" * 32)
    server.state.files["TBUS_16k.zip"] = ERROR_PAGE
    with pytest.raises(DownloadError, match=f"(?s)md5 mismatch.*{re.escape(HTML_LOOKS)}") as err:
        download_environment("TBUS", tmp_path, mirror=server.base, retries=0, **FAST)
    assert not isinstance(err.value, NotAZipError) and leftovers(tmp_path) == []


@pytest.mark.parametrize("data,looks", [
    (ERROR_PAGE, HTML_LOOKS),
    (b"", "is empty (0 bytes), not a zip"),
    (b'{"message": "Not Found"}', "starts with '{\"message\": \"N' — JSON text, not a zip"),
    (None, "the start of a zip whose end is missing or damaged"),
    (bytes(range(256)), "unrecognized binary data, not a zip"),
])
def test_safe_extract_names_what_a_non_zip_is(tmp_path, kitchen_zip, data, looks):
    path = tmp_path / "DKITCHEN_16k.zip"
    path.write_bytes(kitchen_zip[: len(kitchen_zip) // 2] if data is None else data)
    with pytest.raises(NotAZipError, match=re.escape(f"{path}: cannot be extracted: it ") + ".*" + re.escape(looks)):
        safe_extract(path, tmp_path / "noise")
    assert path.exists() and not (tmp_path / "noise" / "DKITCHEN").exists()


# ------------------------------------------------------------------------------------------ extraction

def hostile_zip(path: Path, member: str, symlink: bool = False) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("DKITCHEN/ch01.wav", wav_bytes(1))  # a good member first: must not be written either
        info = zipfile.ZipInfo(member)
        if symlink:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "../../../outside" if symlink else "pwned")


@pytest.mark.parametrize("member, symlink", [
    ("../evil.txt", False),
    ("DKITCHEN/../../evil.txt", False),
    ("/tmp/asrflow-absolute-evil.txt", False),
    ("DKITCHEN/link", True),
])
def test_hostile_archive_is_refused(tmp_path, member, symlink):
    archive = tmp_path / "hostile.zip"
    hostile_zip(archive, member, symlink)
    target = tmp_path / "a" / "target"
    with pytest.raises(UnsafeArchiveError) as err:
        safe_extract(archive, target)
    assert repr(member) in str(err.value)
    assert leftovers(target) == []
    assert not (tmp_path / "a" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/asrflow-absolute-evil.txt").exists()


def test_extract_replaces_old_copy_and_cleans_stale_staging(tmp_path, kitchen_zip):
    archive = tmp_path / "DKITCHEN_16k.zip"
    archive.write_bytes(kitchen_zip)
    target = tmp_path / "noise"
    (target / "DKITCHEN").mkdir(parents=True)
    (target / "DKITCHEN" / "stale.wav").write_bytes(b"old")
    (target / ".DKITCHEN_16k.zip.extracting-killed").mkdir()  # what a killed job leaves
    files = safe_extract(archive, target, members_prefix="DKITCHEN/ch0")
    assert sorted(f.name for f in files) == [f"ch0{i}.wav" for i in range(1, 10)]
    assert leftovers(target) == ["DKITCHEN"]
    assert not (target / "DKITCHEN" / "stale.wav").exists()


# ------------------------------------------------------------------------------------------ manifest

def test_select_channels(tmp_path):
    env_dir = write_env_dir(tmp_path, "DKITCHEN", channels=(1, 5))
    assert select_channels(env_dir, [5, 1]) == [env_dir / "ch05.wav", env_dir / "ch01.wav"]
    with pytest.raises(NoiseDataError, match="ch09.wav: missing"):
        select_channels(env_dir, [1, 9])
    with pytest.raises(NoiseDataError, match="out of range"):
        select_channels(env_dir, [17])
    with pytest.raises(NoiseDataError, match="duplicate"):
        select_channels(env_dir, [1, 1])
    wrong = write_env_dir(tmp_path, "NPARK", channels=(1,), sr=48000)
    with pytest.raises(NoiseDataError, match="expected 16000 Hz mono"):
        select_channels(wrong, [1])


def test_noise_manifest_splits_and_levels(tmp_path):
    envs = {e: write_env_dir(tmp_path / "noise", e) for e in ("DKITCHEN", "NPARK", "TBUS")}
    records = build_noise_manifest(envs, train_envs=["DKITCHEN", "TBUS"], heldout_envs=["NPARK"], channels=[1, 3])
    assert [r["id"] for r in records] == ["demand-DKITCHEN-ch01", "demand-DKITCHEN-ch03", "demand-NPARK-ch01",
                                          "demand-NPARK-ch03", "demand-TBUS-ch01", "demand-TBUS-ch03"]
    assert {r["env"]: r["split"] for r in records} == {"DKITCHEN": "train", "NPARK": "heldout", "TBUS": "train"}
    first = records[0]
    assert set(first) == set(demand.NOISE_FIELDS) and first["channel"] == 1 and first["sample_rate"] == SR
    assert abs(first["duration"] - 0.05) < 0.005
    samples, _ = sf.read(first["audio"], dtype="float32")
    assert abs(first["rms_dbfs"] - 20 * math.log10(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))) < 0.01

    out = tmp_path / "manifests" / "noise.jsonl"
    assert write_noise_manifest(out, records) == 6
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == [r["id"] for r in records]
    back = read_noise_manifest(out)
    assert [Path(r["audio"]).resolve() for r in back] == [Path(r["audio"]).resolve() for r in records]


def test_noise_manifest_env_assignment_errors(tmp_path):
    envs = {e: write_env_dir(tmp_path, e, channels=(1,)) for e in ("DKITCHEN", "NPARK")}
    with pytest.raises(NoiseDataError, match="DKITCHEN are in both"):
        build_noise_manifest(envs, ["DKITCHEN"], ["DKITCHEN", "NPARK"], [1])
    with pytest.raises(NoiseDataError, match="NPARK are assigned to neither"):
        build_noise_manifest(envs, ["DKITCHEN"], [], [1])
    with pytest.raises(NoiseDataError, match="TCAR are assigned to a split but have no folder"):
        build_noise_manifest(envs, ["DKITCHEN"], ["NPARK", "TCAR"], [1])


def test_silent_channel_is_refused(tmp_path):
    env_dir = tmp_path / "DKITCHEN"
    env_dir.mkdir()
    sf.write(str(env_dir / "ch01.wav"), np.zeros(800, dtype=np.float32), SR, subtype="PCM_16")
    with pytest.raises(NoiseDataError, match="digital silence"):
        build_noise_manifest({"DKITCHEN": env_dir}, ["DKITCHEN"], [], [1])
