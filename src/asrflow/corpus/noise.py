"""DEMAND-like multichannel environment noise, synthesized offline because DEMAND can't be downloaded here.

``synthesize_demand_like`` writes ``<out_dir>/<ENV>/ch01.wav``, ``ch02.wav``, ... (16 kHz, mono, 16-bit),
the layout of DEMAND's extracted ``<ENV>_16k.zip``; ``make_demand_zip`` packs one environment folder the
way DEMAND's zip is packed, for testing the downloader against a local mirror.

Each environment is a set of *sources* heard by every microphone (hum, clatter, babble, passing cars),
reaching channel c a few samples later as across a small array, plus *diffuse* noise that is independent
per channel. Noise is drawn from numpy generators seeded by (seed, environment name): sox's own ``synth``
noise is random per run unless ``-R`` is given, and with ``-R`` every run and channel gets the same single
seed, so sox only filters here (``-D``, float in and out: nothing is dithered). The same seed gives
byte-identical files; one environment's noise doesn't depend on which others are requested.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from asrflow.audio import SAMPLE_RATE, read_audio, rms_dbfs, run_sox, write_audio
from asrflow.corpus.sentences import load_sentences
from asrflow.corpus.synth import ENGINE_RATES, Speaker, sox_process, synthesize
from asrflow.manifest import write_json

# Channel-average RMS each environment is scaled to: traffic and metro loud, office quiet, as in DEMAND.
LEVELS_DBFS = {
    "DKITCHEN": -32.0, "NPARK": -34.0, "OOFFICE": -38.0, "PCAFETER": -30.0, "STRAFFIC": -28.0, "TMETRO": -27.0,
}
ENVIRONMENTS = tuple(sorted(LEVELS_DBFS))
ARRAY_DELAY_SAMPLES = 2  # per channel: ~4 cm spacing at 16 kHz


class NoiseError(RuntimeError):
    """Bad request (unknown environment) or an environment folder without channels."""


# --------------------------------------------------------------------------------------------- primitives


def colored_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Noise with power ~ 1/f**exponent (0 white, 1 pink, 2 brown), unit RMS, shaped in the FFT domain."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    spectrum *= np.maximum(freqs, 10.0) ** (-exponent / 2.0)  # floor at 10 Hz: no DC drift
    x = np.fft.irfft(spectrum, n)
    return x / (np.sqrt(np.mean(x * x)) or 1.0)


def sox_filter(samples: np.ndarray, effects: list[str], tmp: Path) -> np.ndarray:
    src, dst = tmp / "filter_in.wav", tmp / "filter_out.wav"
    write_audio(src, samples, SAMPLE_RATE, subtype="FLOAT")
    run_sox(["-D", str(src), str(dst), *effects])
    out, _ = read_audio(dst)
    return out[: len(samples)] if len(out) >= len(samples) else np.pad(out, (0, len(samples) - len(out)))


def slow_envelope(rng: np.random.Generator, n: int, lo_hz: float, hi_hz: float, depth: float) -> np.ndarray:
    """1 - depth .. 1, a sum of three slow sines with random phases: gusts, passing cars."""
    t = np.arange(n) / SAMPLE_RATE
    wobble = sum(np.sin(2 * np.pi * rng.uniform(lo_hz, hi_hz) * t + rng.uniform(0, 2 * np.pi)) for _ in range(3))
    return 1.0 - depth * (wobble / 3.0 + 1.0) / 2.0


def tones(n: int, freqs_amps: list[tuple[float, float]]) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    return sum(a * np.sin(2 * np.pi * f * t) for f, a in freqs_amps)


def events(rng: np.random.Generator, n: int, rate_hz: float,
           make: Callable[[np.random.Generator], np.ndarray]) -> np.ndarray:
    """Short sounds from ``make`` at Poisson times, ``rate_hz`` per second on average."""
    out = np.zeros(n)
    for _ in range(rng.poisson(rate_hz * n / SAMPLE_RATE)):
        sound = make(rng)
        start = int(rng.integers(0, max(1, n - len(sound))))
        out[start:start + len(sound)] += sound[: n - start]
    return out


def _burst(rng: np.random.Generator) -> np.ndarray:
    """A decaying noise burst: a dish, a cupboard door, a rail joint."""
    length = int(rng.uniform(0.02, 0.12) * SAMPLE_RATE)
    return rng.uniform(0.3, 1.0) * rng.standard_normal(length) * np.exp(-np.arange(length) / (0.2 * length))


def _chirp(rng: np.random.Generator) -> np.ndarray:
    """A bird call: a fast frequency sweep with a smooth envelope."""
    length = int(rng.uniform(0.06, 0.2) * SAMPLE_RATE)
    f0, f1 = rng.uniform(2500, 4500), rng.uniform(3000, 6000)
    t = np.arange(length) / SAMPLE_RATE
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * t[-1]))
    return rng.uniform(0.2, 1.0) * np.sin(phase) * np.hanning(length)


def babble(rng: np.random.Generator, n: int, tmp: Path, talkers: int = 6) -> np.ndarray:
    """Several synthetic talkers (espeak-ng accents and flite voices) speaking at once, each back to back."""
    pool = load_sentences(4, 12)
    accents = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-us-nyc", "en-029")
    variants = ("m1", "m3", "m5", "f1", "f2", "f4")
    flite_voices = ("slt", "rms", "awb", "kal16")
    mix = np.zeros(n)
    for k in range(talkers):
        if k % 3 == 2:  # every third talker from flite, for a second kind of voice quality
            speaker = Speaker("flite", flite_voices[k % 4], "", (("duration_stretch", 1.0), ("f0_mean", None)))
        else:
            speaker = Speaker("espeak", accents[int(rng.integers(len(accents)))], "",
                              (("pitch", int(rng.integers(30, 70))), ("speed_wpm", int(rng.integers(150, 190))),
                               ("variant", variants[int(rng.integers(len(variants)))])))
        voice = np.zeros(0)
        while len(voice) < n:  # ~2.5 s per sentence: a few calls per talker and ten seconds
            texts = [pool[int(i)] for i in rng.integers(0, len(pool), size=4)]
            waves, sr = synthesize(speaker, texts, tmp)
            for wave in waves:
                gap = np.zeros(int(rng.uniform(0.05, 0.6) * sr))
                voice = np.concatenate([voice, wave / (np.max(np.abs(wave)) or 1.0), gap])
        voice = sox_process(voice, ENGINE_RATES[speaker.engine], SAMPLE_RATE, tmp, [])
        offset = int(rng.integers(0, SAMPLE_RATE))  # talkers don't start together
        mix += rng.uniform(0.5, 1.0) * np.roll(np.pad(voice, (0, max(0, n - len(voice))))[:n], offset)
    return mix


# --------------------------------------------------------------------------------------------- environments
# Each recipe returns (sources heard by all microphones, a function giving one channel's diffuse noise).

Recipe = Callable[[np.random.Generator, int, Path], tuple[np.ndarray, Callable[[np.random.Generator], np.ndarray]]]


def _dkitchen(rng, n, tmp):
    hum = tones(n, [(50, 0.3), (100, 0.15), (150, 0.08), (250, 0.04)])  # fridge compressor
    clatter = sox_filter(events(rng, n, 1.5, _burst), ["sinc", "1500-7000"], tmp)
    return hum + 2.0 * clatter, lambda r: 0.3 * sox_filter(colored_noise(r, n, 1.0), ["sinc", "-4000"], tmp)


def _straffic(rng, n, tmp):
    rumble = sox_filter(colored_noise(rng, n, 2.0), ["sinc", "40-800"], tmp) * slow_envelope(rng, n, 0.03, 0.2, 0.8)
    return rumble, lambda r: 0.4 * sox_filter(colored_noise(r, n, 2.0), ["sinc", "40-600"], tmp)


def _pcafeter(rng, n, tmp):
    talk = sox_filter(babble(rng, n, tmp), ["sinc", "80-5000", "reverb", "40"], tmp)
    return talk / (np.sqrt(np.mean(talk * talk)) or 1.0), lambda r: 0.4 * colored_noise(r, n, 1.0)


def _ooffice(rng, n, tmp):
    fan = sox_filter(colored_noise(rng, n, 1.0), ["sinc", "150-3000"], tmp)
    hvac = tones(n, [(120, 0.2), (240, 0.05)])
    return fan + hvac, lambda r: 0.3 * sox_filter(colored_noise(r, n, 1.0), ["highpass", "100"], tmp)


def _npark(rng, n, tmp):
    birds = events(rng, n, 0.4, _chirp)
    # Wind buffets each microphone on its own, so it is mostly diffuse.
    def wind(r):
        return sox_filter(colored_noise(r, n, 2.0), ["sinc", "60-1200"], tmp) * slow_envelope(r, n, 0.1, 0.5, 0.7)
    return 0.3 * birds, wind


def _tmetro(rng, n, tmp):
    rumble = sox_filter(colored_noise(rng, n, 2.0), ["sinc", "25-300"], tmp) + tones(n, [(90, 0.5), (180, 0.2)])
    clacks = sox_filter(events(rng, n, 1.8, _burst), ["sinc", "500-2500"], tmp)
    return (rumble + 1.5 * clacks) * slow_envelope(rng, n, 0.05, 0.15, 0.4), \
        lambda r: 0.5 * sox_filter(colored_noise(r, n, 1.0), ["sinc", "-2000"], tmp)


RECIPES: dict[str, Recipe] = {
    "DKITCHEN": _dkitchen, "NPARK": _npark, "OOFFICE": _ooffice,
    "PCAFETER": _pcafeter, "STRAFFIC": _straffic, "TMETRO": _tmetro,
}


# --------------------------------------------------------------------------------------------- public API


def _env_rng(seed: int, env: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(env.encode())])


def render_environment(env: str, seconds: float, channels: int, seed: int) -> np.ndarray:
    """(channels, samples) float array at the environment's level."""
    if env not in RECIPES:
        raise NoiseError(f"unknown environment {env!r}; known: {', '.join(ENVIRONMENTS)}")
    n = int(round(seconds * SAMPLE_RATE))
    rng = _env_rng(seed, env)
    with tempfile.TemporaryDirectory(prefix="asrflow-noise-") as tmpdir:
        sources, diffuse = RECIPES[env](rng, n, Path(tmpdir))
        pad = ARRAY_DELAY_SAMPLES * channels
        padded = np.concatenate([np.zeros(pad), sources])
        channel_list = []
        for c in range(channels):
            start = pad - c * ARRAY_DELAY_SAMPLES  # later channels hear the sources slightly later
            channel_list.append(rng.uniform(0.9, 1.1) * padded[start:start + n] + diffuse(rng))
        out = np.stack(channel_list)
    out *= 10 ** (LEVELS_DBFS[env] / 20.0) / np.sqrt(np.mean(out * out))
    peak = np.max(np.abs(out))
    return out * (0.99 / peak) if peak > 0.99 else out  # never clip, even if that lowers the level


