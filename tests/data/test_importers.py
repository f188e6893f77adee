"""Importers on tiny corpora built in tmp_path in each native layout, with synthetic audio."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asrflow.audio import AudioError, run_sox
from asrflow.data import importers
from asrflow.data.importers import (ImportResult, UnsupportedLayoutError, dialect_slug, import_common_voice,
                                    import_corpus, import_kaldi, import_librispeech, import_manifest,
                                    normalize_transcript, write_import_report)
from asrflow.manifest import ManifestError, write_manifest

SR = 16000
TOL = 0.005  # durations must match the synthesized length within 5 ms


def tone(path: Path, seconds: float, sr: int = SR, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(round(seconds * sr))) / sr
    sf.write(str(path), (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr, format=fmt)
    return path


def garbage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    return path


def by_id(result: ImportResult) -> dict:
    return {u.id: u for u in result.utterances}


def rejects(result: ImportResult) -> dict[str, str]:
    return {r.id: r.kind for r in result.rejects}


# -------------------------------------------------------------------------------------- helpers

def test_normalize_transcript_refuses_lossy_lines():
    assert normalize_transcript("Hello, world! It's 4 o'clock.") == ("HELLO WORLD IT'S FOUR O'CLOCK", None)
    assert normalize_transcript("Café déjà vu") == ("CAFE DEJA VU", None)
    for line, why in [("?!...", "empty"), ("hello 世界", "outside A-Z"), ("AT&T", "spoken symbol"),
                      ("[noise] hello <unk>", "markup token(s) [noise] <unk>")]:
        text, reason = normalize_transcript(line)
        assert text is None and why in reason


def test_dialect_slug():
    assert dialect_slug("United States English") == "united-states-english"
    assert dialect_slug("  England English|Scottish ") == "england-english-scottish"
    assert dialect_slug("") == dialect_slug(None) == "unknown"


# -------------------------------------------------------------------------------------- LibriSpeech

@pytest.fixture
def librispeech(tmp_path) -> Path:
    root = tmp_path / "LibriSpeech"
    chapter = root / "train-clean-100" / "19" / "198"
    lines = {"19-198-0000": ("NORTHANGER ABBEY", 0.5), "19-198-0001": ("THIS LITTLE WORK", 0.75),
             "19-198-0002": ("WAS FINISHED IN THE YEAR", 1.0)}
    for uid, (_, seconds) in lines.items():
        tone(chapter / f"{uid}.flac", seconds)
    garbage(chapter / "19-198-0003.flac")  # corrupt audio
    tone(chapter / "19-198-0009.flac", 0.3)  # audio without a transcript line
    (chapter / "19-198.trans.txt").write_text(
        "".join(f"{uid} {text}\n" for uid, (text, _) in lines.items())
        + "19-198-0003 CORRUPT FILE\n19-198-0004 NO AUDIO HERE\n")
    dev = root / "dev-clean" / "84" / "121123"
    tone(dev / "84-121123-0000.flac", 0.6)
    tone(dev / "84-121123-0001.flac", 0.4)
    (dev / "84-121123.trans.txt").write_text("84-121123-0000 GO DO YOU HEAR\n84-121123-0001 你好\n")
    tone(root / "my-extras" / "1" / "2" / "1-2-0000.flac", 0.2)
    (root / "my-extras" / "1" / "2" / "1-2.trans.txt").write_text("1-2-0000 HI\n")
    (root / "SPEAKERS.TXT").write_text("; not a folder\n")
    return root


def test_librispeech_import(librispeech):
    result = import_librispeech(librispeech)
    utts = by_id(result)
    assert sorted(utts) == ["19-198-0000", "19-198-0001", "19-198-0002", "84-121123-0000"]
    u = utts["19-198-0001"]
    assert (u.text, u.speaker, u.dialect, u.split, u.sample_rate) == ("THIS LITTLE WORK", "19", "en-us", "train", SR)
    assert abs(u.duration - 0.75) < TOL and Path(u.audio).is_absolute() and Path(u.audio).is_file()
    assert u.extra == {"corpus": "librispeech", "subset": "train-clean-100", "chapter": "198"}
    assert utts["84-121123-0000"].split == "dev" and abs(utts["84-121123-0000"].duration - 0.6) < TOL
    assert rejects(result) == {"19-198-0003": "unreadable_audio", "19-198-0004": "missing_audio",
                               "19-198-0009": "no_transcript", "84-121123-0001": "bad_transcript",
                               "my-extras": "no_split"}
    reasons = {r.id: r.reason for r in result.rejects}
    assert "19-198-0003.flac" in reasons["19-198-0003"] and "outside A-Z" in reasons["84-121123-0001"]


def test_librispeech_split_map_selects_and_maps(librispeech):
    result = import_librispeech(librispeech, split_map={"dev-clean": "test", "my-extras": "train"})
    assert {u.id: u.split for u in result.utterances} == {"84-121123-0000": "test", "1-2-0000": "train"}
    with pytest.raises(FileNotFoundError, match="train-other-500"):
        import_librispeech(librispeech, split_map={"train-other-500": "train"})
    with pytest.raises(ValueError, match="not one of"):
        import_librispeech(librispeech, split_map={"dev-clean": "validation"})


def test_librispeech_subset_folder_as_root(librispeech):
    result = import_librispeech(librispeech / "dev-clean")
    assert [u.id for u in result.utterances] == ["84-121123-0000"]


# -------------------------------------------------------------------------------------- Common Voice

def make_clip(clips: Path, name: str, seconds: float) -> str:
    """An mp3 made with sox (libsox-fmt-all); falls back to wav where sox cannot write mp3."""
    clips.mkdir(parents=True, exist_ok=True)
    try:
        run_sox(["-n", "-r", str(SR), "-c", "1", str(clips / f"{name}.mp3"), "synth", str(seconds), "sine", "440"])
        return f"{name}.mp3"
    except AudioError:
        tone(clips / f"{name}.wav", seconds)
        return f"{name}.wav"


CV_HEADER = ["client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes", "age",
             "gender", "accents", "variant", "locale", "segment"]


def cv_table(path: Path, rows: list[dict], header=CV_HEADER) -> None:
    lines = ["\t".join(header)] + ["\t".join(str(row.get(col, "")) for col in header) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def common_voice(tmp_path) -> Path:
    root = tmp_path / "cv-corpus" / "en"
    clips = root / "clips"
    a = make_clip(clips, "common_voice_en_1", 0.5)
    b = make_clip(clips, "common_voice_en_2", 0.8)
    c = make_clip(clips, "common_voice_en_3", 0.4)
    d = make_clip(clips, "common_voice_en_4", 0.6)
    (clips / "common_voice_en_5.mp3").write_text("not audio at all")
    cv_table(root / "train.tsv", [
        {"client_id": "spk1", "path": a, "sentence": 'He said "hello" to me.', "accents": "United States English",
         "age": "twenties", "gender": "male_masculine", "locale": "en"},
        {"client_id": "spk2", "path": b, "sentence": "Good morning", "accents": ""},
        {"client_id": "spk2", "path": "common_voice_en_404.mp3", "sentence": "missing clip"},
        {"client_id": "spk3", "path": "common_voice_en_5.mp3", "sentence": "corrupt clip"},
    ])
    cv_table(root / "dev.tsv", [{"client_id": "spk4", "path": c, "sentence": "¿¡...!?", "accents": "India"}])
    cv_table(root / "test.tsv", [{"client_id": "spk5", "path": d, "sentence": "Testing one two",
                                  "accents": "England English"}])
    cv_table(root / "validated.tsv", [{"client_id": "spk1", "path": a, "sentence": "x"}])
    return root


def test_common_voice_import(common_voice):
    result = import_common_voice(common_voice)
    utts = by_id(result)
    assert sorted(utts) == ["common_voice_en_1", "common_voice_en_2", "common_voice_en_4"]
    u = utts["common_voice_en_1"]
    assert (u.text, u.speaker, u.dialect, u.split) == ('HE SAID HELLO TO ME', "spk1", "united-states-english", "train")
    assert u.extra["accent"] == "United States English" and u.extra["age"] == "twenties"
    assert u.sample_rate == SR
    # mp3 headers include encoder padding, so compare with what soundfile (read_audio) will decode
    info = sf.info(u.audio)
    assert abs(u.duration - info.frames / info.samplerate) < TOL and abs(u.duration - 0.5) < 0.1
    assert utts["common_voice_en_2"].dialect == "unknown"
    assert (utts["common_voice_en_4"].split, utts["common_voice_en_4"].dialect) == ("test", "england-english")
    assert rejects(result) == {"common_voice_en_404": "missing_audio", "common_voice_en_5": "unreadable_audio",
                               "common_voice_en_3": "bad_transcript"}


def test_common_voice_validated_duplicates_and_old_accent_column(common_voice):
    result = import_common_voice(common_voice, split_map={"train": "train", "validated": "train"})
    assert rejects(result)["common_voice_en_1"] == "duplicate"
    header = [c if c != "accents" else "accent" for c in CV_HEADER]
    cv_table(common_voice / "old.tsv", [{"client_id": "s", "path": "common_voice_en_4.mp3"
                                         if (common_voice / "clips" / "common_voice_en_4.mp3").exists()
                                         else "common_voice_en_4.wav", "sentence": "ok", "accent": "scotland"}],
             header=header)
    old = import_common_voice(common_voice, split_map={"old.tsv": "dev"})
    assert [(u.dialect, u.split) for u in old.utterances] == [("scotland", "dev")]


def test_soxi_fallback_when_soundfile_cannot_read(common_voice, monkeypatch):
    def refuse(path):
        raise AudioError(f"{path}: pretend libsndfile has no mp3")
    monkeypatch.setattr(importers, "audio_info", refuse)
    result = import_common_voice(common_voice, split_map={"test": "test"})
    (u,) = result.utterances
    assert u.extra["decoder"] == "sox" and abs(u.duration - 0.6) < 0.1 and u.sample_rate == SR


# -------------------------------------------------------------------------------------- Kaldi

@pytest.fixture
def kaldi(tmp_path) -> Path:
    audio = tmp_path / "audio"
    data = tmp_path / "data" / "train"
    data.mkdir(parents=True)
    tone(audio / "u1.wav", 0.5)
    tone(audio / "u2.wav", 0.7)
    tone(audio / "u3.flac", 0.9)
    garbage(audio / "u4.wav")
    for name in ("u6", "u7", "u8", "u9"):
        tone(audio / f"{name}.wav", 0.3)
    (data / "wav.scp").write_text(
        f"u1 {audio / 'u1.wav'}\n"
        "u2 audio/u2.wav\n"  # relative: resolved against audio_root, like Kaldi's recipe folder
        f"u3 sox {audio / 'u3.flac'} -r 16000 -t wav - |\n"
        f"u4 {audio / 'u4.wav'}\n"
        f"u5 {audio / 'u5.wav'}\n"
        f"u6 sph2pipe -f wav {audio / 'u6.wav'} |\n"
        f"u7 sox {audio / 'u7.wav'} -t wav - remix 1 |\n"
        f"u8 {audio / 'u8.wav'}\n"
        f"u9 {audio / 'u9.wav'}\n")
    (data / "text").write_text("u1 HELLO THERE\nu2 good night\nu3 sox piped\nu4 corrupt\nu5 missing\n"
                               "u6 sphere\nu7 effects\nu8 no speaker\nu9 <unk> went home\nu10 text only\n")
    (data / "utt2spk").write_text("\n".join(f"u{i} s{i % 2}" for i in range(1, 11) if i != 8) + "\n")
    (data / "utt2dialect").write_text("u2 Scottish English\n")
    return data


def test_kaldi_import(kaldi):
    result = import_kaldi(kaldi, split="dev", dialect="en-us", audio_root=kaldi.parent.parent)
    utts = by_id(result)
    assert sorted(utts) == ["u1", "u2", "u3"]
    assert (utts["u1"].text, utts["u1"].speaker, utts["u1"].dialect, utts["u1"].split) == ("HELLO THERE", "s1",
                                                                                          "en-us", "dev")
    assert utts["u2"].dialect == "scottish-english" and Path(utts["u2"].audio).is_file()
    assert utts["u3"].audio.endswith("u3.flac") and utts["u3"].extra["wav_scp"].startswith("sox ")
    for uid, seconds in (("u1", 0.5), ("u2", 0.7), ("u3", 0.9)):
        assert abs(utts[uid].duration - seconds) < TOL and utts[uid].sample_rate == SR
    assert rejects(result) == {"u4": "unreadable_audio", "u5": "missing_audio", "u6": "unsupported_audio",
                               "u7": "unsupported_audio", "u8": "no_speaker", "u9": "bad_transcript",
                               "u10": "no_audio_entry"}
    reasons = {r.id: r.reason for r in result.rejects}
    assert "only 'sox <file>" in reasons["u6"] and "<unk>" in reasons["u9"]


def test_kaldi_segments_and_missing_files(kaldi, tmp_path):
    with pytest.raises(ValueError, match="split 'validation'"):
        import_kaldi(kaldi, split="validation")
    (kaldi / "segments").write_text("u1 rec1 0.0 0.5\n")
    with pytest.raises(UnsupportedLayoutError, match="segments"):
        import_kaldi(kaldi, split="train")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="missing wav.scp"):
        import_kaldi(empty, split="train")


# -------------------------------------------------------------------------------------- user manifest

def test_user_manifest(tmp_path):
    folder = tmp_path / "mine"
    tone(folder / "wavs" / "a.wav", 0.5)
    tone(folder / "wavs" / "b.wav", 0.25)
    tone(folder / "wavs" / "c.wav", 0.25)
    base = {"sample_rate": 16000, "speaker": "me", "dialect": "en_GB", "split": "train"}
    records = [
        {**base, "id": "a", "audio": "wavs/a.wav", "text": "first one", "duration": 9.0, "mood": "calm"},
        {**base, "id": "b", "audio": str(folder / "wavs" / "b.wav"), "text": "second", "duration": 0.25},
        {**base, "id": "c", "audio": "wavs/c.wav", "text": "third", "duration": 0.25, "split": "holdout"},
        {**base, "id": "d", "audio": "wavs/nope.wav", "text": "fourth", "duration": 1.0},
    ]
    manifest = folder / "mine.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = import_manifest(manifest)
    utts = by_id(result)
    assert sorted(utts) == ["a", "b"]
    a = utts["a"]
    assert (a.text, a.dialect, a.extra) == ("FIRST ONE", "en-gb", {"mood": "calm"})
    assert abs(a.duration - 0.5) < TOL  # the header wins over the declared 9.0 s
    assert Path(a.audio) == (folder / "wavs" / "a.wav").resolve()
    assert rejects(result) == {"c": "no_split", "d": "missing_audio"}
    # corpus.split only fills lines without a split: a line's own split is never overridden
    assert {u.id: u.split for u in import_manifest(manifest, split="test").utterances} == {"a": "train", "b": "train"}

    out = tmp_path / "out" / "m.jsonl"  # what the importer produced is a valid manifest again
    write_manifest(out, result.utterances)
    assert [u.id for u in import_manifest(out).utterances] == ["a", "b"]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_bare_manifest_measures_audio_and_takes_corpus_split(tmp_path):
    """Only id, audio, text (+ optional speaker, dialect, split): the rest is measured or defaulted."""
    folder = tmp_path / "bare"
    tone(folder / "a.wav", 1.25, sr=16000)
    tone(folder / "b.flac", 0.8, sr=22050, fmt="FLAC")
    tone(folder / "c.wav", 2.0, sr=8000)
    garbage(folder / "broken.wav")
    sf.write(str(folder / "empty.wav"), np.zeros(0, dtype=np.float32), 16000)
    manifest = write_jsonl(folder / "bare.jsonl", [
        {"id": "a", "audio": "a.wav", "text": "hello there"},
        {"id": "b", "audio": "b.flac", "text": "General Kenobi", "speaker": "obi", "dialect": "en_GB"},
        {"id": "c", "audio": str(folder / "c.wav"), "text": "telephone", "split": "test", "channel": "pstn"},
        {"id": "broken", "audio": "broken.wav", "text": "cannot be read"},
        {"id": "empty", "audio": "empty.wav", "text": "no samples"},
        {"id": "gone", "audio": "gone.wav", "text": "not there"},
    ])
    result = import_manifest(manifest, split="train")
    utts = by_id(result)
    assert sorted(utts) == ["a", "b", "c"]
    # duration and sample rate are the files' own, read from their headers
    assert (utts["a"].sample_rate, utts["b"].sample_rate, utts["c"].sample_rate) == (16000, 22050, 8000)
    assert abs(utts["a"].duration - 1.25) < TOL and abs(utts["b"].duration - 0.8) < TOL
    assert abs(utts["c"].duration - 2.0) < TOL
    assert (utts["a"].split, utts["b"].split, utts["c"].split) == ("train", "train", "test")
    assert (utts["a"].speaker, utts["a"].dialect) == ("unknown", "unknown")
    assert (utts["b"].speaker, utts["b"].dialect, utts["b"].text) == ("obi", "en-gb", "GENERAL KENOBI")
    assert utts["c"].extra == {"channel": "pstn"}
    assert rejects(result) == {"broken": "unreadable_audio", "empty": "unreadable_audio", "gone": "missing_audio"}
    reasons = {r.id: r for r in result.rejects}
    assert "broken.wav" in reasons["broken"].reason and reasons["broken"].source == f"{manifest}:4"
    assert "empty audio" in reasons["empty"].reason

    # what the workflow writes (workflow_scripts/import_corpus.py): a full manifest and the rejects
    write_manifest(tmp_path / "out" / "manifest.jsonl", result.utterances)
    write_manifest(tmp_path / "out" / "rejects.jsonl", [r.to_dict() for r in result.rejects], relative_audio=False)
    lines = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(x["id"], x["kind"]) for x in lines] == [("broken", "unreadable_audio"), ("empty", "unreadable_audio"),
                                                    ("gone", "missing_audio")]
    assert all(x["reason"] for x in lines)
    again = import_manifest(tmp_path / "out" / "manifest.jsonl")  # a full manifest imports again as is
    assert {u.id: (u.split, u.sample_rate) for u in again.utterances} == {
        "a": ("train", 16000), "b": ("train", 22050), "c": ("test", 8000)}


def test_bare_manifest_declared_duration_and_rate_are_not_trusted(tmp_path):
    tone(tmp_path / "a.wav", 0.5, sr=16000)
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "a", "audio": "a.wav", "text": "x", "duration": "long", "sample_rate": 44100, "split": "dev"}])
    (utt,) = import_manifest(manifest).utterances
    assert (utt.sample_rate, abs(utt.duration - 0.5) < TOL, utt.split, utt.extra) == (16000, True, "dev", {})


def test_bare_manifest_errors_name_the_line_and_what_cannot_be_guessed(tmp_path):
    tone(tmp_path / "a.wav", 0.5)
    no_split = write_jsonl(tmp_path / "no_split.jsonl", [{"id": "a", "audio": "a.wav", "text": "x"}])
    with pytest.raises(ManifestError, match=r"no_split.jsonl:1: 'a' has no split and corpus.split is not set"):
        import_manifest(no_split)
    with pytest.raises(ValueError, match="split 'holdout' is not one of train, dev, test"):
        import_manifest(no_split, split="holdout")
    no_text = write_jsonl(tmp_path / "no_text.jsonl", [{"id": "a", "audio": "a.wav", "text": "x"},
                                                      {"id": "b", "audio": "a.wav"}])
    with pytest.raises(ManifestError, match=r"no_text.jsonl:2: missing or empty field\(s\) text;.*read from the audio"):
        import_manifest(no_text, split="train")
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": "a", "audio": "a.wav", "text": "x"}] * 2)
    with pytest.raises(ManifestError, match=r"dup.jsonl:2: duplicate utterance id 'a' \(first at line 1\)"):
        import_manifest(dup, split="train")
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "audio": "a.wav", "text": "x"}\n{oops\n')
    with pytest.raises(ManifestError, match=r"bad.jsonl:2: not valid JSON"):
        import_manifest(tmp_path / "bad.jsonl", split="train")
    # through the dispatcher, as the workflow calls it with corpus.split
    assert [u.split for u in import_corpus("manifest", no_split, split="dev").utterances] == ["dev"]


# -------------------------------------------------------------------------------------- dispatch + report

def test_import_corpus_dispatch_and_report(librispeech, tmp_path):
    result = import_corpus("LibriSpeech", librispeech, split_map={"dev-clean": "dev"})
    assert [u.id for u in result.utterances] == ["84-121123-0000"]
    with pytest.raises(ValueError, match="unknown corpus kind 'timit'.*librispeech"):
        import_corpus("timit", librispeech)

    report = tmp_path / "report.json"
    write_import_report(report, result, corpus="librispeech", root=str(librispeech))
    data = json.loads(report.read_text())
    assert data["imported"] == 1 and data["rejected"] == 1 and data["corpus"] == "librispeech"
    assert data["rejects_per_kind"] == {"bad_transcript": 1}
    assert data["rejects"][0]["id"] == "84-121123-0001" and data["utterances_per_split"] == {"dev": 1}
