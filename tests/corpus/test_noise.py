import shutil
import zipfile

import numpy as np
import pytest
import soundfile as sf

from asrflow.audio import read_audio, rms_dbfs
from asrflow.corpus import noise

pytestmark = pytest.mark.skipif(
    any(shutil.which(b) is None for b in ("sox", "espeak-ng", "flite")), reason="sox, espeak-ng and flite are needed"
)
SECONDS, CHANNELS, SEED = 3.0, 2, 7


@pytest.fixture(scope="module")
def noise_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demand")
    levels = noise.synthesize_demand_like(out, seconds=SECONDS, channels=CHANNELS, seed=SEED)
    return out, levels


def centroid_hz(x: np.ndarray, sr: int) -> float:
    power = np.abs(np.fft.rfft(x)) ** 2
    return float((power * np.fft.rfftfreq(len(x), 1 / sr)).sum() / power.sum())


def band_profile_db(x: np.ndarray, sr: int) -> np.ndarray:
    power = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / sr)
    edges = np.geomspace(31.25, 8000, 17)  # half-octave bands
    bands = np.array([power[(freqs >= lo) & (freqs < hi)].sum() for lo, hi in zip(edges[:-1], edges[1:])])
    return 10 * np.log10(bands / bands.sum() + 1e-12)


def test_layout_format_and_level(noise_dir):
    out, levels = noise_dir
    assert sorted(levels) == sorted(noise.ENVIRONMENTS)
    for env in noise.ENVIRONMENTS:
        files = sorted(p.name for p in (out / env).iterdir())
        assert files == [f"ch{c:02d}.wav" for c in range(1, CHANNELS + 1)]
        for name in files:
            info = sf.info(str(out / env / name))
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert abs(info.frames / info.samplerate - SECONDS) < 0.01
            x, _ = read_audio(out / env / name)
            level = rms_dbfs(x)
            assert level > -50.0 and np.max(np.abs(x)) < 1.0  # audible, never clipped
            assert abs(level - levels[env][name[:-4]]) < 0.01
            assert abs(level - noise.LEVELS_DBFS[env]) < 3.0


def test_channels_are_related_but_not_copies(noise_dir):
    out, _ = noise_dir
    for env in noise.ENVIRONMENTS:
        a, _ = read_audio(out / env / "ch01.wav")
        b, _ = read_audio(out / env / "ch02.wav")
        assert not np.array_equal(a, b)
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.99


def test_environments_differ_in_spectrum(noise_dir):
    out, _ = noise_dir
    c = {env: centroid_hz(*read_audio(out / env / "ch01.wav")) for env in noise.ENVIRONMENTS}
    assert c["OOFFICE"] > 3 * c["STRAFFIC"]
    assert c["DKITCHEN"] > 2 * c["TMETRO"]
    # Every pair of environments differs in spectral shape (band levels relative to the total).
    profiles = {env: band_profile_db(*read_audio(out / env / "ch01.wav")) for env in noise.ENVIRONMENTS}
    envs = sorted(profiles)
    for i, a in enumerate(envs):
        for b in envs[i + 1:]:
            assert np.mean(np.abs(profiles[a] - profiles[b])) > 3.0, (a, b)


def test_babble_has_speech_like_modulation(noise_dir):
    """Cafeteria babble fluctuates at syllable rate far more than stationary office fan noise."""
    out, _ = noise_dir

    def envelope_spread(env):
        x, sr = read_audio(out / env / "ch01.wav")
        frames = x[: len(x) // 400 * 400].reshape(-1, 400)  # 25 ms
        db = 10 * np.log10(np.mean(frames ** 2, axis=1) + 1e-12)
        return np.percentile(db, 90) - np.percentile(db, 10)

    assert envelope_spread("PCAFETER") > envelope_spread("OOFFICE") + 2.0


def test_deterministic_and_independent_of_other_environments(noise_dir, tmp_path):
    out, _ = noise_dir
    noise.synthesize_demand_like(tmp_path / "again", ["STRAFFIC", "PCAFETER"], SECONDS, CHANNELS, SEED)
    for env in ("STRAFFIC", "PCAFETER"):
        for name in ("ch01.wav", "ch02.wav"):
            assert (out / env / name).read_bytes() == (tmp_path / "again" / env / name).read_bytes()
    noise.synthesize_demand_like(tmp_path / "other", ["STRAFFIC"], SECONDS, CHANNELS, SEED + 1)
    assert (out / "STRAFFIC" / "ch01.wav").read_bytes() != (tmp_path / "other" / "STRAFFIC" / "ch01.wav").read_bytes()


def test_demand_zip_layout_and_reproducibility(noise_dir, tmp_path):
    out, _ = noise_dir
    z1 = noise.make_demand_zip(out / "OOFFICE", tmp_path / "OOFFICE_16k.zip")
    z2 = noise.make_demand_zip(out / "OOFFICE", tmp_path / "copy.zip")
    assert z1.read_bytes() == z2.read_bytes()
    with zipfile.ZipFile(z1) as zf:
        assert zf.namelist() == ["OOFFICE/", "OOFFICE/ch01.wav", "OOFFICE/ch02.wav"]
        assert zf.read("OOFFICE/ch02.wav") == (out / "OOFFICE" / "ch02.wav").read_bytes()
    with pytest.raises(noise.NoiseError):
        noise.make_demand_zip(tmp_path, tmp_path / "empty.zip")


def test_unknown_environment_is_rejected(tmp_path):
    with pytest.raises(noise.NoiseError, match="unknown environment"):
        noise.synthesize_demand_like(tmp_path, ["SPACESHIP"], seconds=1.0)
