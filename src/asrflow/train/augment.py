"""Data augmentation: SpecAugment, vocal tract length perturbation and random filtering on features,
additive noise and speed perturbation on waveforms.

Each transform is an ``nn.Module`` that only acts in training mode (``.eval()`` makes it the
identity), respects each utterance's real length (padding is never touched nor counted), and draws
its randomness from its own ``torch.Generator`` (``seed=``) rather than the global RNG, so it is
reproducible and does not shift other random streams (e.g. dropout) when switched on or off.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torchaudio
from torch import nn

from asrflow.train.features import lengths_to_mask


def make_generator(seed: int | None, generator: torch.Generator | None = None) -> torch.Generator:
    """``generator`` if given (CPU), else a CPU generator seeded with ``seed``, or from the global RNG
    when both are None (so ``torch.manual_seed`` still rules)."""
    if generator is not None:
        if generator.device.type != "cpu":
            raise ValueError("augmentation generators must be CPU generators")
        return generator
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator().manual_seed(int(seed))


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator, high: int) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(0, high, (), generator=gen))


class SpecAugment(nn.Module):
    """Frequency and time masking (torchaudio's FrequencyMasking/TimeMasking) per utterance.

    Masks are drawn independently per utterance and applied to its real frames only. Each time mask
    is at most ``min(time_mask_param, max_time_ratio · T_b / n_time_masks)`` frames wide, so all time
    masks together cover at most ``max_time_ratio`` of the utterance. Masked values are ``mask_value``
    (0 = the mean after GlobalCMVN, so apply this after CMVN).

    torchaudio's masking draws from the global CPU RNG; it runs inside ``torch.random.fork_rng`` seeded
    from this module's generator, so results are reproducible and the global stream is left as it was.
    """

    def __init__(self, freq_mask_param: int = 15, time_mask_param: int = 30, n_freq_masks: int = 2,
                 n_time_masks: int = 2, max_time_ratio: float = 0.2, mask_value: float = 0.0,
                 seed: int | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not 0.0 < max_time_ratio <= 1.0:
            raise ValueError(f"max_time_ratio must be in (0, 1], got {max_time_ratio}")
        self.n_freq_masks, self.n_time_masks = int(n_freq_masks), int(n_time_masks)
        self.mask_value = float(mask_value)
        self.freq_masking = torchaudio.transforms.FrequencyMasking(freq_mask_param)
        # p bounds one mask to int(p · T_b) frames (torchaudio's mask width is then < that bound)
        p = max_time_ratio / max(self.n_time_masks, 1)
        self.time_masking = torchaudio.transforms.TimeMasking(time_mask_param, p=p)
        self.generator = make_generator(seed, generator)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """feats (B, T, F), lengths (B,) -> masked copy (B, T, F)."""
        if not self.training or (self.n_freq_masks == 0 and self.n_time_masks == 0):
            return feats
        out = feats.clone()
        seed = int(torch.randint(0, 2**62, (), generator=self.generator))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would reseed CUDA too
            for b, n in enumerate(lengths.tolist()):
                if n > 0:
                    out[b, :n] = self._mask_one(out[b, :n].transpose(0, 1)).transpose(0, 1)
        return out

    def _mask_one(self, spec: torch.Tensor) -> torch.Tensor:
        """(F, T_b) real part of one utterance -> masked."""
        for _ in range(self.n_freq_masks):
            spec = self.freq_masking(spec, self.mask_value)
        for _ in range(self.n_time_masks):
            spec = self.time_masking(spec, self.mask_value)
        return spec


def vtlp_source_hz(freqs_hz: torch.Tensor, alpha: float, nyquist_hz: float, boundary_hz: float) -> torch.Tensor:
    """Where the warped spectrum takes each frequency from: the inverse of Jaitly & Hinton's (2013)
    piecewise-linear warp ``w``, which maps ``f -> alpha * f`` up to ``boundary_hz * min(alpha, 1) / alpha``
    and then runs straight to ``nyquist -> nyquist`` (so the band stays full). The warped spectrum is
    ``S'(f) = S(w^-1(f))``: what the speaker had at ``f`` now lies at ``w(f)``, as if the vocal tract were
    ``1 / alpha`` times as long (formants ``alpha`` times as high)."""
    knee_out = boundary_hz * min(alpha, 1.0)  # w(knee_in)
    knee_in = knee_out / alpha
    low = freqs_hz / alpha
    high = nyquist_hz - (nyquist_hz - freqs_hz) * (nyquist_hz - knee_in) / (nyquist_hz - knee_out)
    return torch.where(freqs_hz <= knee_out, low, high)


def warp_log_mel(feats: torch.Tensor, alphas: torch.Tensor, band_centres_hz: torch.Tensor, nyquist_hz: float,
                 boundary_hz: float) -> torch.Tensor:
    """feats (B, T, F) log-mel, each utterance warped along frequency by its own ``alphas[b]``: band ``i``
    takes the value at :func:`vtlp_source_hz` of its centre, linearly interpolated between the two nearest
    bands and clamped at the first and last (the warp of :class:`VocalTractLengthPerturb`, given the factors)."""
    centres = band_centres_hz.to(torch.float64).cpu()
    bins = torch.arange(centres.numel(), dtype=torch.float64)
    positions = []
    for alpha in alphas.tolist():
        source = vtlp_source_hz(centres, alpha, nyquist_hz, boundary_hz)
        # fractional band index of each source frequency (bands are monotone in frequency)
        positions.append(torch.from_numpy(np.interp(source.numpy(), centres.numpy(), bins.numpy())))
    pos = torch.stack(positions).to(feats.device)  # (B, F)
    lower = pos.floor().long().clamp(max=centres.numel() - 1)
    upper = (lower + 1).clamp(max=centres.numel() - 1)
    frac = (pos - lower.to(pos.dtype)).to(feats.dtype)[:, None, :]
    index = lambda i: i[:, None, :].expand(-1, feats.size(1), -1)  # noqa: E731  (B, T, F)
    return torch.lerp(feats.gather(2, index(lower)), feats.gather(2, index(upper)), frac)


class VocalTractLengthPerturb(nn.Module):
    """Vocal tract length perturbation (VTLP; Jaitly & Hinton 2013): each utterance's log-mel spectrum
    warped along frequency by a factor ``alpha ~ U(factors)``, a new "speaker" per draw. Speed
    perturbation also moves formants, but together with pitch and tempo; this moves only the spectral
    envelope's frequency scale, the dimension voices differ in most.

    It acts on log-mel features before CMVN: band ``i`` (centre ``c_i``) takes the value the input has at
    ``w^-1(c_i)`` (:func:`vtlp_source_hz`), linearly interpolated between the two nearest bands (whose
    centres the feature front end gives: ``band_centres_hz()``), clamped at the first and last band.
    ``alpha = 1`` is the identity. Padded frames stay what they were (each frame is warped on its own, and
    a padded frame is constant across bands).
    """

    def __init__(self, factors: Sequence[float] = (0.9, 1.1), boundary_hz: float = 4800.0, p: float = 1.0,
                 seed: int | None = None, generator: torch.Generator | None = None):
        super().__init__()
        low, high = (float(x) for x in factors)
        if not 0.0 < low <= high:
            raise ValueError(f"vtlp factors must be a range of positive numbers [low, high], got {list(factors)}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"vtlp p must be in [0, 1], got {p}")
        if boundary_hz <= 0:
            raise ValueError(f"vtlp boundary_hz must be positive, got {boundary_hz}")
        self.factors, self.boundary_hz, self.p = (low, high), float(boundary_hz), float(p)
        self.generator = make_generator(seed, generator)

    def draw(self, batch: int) -> torch.Tensor:
        """This batch's factors (B,), 1.0 where the draw says no. Both draws are made for every utterance,
        so one utterance's factor does not depend on ``p`` or on the others."""
        alphas = torch.ones(batch, dtype=torch.float64)
        for b in range(batch):
            apply = float(torch.rand((), generator=self.generator)) < self.p
            alpha = _uniform(self.generator, *self.factors)
            if apply:
                alphas[b] = alpha
        return alphas

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor, band_centres_hz: torch.Tensor,
                nyquist_hz: float) -> torch.Tensor:
        """feats (B, T, F) log-mel, lengths (B,) -> warped copy (B, T, F)."""
        if not self.training:
            return feats
        centres = band_centres_hz.to(torch.float64).cpu()
        if centres.numel() != feats.size(-1):
            raise ValueError(f"vtlp: {centres.numel()} band centres for {feats.size(-1)} feature bins")
        if self.boundary_hz >= nyquist_hz:
            raise ValueError(f"vtlp boundary_hz {self.boundary_hz} must lie below the Nyquist frequency {nyquist_hz}")
        alphas = self.draw(feats.size(0))
        if bool((alphas == 1.0).all()):
            return feats
        return warp_log_mel(feats, alphas, centres, nyquist_hz, self.boundary_hz)


