"""The shared front end (asrflow.loudness): prep's output equals it, inference applies it, it is level invariant."""
import numpy as np
import pytest
import soundfile as sf

from asrflow.audio import read_audio, run_sox
from asrflow.loudness import (Frontend, active_rms_dbfs, loudness_normalize, normalization_gain_db,
                              prepare_waveform)
from asrflow.manifest import Utterance
from asrflow.prep.resample import ResampleSettings, resample_shard

LSB = 1.0 / 32768


def speechlike(sr, seconds, level_db, channels=1, seed=0):
    """Tones with a syllable envelope and pauses: a level to normalize and silences to gate out."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    x = np.sin(2 * np.pi * 220 * t) + 0.5 * np.sin(2 * np.pi * 1230 * t) + 0.05 * rng.standard_normal(t.size)
    x *= 0.5 * (1 + np.sin(2 * np.pi * 3 * t))
    x[int(t.size * 0.3):int(t.size * 0.45)] = 0
    x *= 10 ** (level_db / 20) / np.sqrt(np.mean(x * x))
    if channels > 1:
        x = np.stack([x * (1 - 0.2 * c) for c in range(channels)], axis=1)
    return x.astype(np.float32)


def utt(uid, path):
    return Utterance(id=uid, audio=str(path), text="HELLO WORLD", duration=1.0, sample_rate=16000, speaker="s",
                     dialect="d", split="test")


@pytest.mark.parametrize("sr,channels,level", [(16000, 1, -35.0), (22050, 2, -12.0), (8000, 1, -50.0)])
def test_prep_output_equals_the_shared_normalization_of_the_sox_resampled_audio(tmp_path, sr, channels, level):
    src = tmp_path / "src.wav"
    sf.write(src, speechlike(sr, 2.0, level, channels), sr, subtype="FLOAT")
    settings = ResampleSettings()
    kept, bad = resample_shard([utt("a", src)], tmp_path, tmp_path / "out", tmp_path / "q", settings)
    assert bad == []
    prepped, out_sr = read_audio(kept[0].audio)
    # prep's first sox pass, then the shared normalization in numpy
    tmp = tmp_path / "float.wav"
    run_sox([src, "-e", "floating-point", "-b", "32", tmp, "remix", "-", "rate", "-v", "16000"])
    mono, _ = read_audio(tmp)
    mine, gain = loudness_normalize(mono, 16000, settings.target_rms_dbfs, settings.peak_ceiling_dbfs)
    assert out_sr == 16000 and len(prepped) == len(mine)
    assert kept[0].extra["gain_db"] == pytest.approx(gain, abs=1e-3)
    # equal up to the 16-bit dither sox adds (TPDF, at most ~2 LSB) and the gain rounded to 1 mdB
    assert np.max(np.abs(prepped - mine)) < 4 * LSB
    # and the inference front end on the original file gives the same level (its resampler is torchaudio's)
    inferred = prepare_waveform(*read_audio(src, mono=False)).numpy()
    assert len(inferred) == len(prepped)
    assert active_rms_dbfs(inferred, 16000) == pytest.approx(active_rms_dbfs(prepped, 16000), abs=0.05)
    if sr == 16000:
        assert np.max(np.abs(inferred - prepped)) < 4 * LSB
    else:
        assert np.corrcoef(inferred, prepped)[0, 1] > 0.999


@pytest.mark.parametrize("gain_db", [-20.0, -6.0, 6.0, 20.0])
def test_the_front_end_output_does_not_depend_on_the_input_level(gain_db):
    x = speechlike(22050, 1.5, -30.0, channels=2).T  # (channels, samples)
    ref = prepare_waveform(x, 22050).numpy()
    out = prepare_waveform(x * np.float32(10 ** (gain_db / 20)), 22050).numpy()
    assert active_rms_dbfs(ref, 16000) == pytest.approx(Frontend().target_rms_dbfs, abs=0.01)
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=1e-5)


def test_peak_ceiling_limits_the_gain_and_silence_passes_through():
    x = np.full(16000, 1e-3, dtype=np.float32)
    x[100] = 0.5
    y, gain = loudness_normalize(x, 16000, -23.0, -1.0)
    assert 20 * np.log10(np.abs(y).max()) == pytest.approx(-1.0, abs=1e-4)
    assert gain == pytest.approx(-1.0 - 20 * np.log10(0.5), abs=1e-4)
    zeros = np.zeros(8000, dtype=np.float32)
    assert normalization_gain_db(zeros, 16000) == 0.0
    assert np.array_equal(prepare_waveform(zeros, 16000).numpy(), zeros)
    assert normalization_gain_db(np.zeros(0, dtype=np.float32), 16000) == 0.0


def test_frontend_settings_come_from_the_checkpoint_with_defaults():
    assert Frontend.from_checkpoint({}) == Frontend()
    assert Frontend.from_checkpoint({"sample_rate": 16000}) == Frontend()
    stored = {"frontend": {"sample_rate": 16000, "target_rms_dbfs": -20.0, "peak_ceiling_dbfs": -3.0}}
    assert Frontend.from_checkpoint(stored) == Frontend(16000, -20.0, -3.0)
    assert Frontend.from_dict(Frontend(16000, -20.0, -3.0).to_dict()) == Frontend(16000, -20.0, -3.0)
    # a model exported without the entry gets the caller's defaults (the evaluation passes the prep config)
    assert Frontend.from_checkpoint({"sample_rate": 16000}, Frontend(16000, -26.0, -2.0)) == Frontend(16000, -26.0, -2.0)
