import math

import numpy as np
import pytest
import torch

from asrflow.train.augment import (FilterAugment, NoiseInjector, SpecAugment, SpeedPerturb, VocalTractLengthPerturb,
                                   filter_gains_db, vtlp_source_hz, warp_log_mel)


def _waves(lengths, seed=0, amp=0.1):
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(len(lengths), max(lengths))
    for b, n in enumerate(lengths):
        w[b, :n] = amp * torch.randn(n, generator=g)
    return w, torch.tensor(lengths)


# --- SpecAugment -------------------------------------------------------------------------------

def _feats(lengths, F=20, pad_value=7.0):
    x = torch.full((len(lengths), max(lengths), F), pad_value)
    for b, n in enumerate(lengths):
        x[b, :n] = 1.0 + torch.rand(n, F)  # never equal to the mask value 0
    return x


def test_specaugment_time_masks_stay_within_real_length_and_ratio():
    lengths = [100, 40, 12, 1]
    aug = SpecAugment(freq_mask_param=0, time_mask_param=50, n_freq_masks=0, n_time_masks=2,
                      max_time_ratio=0.2, seed=0).train()
    for _ in range(20):
        x = _feats(lengths)
        y = aug(x, torch.tensor(lengths))
        for b, n in enumerate(lengths):
            assert torch.all(y[b, n:] == 7.0)  # padding untouched
            masked_frames = int((y[b, :n] == 0).all(-1).sum())
            assert masked_frames <= 0.2 * n


def test_specaugment_masks_something_and_freq_masks_respect_length():
    lengths = [80, 30]
    aug = SpecAugment(freq_mask_param=8, time_mask_param=10, seed=1).train()
    x = _feats(lengths)
    y = aug(x, torch.tensor(lengths))
    assert (y == 0).any()
    assert torch.all(y[1, 30:] == 7.0)
    assert torch.equal(aug.eval()(x, torch.tensor(lengths)), x)


def test_specaugment_deterministic_with_seed_and_leaves_global_rng_alone():
    lengths = torch.tensor([50, 30])
    x = _feats(lengths.tolist())
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = SpecAugment(seed=7).train()(x, lengths)
    assert torch.equal(torch.rand(3), expected_next)
    b = SpecAugment(seed=7).train()(x, lengths)
    assert torch.equal(a, b)
    assert not torch.equal(a, SpecAugment(seed=8).train()(x, lengths))


# --- NoiseInjector -----------------------------------------------------------------------------

def _measured_snr(clean, mixed, gain, n):
    added = mixed[:n].double() / gain - clean[:n].double()
    return 10 * math.log10(float((clean[:n].double() ** 2).mean() / (added**2).mean()))


def test_noise_snr_matches_target_over_real_samples():
    waves, lens = _waves([8000, 3000, 5000])
    noise = [torch.randn(20000) * 0.3, torch.randn(700)]  # the short one is looped
    inj = NoiseInjector(noise, snr_db=(0.0, 20.0), p=1.0, seed=0).train()
    res = inj(waves, lens)
    assert not torch.isnan(res.snr_db).any()
    for b, n in enumerate(lens.tolist()):
        assert abs(_measured_snr(waves[b], res.waves[b], float(res.gain[b]), n) - float(res.snr_db[b])) < 0.5
        assert torch.all(res.waves[b, n:] == 0)  # padding untouched


def test_noise_p0_leaves_input_unchanged_and_eval_is_identity():
    waves, lens = _waves([800, 500])
    res = NoiseInjector([torch.randn(1000)], p=0.0, seed=0).train()(waves, lens)
    assert torch.equal(res.waves, waves) and torch.isnan(res.snr_db).all()
    res = NoiseInjector([torch.randn(1000)], p=1.0, seed=0).eval()(waves, lens)
    assert torch.equal(res.waves, waves)


def test_noise_clip_safe_scaling_is_recorded():
    waves, lens = _waves([2000], amp=0.9)
    waves = waves.clamp(-0.99, 0.99)
    res = NoiseInjector([torch.randn(4000)], snr_db=(-5.0, -5.0), p=1.0, seed=0).train()(waves, lens)
    assert bool(res.clipped[0]) and res.waves.abs().max() <= 1.0 + 1e-6
    assert abs(_measured_snr(waves[0], res.waves[0], float(res.gain[0]), 2000) + 5.0) < 0.5