def filter_gains_db(n_bins: int, n_points: int, db_range: tuple[float, float],
                    generator: torch.Generator) -> torch.Tensor:
    """One random equalizer over ``n_bins`` feature bins (FilterAugment's "linear" type, Nam et al. 2022):
    ``n_points`` gains ~ U(db_range), one at each end of the band and the rest at random bins between,
    linearly interpolated. -> (n_bins,) float64, in dB."""
    if n_points < 2:
        raise ValueError(f"an equalizer needs at least 2 points (one per end of the band), got {n_points}")
    inner = torch.randperm(max(n_bins - 2, 0), generator=generator)[: n_points - 2] + 1  # distinct inner bins
    knots = torch.cat([torch.tensor([0]), inner.sort().values, torch.tensor([n_bins - 1])]).to(torch.float64)
    gains = torch.tensor([_uniform(generator, *db_range) for _ in range(knots.numel())], dtype=torch.float64)
    return torch.from_numpy(np.interp(np.arange(n_bins, dtype=np.float64), knots.numpy(), gains.numpy()))


class FilterAugment(nn.Module):
    """Random filtering (FilterAugment, Nam et al. 2022, "linear" type): each utterance heard through its own
    random equalizer, ``n_points = (fewest, most)`` gains ~ U(``db_range``) dB at random frequencies (the band's
    two ends always among them), linearly interpolated across the mel bands. Voices differ in their spectral
    envelope's *shape* as well as its frequency scale (which VTLP moves) and recordings differ in their
    channel's response; this draws a new shape per utterance.

    A filter multiplies the power spectrum, so it adds to a log spectrum: the gain in dB is turned into the
    front end's log units by ``units_per_db`` (natural-log mels: ln(10) / 10; Whisper's log10 mels scaled by
    1/4: 1/40) and added to the real frames only (padding is never touched). It acts on log-mel features
    before CMVN, as VTLP does. One gain per mel band is exact for a filter that is flat across each band's
    width, which a straight line between points tens of bands apart nearly is.
    """

    def __init__(self, db_range: Sequence[float] = (-6.0, 6.0), n_points: Sequence[int] = (2, 5), p: float = 1.0,
                 seed: int | None = None, generator: torch.Generator | None = None):
        super().__init__()
        low, high = (float(x) for x in db_range)
        if not low <= high:
            raise ValueError(f"filter_augment db_range must be [low, high] with low <= high, got {list(db_range)}")
        fewest, most = (int(x) for x in n_points)
        if not 2 <= fewest <= most:
            raise ValueError(f"filter_augment n_points must be [fewest, most] with 2 <= fewest <= most, got {list(n_points)}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"filter_augment p must be in [0, 1], got {p}")
        self.db_range, self.n_points, self.p = (low, high), (fewest, most), float(p)
        self.generator = make_generator(seed, generator)

    def draw(self, batch: int, n_bins: int) -> torch.Tensor:
        """This batch's gains (B, n_bins) in dB, 0 where the draw says no. Every draw is made for every
        utterance, so one utterance's filter depends neither on ``p`` nor on the others'."""
        if n_bins < self.n_points[1]:
            raise ValueError(f"filter_augment: {self.n_points[1]} points on only {n_bins} feature bins")
        gains = torch.zeros(batch, n_bins, dtype=torch.float64)
        for b in range(batch):
            apply = float(torch.rand((), generator=self.generator)) < self.p
            n = self.n_points[0] + _randint(self.generator, self.n_points[1] - self.n_points[0] + 1)
            curve = filter_gains_db(n_bins, n, self.db_range, self.generator)
            if apply:
                gains[b] = curve
        return gains

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor, units_per_db: float) -> torch.Tensor:
        """feats (B, T, F) log-mel, lengths (B,) -> filtered copy (B, T, F)."""
        if not self.training:
            return feats
        gains = self.draw(feats.size(0), feats.size(-1))
        if bool((gains == 0).all()):
            return feats
        real = lengths_to_mask(lengths.to(feats.device), feats.size(1))[:, :, None]
        offset = (gains * float(units_per_db)).to(feats.device, feats.dtype)[:, None, :]
        return feats + offset * real


