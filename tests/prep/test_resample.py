import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from asrflow.audio import read_audio, rms_dbfs
from asrflow.corpus.noise import render_environment
from asrflow.manifest import Utterance, read_manifest, read_records, write_manifest
from asrflow.prep.resample import (ResampleSettings, active_rms_dbfs, frame_levels_dbfs, inspect_source, resample_shard,
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
    # a single loud click in quiet speech: reaching -23 dB RMS would clip, so gain stops at the ceiling
    x = tone(16000, 1.0, -50).astype(np.float32)
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


# -------------------------------------------------------------------------------- silence vs quiet

def dbfs(x):
    return 20 * np.log10(np.max(np.abs(x)))


def rise_above_floor(x, sr):
    """dB from the noise floor (5th percentile of 20-ms frame levels) to the loud frames (95th)."""
    levels = frame_levels_dbfs(x, sr)
    return float(np.percentile(levels, 95) - np.percentile(levels, 5))


@pytest.fixture(scope="module")
def espeak_speech(tmp_path_factory):
    """Real synthesized speech (espeak-ng, 22.05 kHz), float64, with its own short pauses."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (scripts/install.sh installs it)")
    path = tmp_path_factory.mktemp("espeak") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "the quick brown fox jumps over the lazy dog"], check=True)
    x, sr = sf.read(path, dtype="float64")
    return x, sr


def at_rms(x, level_dbfs):
    return x * 10 ** ((level_dbfs - rms_dbfs(x)) / 20)


def test_quiet_clean_speech_is_kept_and_normalized_like_loud_speech(tmp_path, settings, espeak_speech):
    speech, sr = espeak_speech
    rng = np.random.default_rng(0)
    # speech at -61 dBFS RMS over a microphone floor at -95 dBFS RMS: quiet, but 34 dB above its floor
    quiet = at_rms(speech, -61.0) + rng.standard_normal(len(speech)) * 10 ** (-95 / 20)
    loud = at_rms(speech, -20.0) + rng.standard_normal(len(speech)) * 10 ** (-54 / 20)
    assert rms_dbfs(quiet) < settings.silence_dbfs  # what the absolute-RMS rule quarantined as "silent"
    sf.write(tmp_path / "quiet.wav", quiet, sr, subtype="PCM_16")
    sf.write(tmp_path / "loud.wav", loud, sr, subtype="PCM_16")
    kept, bad = resample_shard([utt("quiet", tmp_path / "quiet.wav", sr=sr), utt("loud", tmp_path / "loud.wav", sr=sr)],
                               tmp_path, tmp_path / "out", tmp_path / "q", settings)
    assert bad == []
    out = {u.id: read_audio(u.audio)[0] for u in kept}
    for uid, y in out.items():
        assert abs(active_rms_dbfs(y, 16000) - settings.target_rms_dbfs) < 1.0, uid  # at the target level
        assert dbfs(y) <= settings.peak_ceiling_dbfs + 0.1, uid                      # under the ceiling
    gains = {u.id: u.extra["gain_db"] for u in kept}
    assert abs(gains["quiet"] - gains["loud"] - 41.0) < 0.5  # 41 dB more gain for the 41 dB quieter file
    # rescued: the same speech at the same level as the loud recording, its floor still ~34 dB below
    assert abs(active_rms_dbfs(out["quiet"], 16000) - active_rms_dbfs(out["loud"], 16000)) < 0.2
    assert rise_above_floor(out["quiet"], 16000) > 25.0
    assert float(np.percentile(frame_levels_dbfs(out["quiet"], 16000), 5)) < settings.target_rms_dbfs - 25.0


def test_speech_in_steady_noise_is_not_noise_only(espeak_speech, settings):
    speech, sr = espeak_speech
    n = render_environment("STRAFFIC", len(speech) / 16000 + 0.1, 1, seed=3)
    noise = (n[0] if n.ndim == 2 else n)[: len(speech)]
    for snr in (10.0, 5.0, 0.0):
        noisy = at_rms(speech, -30.0) + at_rms(noise, -30.0 - snr)
        assert inspect_source(noisy, settings, sr) is None, snr


@pytest.mark.parametrize("kind", ["digital_silence", "one_lsb_dither", "loud_white_noise", "quiet_white_noise",
                                  "mains_hum", "office_room_tone"])
def test_silence_and_noise_only_are_quarantined_at_any_level(tmp_path, settings, kind):
    sr, n = 16000, 32000
    rng = np.random.default_rng(1)
    t = np.arange(n) / sr
    x = {
        "digital_silence": lambda: np.zeros(n),
        "one_lsb_dither": lambda: rng.integers(-1, 2, n) / 32768.0,
        "loud_white_noise": lambda: at_rms(rng.standard_normal(n), -30.0),
        "quiet_white_noise": lambda: at_rms(rng.standard_normal(n), -70.0),
        "mains_hum": lambda: at_rms(np.sin(2 * np.pi * 50 * t) + 0.3 * np.sin(2 * np.pi * 150 * t), -40.0),
        "office_room_tone": lambda: render_environment("OOFFICE", n / sr, 1, seed=1).reshape(-1)[:n],
    }[kind]()
    expected = "silent" if kind in ("digital_silence", "one_lsb_dither") else "noise_only"
    if kind == "loud_white_noise":
        assert rms_dbfs(x) > settings.silence_dbfs + 25  # loud: the absolute-RMS rule let it through
    path = tmp_path / f"{kind}.wav"
    sf.write(path, x.astype(np.float32), sr, subtype="FLOAT")
    sf.write(tmp_path / "good.wav", tone(sr, 2.0, -61), sr)  # quiet speech-like tone with a pause: kept
    kept, bad = resample_shard([utt("good", tmp_path / "good.wav"), utt("bad", path)], tmp_path, tmp_path / "out",
                               tmp_path / "q", settings)
    assert [u.id for u in kept] == ["good"]
    assert [(b["id"], b["kind"]) for b in bad] == [("bad", expected)], bad
    assert (tmp_path / "q" / "bad.wav").exists()
    if expected == "noise_only":
        assert rise_above_floor(x, sr) < settings.min_dynamic_range_db
        assert "above its own noise floor" in bad[0]["reason"]


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