def test_noise_deterministic_with_seed_and_loads_files(tmp_path):
    from asrflow.audio import write_audio

    path = tmp_path / "noise.wav"
    write_audio(path, (0.2 * np.random.default_rng(0).standard_normal(3000)).astype(np.float32), 16000)
    waves, lens = _waves([1500, 1200, 900, 600])
    a = NoiseInjector([path], p=0.5, seed=3, sample_rate=16000).train()(waves, lens)
    b = NoiseInjector([str(path)], p=0.5, seed=3).train()(waves, lens)
    assert torch.equal(a.waves, b.waves)
    assert torch.equal(torch.isnan(a.snr_db), torch.isnan(b.snr_db))
    with pytest.raises(ValueError, match="Hz"):
        NoiseInjector([path], sample_rate=8000)


# --- SpeedPerturb ------------------------------------------------------------------------------

def test_speed_perturb_lengths_follow_factor_and_match_single_resampling():
    waves, lens = _waves([16000, 9000, 4001])
    sp = SpeedPerturb(factors=(0.9, 1.1), seed=0).train()
    out, new_lens, factors = sp(waves, lens)
    for b in range(3):
        n, f = int(lens[b]), float(factors[b])
        assert abs(int(new_lens[b]) - n / f) <= 1
        assert torch.all(out[b, int(new_lens[b]):] == 0)
        k = sp.factors.index(f)
        alone = sp.resamplers[k](waves[b:b + 1, :n])
        assert alone.size(1) == int(new_lens[b])
        torch.testing.assert_close(out[b, : alone.size(1)], alone[0], rtol=1e-5, atol=1e-6)


def test_speed_perturb_identity_factor_and_determinism():
    waves, lens = _waves([1000, 700])
    out, new_lens, _ = SpeedPerturb(factors=(1.0,)).train()(waves, lens)
    assert torch.equal(out, waves) and torch.equal(new_lens, lens)
    a = SpeedPerturb(seed=4).train()(waves, lens)
    b = SpeedPerturb(seed=4).train()(waves, lens)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


def test_explicit_generator_gives_same_draws_as_seed():
    waves, lens = _waves([1000, 700, 300])
    a = SpeedPerturb(generator=torch.Generator().manual_seed(9)).train()(waves, lens)
    b = SpeedPerturb(seed=9).train()(waves, lens)
    assert torch.equal(a[0], b[0])


def test_noisy_speech_is_renormalized_to_the_level_inference_gives_it():
    """Inference loudness-normalizes the (noisy) recording it gets; training renormalizes after mixing."""
    from asrflow.loudness import Frontend, active_rms_dbfs
    from asrflow.train.trainer import renormalize

    g = torch.Generator().manual_seed(0)
    waves = torch.zeros(2, 32000)
    waves[0, :24000] = 0.05 * torch.randn(24000, generator=g)  # a mix 3 dB hotter than the target, say
    waves[1, :32000] = 0.01 * torch.randn(32000, generator=g)
    lens = torch.tensor([24000, 32000])
    out = renormalize(waves, lens, Frontend(target_rms_dbfs=-23.0))
    for row, n in enumerate(lens.tolist()):
        assert abs(active_rms_dbfs(out[row, :n].numpy(), 16000) - (-23.0)) < 0.05
    assert not out[0, 24000:].any(), "padding stays silent"


# --- VTLP --------------------------------------------------------------------------------------

def test_mel_band_centres_are_the_filterbanks_peaks():
    """The centres VTLP interpolates between are where each front end's triangular filters peak."""
    from asrflow.train.features import LogMel
    from asrflow.train.pretrained.whisper import WhisperLogMel

    for frontend, fb in ((WhisperLogMel(80), WhisperLogMel(80).mel_filters.T),
                         (LogMel(80), LogMel(80).mel.mel_scale.fb)):
        centres = frontend.band_centres_hz()
        bin_hz = frontend.sample_rate / frontend.n_fft
        peaks = fb.argmax(dim=0).double() * bin_hz  # (mels,) the FFT bin each filter peaks at
        assert centres.shape == (80,) and bool((centres.diff() > 0).all())
        assert float((peaks - centres).abs().max()) <= bin_hz  # within one FFT bin