def synthesize_demand_like(out_dir: str | os.PathLike, environments: list[str] | None = None,
                           seconds: float = 30.0, channels: int = 2, seed: int = 1234) -> dict[str, dict[str, float]]:
    """Write ``<out_dir>/<ENV>/chNN.wav`` for each environment; return {env: {"ch01": rms dBFS, ...}}.

    The levels are also merged into ``<out_dir>/levels.json``.
    """
    if channels < 1 or seconds <= 0:
        raise NoiseError(f"need channels >= 1 and seconds > 0, got {channels}, {seconds}")
    out = Path(out_dir)
    levels: dict[str, dict[str, float]] = {}
    for env in environments or ENVIRONMENTS:
        audio = render_environment(env, seconds, channels, seed)
        levels[env] = {}
        for c, samples in enumerate(audio, 1):
            write_audio(out / env / f"ch{c:02d}.wav", samples, SAMPLE_RATE)
            levels[env][f"ch{c:02d}"] = round(rms_dbfs(read_audio(out / env / f"ch{c:02d}.wav")[0]), 2)
    levels_path = out / "levels.json"
    merged = json.loads(levels_path.read_text()) if levels_path.exists() else {}
    merged.update(levels)
    write_json(levels_path, merged)
    return levels


def make_demand_zip(env_dir: str | os.PathLike, zip_path: str | os.PathLike) -> Path:
    """Zip ``env_dir``'s chNN.wav as ``<ENV>/chNN.wav``, DEMAND's internal layout; byte-reproducible."""
    env_dir, zip_path = Path(env_dir), Path(zip_path)
    channels = sorted(env_dir.glob("ch[0-9][0-9].wav"))
    if not channels:
        raise NoiseError(f"{env_dir}: no chNN.wav files to zip")
    env = env_dir.name
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = zip_path.with_name(f".{zip_path.name}.tmp")
    with zipfile.ZipFile(tmp, "w") as zf:
        # Fixed timestamps and permissions so the same audio gives the same zip bytes.
        folder = zipfile.ZipInfo(f"{env}/", date_time=(1980, 1, 1, 0, 0, 0))
        folder.external_attr = (0o40755 << 16) | 0x10
        zf.writestr(folder, b"")
        for path in channels:
            info = zipfile.ZipInfo(f"{env}/{path.name}", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, path.read_bytes())
    os.replace(tmp, zip_path)
    return zip_path


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--environments", nargs="*", default=None, help=f"default: {' '.join(ENVIRONMENTS)}")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--zip-dir", help="also write <ENV>_16k.zip files here")
    args = parser.parse_args(argv)
    levels = synthesize_demand_like(args.out_dir, args.environments, args.seconds, args.channels, args.seed)
    if args.zip_dir:
        for env in levels:
            make_demand_zip(Path(args.out_dir) / env, Path(args.zip_dir) / f"{env}_16k.zip")
    print(json.dumps(levels, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
