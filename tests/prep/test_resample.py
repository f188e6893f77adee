import numpy as np
import pytest
import soundfile as sf

from asrflow.audio import read_audio
from asrflow.manifest import Utterance, read_manifest, read_records, write_manifest
from asrflow.prep.resample import (ResampleSettings, active_rms_dbfs, inspect_source, resample_shard,
                                   run_resample_shard, shard_of)


def tone(sr, seconds, level_db, channels=1, freq=440.0):
    t = np.arange(int(sr * seconds)) / sr
    x = np.sin(2 * np.pi * freq * t) * 10 ** (level_db / 20) * np.sqrt(2)  # RMS = level_db
    # a speech-like envelope: sound, pause, sound
    x[int(len(x) * 0.4):int(len(x) * 0.5)] = 0
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def utt(uid, path, text="HELLO WORLD", sr=16000, dur=1.0):
    return Utterance(id=uid, audio=str(path), text=text, duration=dur, sample_rate=sr, speaker="s1",
                     dialect="en-us", split="train")


@pytest.fixture
def settings():
    return ResampleSettings()


def test_resample_converts_rate_channels_and_normalizes_loudness(tmp_path, settings):
    quiet = tmp_path / "quiet.wav"
    loud = tmp_path / "loud.wav"
    sf.write(quiet, tone(22050, 2.0, -40, channels=2), 22050)
    sf.write(loud, tone(8000, 2.0, -12), 8000)
    kept, bad = resample_shard([utt("a", quiet), utt("b", loud)], tmp_path, tmp_path / "out", tmp_path / "q", settings)
    assert bad == []
    levels = []
    for u in kept:
        info = sf.info(u.audio)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert abs(info.duration - 2.0) < 0.01
        x, _ = read_audio(u.audio)
        levels.append(active_rms_dbfs(x, 16000))
    # 28 dB apart before, within 1 dB of the target after
    assert all(abs(level - settings.target_rms_dbfs) < 1.0 for level in levels), levels
    assert kept[0].extra["source_sample_rate"] == 22050 and kept[0].extra["source_channels"] == 2


def test_peak_ceiling_limits_gain(tmp_path, settings):
    # a single loud click in near silence: reaching -23 dB RMS would clip, so gain stops at the ceiling
    x = np.full(16000, 1e-3, dtype=np.float32)
    x[100] = 0.5
    path = tmp_path / "click.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    kept, bad = resample_shard([utt("c", path)], tmp_path, tmp_path / "out", tmp_path / "q", settings)
    y, _ = read_audio(kept[0].audio)
    assert 20 * np.log10(np.abs(y).max()) <= settings.peak_ceiling_dbfs + 0.1


@pytest.mark.parametrize("kind,reason", [
    ("corrupt", "unreadable"), ("empty", "empty"), ("silent", "silent"), ("clipped", "clipped"), ("nan", "non-finite"),
    ("missing", "unreadable"),
])
def test_bad_audio_is_quarantined_and_the_rest_goes_on(tmp_path, settings, kind, reason):
    good = tmp_path / "good.wav"
    sf.write(good, tone(16000, 1.0, -20), 16000)
    bad_path = tmp_path / f"{kind}.wav"
    if kind == "corrupt":
        bad_path.write_bytes(b"RIFF\x00\x00garbage-not-a-wave-file")
    elif kind == "empty":
        sf.write(bad_path, np.zeros(0, dtype=np.float32), 16000)
    elif kind == "silent":
        sf.write(bad_path, np.zeros(16000, dtype=np.float32), 16000)
    elif kind == "clipped":
        sf.write(bad_path, np.clip(tone(16000, 1.0, 0) * 4, -1, 1), 16000)
    elif kind == "nan":
        x = tone(16000, 1.0, -20).astype(np.float32)
        x[10] = np.nan
        sf.write(bad_path, x, 16000, subtype="FLOAT")
    kept, bad = resample_shard([utt("good", good), utt("bad", bad_path)], tmp_path, tmp_path / "out",
                               tmp_path / "q", settings)
    assert [u.id for u in kept] == ["good"]
    assert len(bad) == 1 and bad[0]["id"] == "bad" and reason in bad[0]["reason"]
    assert bad[0]["kind"] == {"corrupt": "unreadable", "missing": "unreadable", "nan": "non_finite"}.get(kind, kind)
    if kind != "missing":
        assert (tmp_path / "q" / "bad.wav").exists(), "the offending file is kept for inspection"


def test_bad_transcript_is_quarantined(tmp_path, settings):
    path = tmp_path / "a.wav"
    sf.write(path, tone(16000, 1.0, -20), 16000)
    kept, bad = resample_shard([utt("a", path, text="!!! ???")], tmp_path, tmp_path / "out", tmp_path / "q", settings)
    assert kept == [] and "bad transcript" in bad[0]["reason"]


def test_inspect_source_accepts_normal_speech_level():
    assert inspect_source(tone(16000, 1.0, -30).astype(np.float32), ResampleSettings()) is None


def test_shards_partition_the_corpus_stably(tmp_path, settings):
    ids = [f"utt{i:03d}" for i in range(200)]
    shards = [shard_of(i, 4) for i in ids]
    assert set(shards) == {0, 1, 2, 3}
    assert shards == [shard_of(i, 4) for i in ids]


def test_run_resample_shard_writes_manifest_relative_to_itself(tmp_path, settings):
    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(6):
        sf.write(src / f"u{i}.wav", tone(22050, 0.5, -20 - i), 22050)
    write_manifest(src / "manifest.jsonl", [utt(f"u{i}", src / f"u{i}.wav", dur=0.5) for i in range(6)])
    total = 0
    for shard in range(2):
        out = tmp_path / "prep" / f"shard_{shard}.jsonl"
        stats = run_resample_shard(src / "manifest.jsonl", shard, 2, out, tmp_path / "prep" / f"q{shard}.jsonl",
                                   tmp_path / "prep" / f"wav_{shard}", settings)
        total += stats["utterances_out"]
        assert not any(r["audio"].startswith("/") for r in read_records(out))
        assert all(sf.info(u.audio).samplerate == 16000 for u in read_manifest(out))
    assert total == 6