def test_vtlp_warp_is_continuous_keeps_the_band_and_scales_low_frequencies():
    f = torch.linspace(0, 8000, 8001, dtype=torch.float64)
    for alpha in (0.9, 0.95, 1.05, 1.1):
        src = vtlp_source_hz(f, alpha, 8000.0, 4800.0)
        assert float(src[0]) == 0.0 and abs(float(src[-1]) - 8000.0) < 1e-9  # 0 and Nyquist stay put
        assert bool((src.diff() > 0).all())  # monotone: no band is folded
        assert float(src.diff().max()) < 1.5 and float(src.diff().min()) > 0.5  # continuous, no jump
        assert abs(float(src[1000]) - 1000.0 / alpha) < 1e-9  # below the knee: formants times alpha
    assert torch.equal(vtlp_source_hz(f, 1.0, 8000.0, 4800.0), f)


def _tone_logmel(hz, seconds=1.0):
    from asrflow.train.pretrained.whisper import WhisperLogMel

    t = torch.arange(int(16000 * seconds), dtype=torch.float32) / 16000
    waves = (0.3 * torch.sin(2 * math.pi * hz * t))[None]
    frontend = WhisperLogMel(80)
    feats, lens = frontend(waves, torch.tensor([waves.size(1)]))
    return frontend, feats, lens


def _peak_hz(frontend, feats):
    return float(frontend.band_centres_hz()[int(feats[0, 10:-10].mean(dim=0).argmax())])


@pytest.mark.parametrize("alpha", [0.9, 1.1])
def test_vtlp_moves_a_tone_by_its_factor(alpha):
    """A 1 kHz tone's log-mel peak moves to about alpha kHz, as the tone at alpha kHz has it."""
    frontend, feats, lens = _tone_logmel(1000.0)
    vtlp = VocalTractLengthPerturb(factors=(alpha, alpha), seed=0).train()
    warped = vtlp(feats, lens, frontend.band_centres_hz(), 8000.0)
    _, reference, _ = _tone_logmel(1000.0 * alpha)
    assert abs(_peak_hz(frontend, warped) - _peak_hz(frontend, reference)) <= 60.0  # within a band there
    assert abs(_peak_hz(frontend, warped) - 1000.0 * alpha) <= 60.0


def test_vtlp_identity_cases_and_padding():
    feats = _feats([30, 12, 5], F=80, pad_value=0.0)
    lens = torch.tensor([30, 12, 5])
    centres = torch.linspace(50, 7500, 80, dtype=torch.float64)
    assert torch.equal(VocalTractLengthPerturb(factors=(1.0, 1.0), seed=0).train()(feats, lens, centres, 8000.0), feats)
    assert torch.equal(VocalTractLengthPerturb(p=0.0, seed=0).train()(feats, lens, centres, 8000.0), feats)
    assert torch.equal(VocalTractLengthPerturb(seed=0).eval()(feats, lens, centres, 8000.0), feats)
    out = VocalTractLengthPerturb(seed=0).train()(feats, lens, centres, 8000.0)
    assert not torch.equal(out, feats)
    for b, n in enumerate(lens.tolist()):
        assert not out[b, n:].any(), "padded frames stay zero"
        # an interpolation: each warped value lies within the frame's own range
        assert float(out[b, :n].max()) <= float(feats[b, :n].max()) + 1e-6
        assert float(out[b, :n].min()) >= float(feats[b, :n].min()) - 1e-6


def test_warp_log_mel_warps_each_utterance_by_its_own_factor_as_vtlp_does():
    """The fixed-factor warp (scripts/vtln_probe.py's test-time warp) is the perturbation's: a batch warped
    by the factors VTLP draws equals VTLP's output, and each row equals that row warped alone."""
    feats = _feats([30, 12, 5], F=80, pad_value=0.0)
    lens = torch.tensor([30, 12, 5])
    centres = torch.linspace(50, 7500, 80, dtype=torch.float64)
    alphas = VocalTractLengthPerturb(seed=3).draw(3)
    by_vtlp = VocalTractLengthPerturb(seed=3).train()(feats, lens, centres, 8000.0)
    batch = warp_log_mel(feats, alphas, centres, 8000.0, 4800.0)
    assert torch.equal(batch, by_vtlp)
    for b in range(3):
        assert torch.allclose(batch[b], warp_log_mel(feats[b:b + 1], alphas[b:b + 1], centres, 8000.0, 4800.0)[0])
    assert torch.equal(warp_log_mel(feats, torch.ones(3, dtype=torch.float64), centres, 8000.0, 4800.0), feats)