@dataclass
class NoiseMixResult:
    """``waves``: the mixed batch; ``snr_db``: SNR applied per utterance (NaN where not applied);
    ``gain``: the factor the mix was scaled by to stay within [-1, 1] (1.0 where no clipping threatened)."""

    waves: torch.Tensor
    snr_db: torch.Tensor
    gain: torch.Tensor

    @property
    def clipped(self) -> torch.Tensor:
        return self.gain < 1.0


class NoiseInjector(nn.Module):
    """Additive noise at a random SNR, on waveforms before feature extraction.

    With probability ``p`` per utterance: pick a noise recording, take a random segment as long as the
    utterance's real part (looping the recording if it is shorter), and add it scaled so that
    ``10·log10(P_signal / P_noise) = snr`` with ``snr ~ U(snr_db)``, powers measured over real samples
    only. If the mix would leave [-1, 1] the whole utterance (speech and noise) is scaled down, which
    keeps the SNR, and the gain is reported. Silent utterances are left alone.
    """

    def __init__(self, noises: Sequence["torch.Tensor | np.ndarray | str | os.PathLike"],
                 snr_db: tuple[float, float] = (0.0, 20.0), p: float = 0.5, seed: int | None = None,
                 sample_rate: int | None = None, generator: torch.Generator | None = None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        low, high = float(snr_db[0]), float(snr_db[1])
        if low > high:
            raise ValueError(f"snr_db range {snr_db} is empty")
        self.snr_db, self.p = (low, high), float(p)
        loaded = (self._load(x, sample_rate) for x in noises)
        self.noises = [n for n in loaded if n.numel() > 0 and bool(n.abs().max() > 0)]
        if not self.noises:
            raise ValueError("no usable (non-empty, non-silent) noise recordings")
        self.generator = make_generator(seed, generator)

    @staticmethod
    def _load(source, sample_rate: int | None) -> torch.Tensor:
        if isinstance(source, (str, os.PathLike)):
            from asrflow.audio import read_audio

            samples, sr = read_audio(source)
            if sample_rate is not None and sr != sample_rate:
                raise ValueError(f"{source}: noise at {sr} Hz, expected {sample_rate} Hz (resample it in data prep)")
            return torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
        return torch.as_tensor(source, dtype=torch.float32).reshape(-1).cpu()

    @classmethod
    def from_noise_manifest(cls, noise_manifest: str | os.PathLike, split: str, **kwargs) -> "NoiseInjector":
        """The recordings of one split (``train`` or ``heldout`` environments) of a noise manifest."""
        return cls(noise_recordings(noise_manifest, split), **kwargs)

    def _segment(self, noise: torch.Tensor, n: int) -> torch.Tensor:
        """n samples from a random offset, wrapping around when the recording is shorter than n."""
        if noise.numel() >= n:
            start = _randint(self.generator, noise.numel() - n + 1)
            return noise[start:start + n]
        start = _randint(self.generator, noise.numel())
        return noise[(start + torch.arange(n)) % noise.numel()]

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> NoiseMixResult:
        batch = waves.size(0)
        snrs = torch.full((batch,), float("nan"))
        gains = torch.ones(batch)
        if not self.training or self.p == 0.0:
            return NoiseMixResult(waves, snrs, gains)
        out = waves.clone()
        for b, n in enumerate(lengths.tolist()):
            # draw everything for every utterance, so one utterance's draws don't depend on p or others
            apply = float(torch.rand((), generator=self.generator)) < self.p
            snr = _uniform(self.generator, *self.snr_db)
            noise = self.noises[_randint(self.generator, len(self.noises))]
            if not apply or n <= 0:
                continue
            segment = self._segment(noise, n)
            mixed, gain = self._mix(waves[b, :n], segment.to(waves.device), snr)
            if mixed is None:
                continue
            out[b, :n] = mixed.to(out.dtype)
            snrs[b], gains[b] = snr, gain
        return NoiseMixResult(out, snrs, gains)

    @staticmethod
    def _mix(speech: torch.Tensor, noise: torch.Tensor, snr_db: float) -> tuple[torch.Tensor | None, float]:
        s = speech.double()
        v = noise.double()
        p_speech = float((s * s).mean())
        p_noise = float((v * v).mean())
        if p_speech <= 0.0 or p_noise <= 0.0:
            return None, 1.0
        scale = math.sqrt(p_speech / (p_noise * 10.0 ** (snr_db / 10.0)))
        mixed = s + scale * v
        peak = float(mixed.abs().max())
        gain = 1.0 / peak if peak > 1.0 else 1.0  # scale everything, not clip: keeps the SNR exact
        return mixed * gain, gain


class SpeedPerturb(nn.Module):
    """Kaldi-style speed perturbation: factor ``f`` plays the utterance ``f`` times faster (length / f,
    pitch × f), by resampling from ``sample_rate·f`` to ``sample_rate`` (torchaudio's sinc resampler,
    the same algorithm as ``torchaudio.functional.resample``, with the kernel cached per factor).

    forward(waves (B, T), lengths (B,)) -> (waves (B, T'), new_lengths (B,), factors (B,)). Utterances
    sharing a factor are resampled together; padding is zeroed first so it acts exactly like the
    resampler's own zero padding, and the result is identical to resampling each utterance alone.
    """

    def __init__(self, factors: Sequence[float] = (0.9, 1.0, 1.1), sample_rate: int = 16000,
                 seed: int | None = None, generator: torch.Generator | None = None):
        super().__init__()
        if not factors or any(f <= 0 for f in factors):
            raise ValueError(f"speed factors must be positive, got {factors}")
        self.factors = [float(f) for f in factors]
        self.sample_rate = int(sample_rate)
        self.source_rates = [int(round(sample_rate * f)) for f in self.factors]
        self.resamplers = nn.ModuleList(
            torchaudio.transforms.Resample(orig_freq=src, new_freq=self.sample_rate) for src in self.source_rates
        )
        self.generator = make_generator(seed, generator)

    def output_length(self, length: int, factor_index: int) -> int:
        """ceil(L · sr / (sr·f)), exactly as the resampler truncates its output."""
        src, dst = self.source_rates[factor_index], self.sample_rate
        g = math.gcd(src, dst)
        src, dst = src // g, dst // g
        return -(-length * dst // src)

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = waves.size(0)
        if not self.training:
            return waves, lengths, torch.ones(batch, dtype=torch.float64)
        choice = torch.randint(0, len(self.factors), (batch,), generator=self.generator)
        lengths_cpu = lengths.detach().cpu()
        new_lengths = torch.tensor([self.output_length(int(n), int(k)) for n, k in zip(lengths_cpu, choice)],
                                   dtype=torch.long)
        out = waves.new_zeros(batch, int(new_lengths.max()) if batch else 0)
        clean = waves.masked_fill(~lengths_to_mask(lengths.to(waves.device), waves.size(1)), 0.0)
        for k in choice.unique().tolist():
            rows = (choice == k).nonzero().flatten().to(waves.device)
            res = self.resamplers[k](clean.index_select(0, rows).float()).to(waves.dtype)
            for i, b in enumerate(rows.tolist()):
                n = int(new_lengths[b])
                out[b, :n] = res[i, :n]
        factors = torch.tensor([self.factors[k] for k in choice.tolist()], dtype=torch.float64)
        return out, new_lengths.to(lengths.device), factors


def noise_recordings(noise_manifest: str | os.PathLike, split: str) -> list[torch.Tensor]:
    """The noise recordings of one split as float32 tensors at the training rate. The manifest is read
    by its one reader, ``asrflow.data.demand.read_noise_manifest`` (validated, paths resolved)."""
    from asrflow.audio import SAMPLE_RATE
    from asrflow.data.demand import read_noise_manifest

    paths = [r["audio"] for r in read_noise_manifest(noise_manifest) if r["split"] == split]
    if not paths:
        raise ValueError(f"{noise_manifest}: no noise recordings in split {split!r}")
    return [NoiseInjector._load(p, SAMPLE_RATE) for p in paths]