def test_vtlp_deterministic_with_seed_and_factors_in_range():
    a, b = VocalTractLengthPerturb(seed=5), VocalTractLengthPerturb(seed=5)
    assert torch.equal(a.draw(64), b.draw(64))
    alphas = VocalTractLengthPerturb(factors=(0.9, 1.1), seed=1).draw(500)
    assert float(alphas.min()) >= 0.9 and float(alphas.max()) <= 1.1 and float(alphas.std()) > 0.05
    half = VocalTractLengthPerturb(p=0.5, seed=1).draw(500)
    assert 150 < int((half == 1.0).sum()) < 350
    # the factors drawn where applied are the same ones p=1 draws: p only switches them off
    assert torch.equal(half[half != 1.0], alphas[half != 1.0])


def test_vtlp_rejects_bad_settings():
    with pytest.raises(ValueError, match="factors"):
        VocalTractLengthPerturb(factors=(1.1, 0.9))
    with pytest.raises(ValueError, match="p must"):
        VocalTractLengthPerturb(p=1.5)
    feats, lens = _feats([4], F=10), torch.tensor([4])
    with pytest.raises(ValueError, match="band centres"):
        VocalTractLengthPerturb(seed=0).train()(feats, lens, torch.linspace(50, 7000, 8, dtype=torch.float64), 8000.0)
    with pytest.raises(ValueError, match="Nyquist"):
        VocalTractLengthPerturb(boundary_hz=9000, seed=0).train()(feats, lens, torch.linspace(50, 7000, 10), 8000.0)


# --- random filtering (FilterAugment) ----------------------------------------------------------------

def _frontends():
    from asrflow.train.features import LogMel
    from asrflow.train.pretrained.whisper import WhisperLogMel
    return [LogMel(80), WhisperLogMel(80)]


@pytest.mark.parametrize("frontend", _frontends(), ids=["logmel", "whisper"])
def test_a_flat_filter_is_the_recording_played_louder(frontend):
    """A filter of +6 dB at every frequency (db_range (6, 6)) gives the features of the same recording 6 dB
    louder (amplitude x 10^(6/20)), in each front end's own log units, wherever the band is above the floor."""
    waves, lens = _waves([16000, 9000], seed=2, amp=0.05)
    feats, feat_lens = frontend(waves, lens)
    louder, _ = frontend(waves * 10 ** (6 / 20), lens)
    out = FilterAugment(db_range=(6.0, 6.0), seed=0).train()(feats, feat_lens, frontend.units_per_db)
    for b, n in enumerate(feat_lens.tolist()):
        real = feats[b, :n]
        # above the floor: LogMel's log(mel + 1e-6) bends below mel ~ 1e-3; Whisper's clamps at the peak - 8
        above = real > (math.log(1e-3) if frontend.units_per_db > 0.1 else float(real.min()) + 0.05)
        assert float(above.float().mean()) > 0.95
        torch.testing.assert_close(out[b, :n][above], louder[b, :n][above], atol=2e-3, rtol=0)
        assert torch.equal(out[b, n:], feats[b, n:]), "padded frames are never touched"


def test_a_tilt_lowers_high_bands_of_noise_by_its_gain():
    """A two-point filter (a tilt between two gains drawn in -12..0 dB at the band's ends): white noise's
    log-mel changes, band by band, by exactly the filter's gain in dB, a straight line from end to end."""
    from asrflow.train.features import LogMel
    frontend = LogMel(80)
    waves, lens = _waves([16000], seed=4, amp=0.1)
    feats, feat_lens = frontend(waves, lens)
    aug = FilterAugment(db_range=(-12.0, 0.0), n_points=(2, 2), seed=0).train()
    gains = FilterAugment(db_range=(-12.0, 0.0), n_points=(2, 2), seed=0).draw(1, 80)[0]
    out = aug(feats, feat_lens, frontend.units_per_db)
    change_db = (out - feats)[0].mean(dim=0) / frontend.units_per_db
    torch.testing.assert_close(change_db.double(), gains, atol=1e-3, rtol=0)
    # a straight line between the two ends: the middle of the band has their mean
    torch.testing.assert_close(gains[1:] - gains[:-1], torch.full((79,), float(gains[-1] - gains[0]) / 79,
                                                                  dtype=torch.float64), atol=1e-9, rtol=0)


def test_filter_gains_are_piecewise_linear_within_range_with_the_ends_as_points():
    g = torch.Generator().manual_seed(1)
    for n_points in (2, 3, 5, 8):
        gains = filter_gains_db(80, n_points, (-6.0, 6.0), g)
        assert gains.shape == (80,) and float(gains.abs().max()) <= 6.0
        kinks = int(((gains[2:] - 2 * gains[1:-1] + gains[:-2]).abs() > 1e-9).sum())
        assert kinks <= n_points - 2, "one straight piece between each pair of points"
    with pytest.raises(ValueError, match="at least 2 points"):
        filter_gains_db(80, 1, (-6.0, 6.0), g)


def test_filter_augment_identity_cases_determinism_and_p():
    feats = _feats([30, 12, 5], F=80, pad_value=0.0)
    lens = torch.tensor([30, 12, 5])
    assert torch.equal(FilterAugment(db_range=(0.0, 0.0), seed=0).train()(feats, lens, 0.23), feats)
    assert torch.equal(FilterAugment(p=0.0, seed=0).train()(feats, lens, 0.23), feats)
    assert torch.equal(FilterAugment(seed=0).eval()(feats, lens, 0.23), feats)
    out = FilterAugment(seed=0).train()(feats, lens, 0.23)
    assert not torch.equal(out, feats)
    for b, n in enumerate(lens.tolist()):
        assert not out[b, n:].any(), "padded frames stay zero"
        # one curve per utterance: every real frame moved by the same offset
        assert torch.allclose(out[b, :n] - feats[b, :n], (out[b, 0] - feats[b, 0]).expand(n, -1), atol=1e-6)
    assert torch.equal(FilterAugment(seed=5).draw(64, 80), FilterAugment(seed=5).draw(64, 80))
    every = FilterAugment(seed=1).draw(400, 80)
    half = FilterAugment(p=0.5, seed=1).draw(400, 80)
    off = (half == 0).all(dim=1)
    assert 120 < int(off.sum()) < 280
    # the curves drawn where applied are the ones p=1 draws: p only switches them off
    assert torch.equal(half[~off], every[~off])
    # gains spread over the range (a filter of 2-5 points at -6..6 dB per utterance)
    assert float(every.min()) < -5.0 and float(every.max()) > 5.0


def test_filter_augment_rejects_bad_settings():
    with pytest.raises(ValueError, match="db_range"):
        FilterAugment(db_range=(6.0, -6.0))
    with pytest.raises(ValueError, match="n_points"):
        FilterAugment(n_points=(1, 4))
    with pytest.raises(ValueError, match="n_points"):
        FilterAugment(n_points=(5, 3))
    with pytest.raises(ValueError, match="p must"):
        FilterAugment(p=-0.1)
    with pytest.raises(ValueError, match="points on only"):
        FilterAugment(n_points=(2, 12)).train()(_feats([4], F=10), torch.tensor([4]), 0.23)


def test_random_filtering_is_part_of_the_resume_fingerprint_only_when_on():
    """Off, the recipe's fingerprint is the one checkpoints written before the option existed carry (so they
    resume); on, a checkpoint trained without it is not resumed with it."""
    from asrflow.train.params import TrainParams
    off = TrainParams.from_config({}).fingerprint_spec(["a"], "plan")
    on = TrainParams.from_config({"filter_augment": {"enabled": True, "db_range": [-6.0, 6.0], "n_points": [2, 5],
                                                     "p": 1.0}}).fingerprint_spec(["a"], "plan")
    assert "filter_augment" not in off["params"]
    assert on["params"]["filter_augment"]["enabled"] is True
    assert {k: v for k, v in on["params"].items() if k != "filter_augment"} == off["params"]
