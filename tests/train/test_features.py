import json

import pytest
import torch

from asrflow.train.features import CMVNAccumulator, GlobalCMVN, LogMel, compute_cmvn_stats


def _batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    waves = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        waves[i, :n] = 0.1 * torch.randn(n, generator=g)
    return waves, torch.tensor(lengths)


def test_logmel_shapes_and_exact_frame_lengths():
    fe = LogMel(n_mels=40)
    assert (fe.win_length, fe.hop_length) == (400, 160)
    waves, lens = _batch([16000, 8000, 400, 399])
    feats, frames = fe(waves, lens)
    assert frames.tolist() == [98, 48, 1, 0]
    assert feats.shape == (4, 98, 40) and feats.dtype == torch.float32
    assert torch.all(feats[1, 48:] == 0) and torch.all(feats[3] == 0)


def test_logmel_independent_of_padding():
    fe = LogMel(n_mels=40)
    waves, lens = _batch([4000, 1600])
    feats, frames = fe(waves, lens)
    alone, alone_frames = fe(waves[1:, :1600], lens[1:])
    assert frames[1] == alone_frames[0] == alone.size(1)
    torch.testing.assert_close(feats[1, : frames[1]], alone[0], rtol=1e-5, atol=1e-5)


def test_logmel_fp32_under_autocast():
    fe = LogMel(n_mels=40)
    waves, lens = _batch([3200])
    ref, _ = fe(waves, lens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = fe(waves, lens)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


def test_cmvn_stats_ignore_padding_and_match_direct_computation():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(3, 10, 4, generator=g) * 3 + 5
    lens = torch.tensor([10, 6, 3])
    feats_padded = feats.clone()
    for b, n in enumerate(lens.tolist()):
        feats_padded[b, n:] = 1e6  # garbage padding must not count
    cmvn = compute_cmvn_stats([(feats_padded[:2], lens[:2]), (feats_padded[2:], lens[2:])])
    real = torch.cat([feats[b, :n] for b, n in enumerate(lens.tolist())]).double()
    torch.testing.assert_close(cmvn.mean.double(), real.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cmvn.std.double(), real.std(0, unbiased=False), rtol=1e-5, atol=1e-5)
    assert cmvn.count == 19
    out = cmvn(feats_padded, lens)
    assert torch.all(out[2, 3:] == 0)
    normed = torch.cat([out[b, :n] for b, n in enumerate(lens.tolist())])
    torch.testing.assert_close(normed.mean(0), torch.zeros(4), atol=1e-5, rtol=0)


def test_cmvn_accumulator_merge_equals_single_pass():
    a, b, both = CMVNAccumulator(), CMVNAccumulator(), CMVNAccumulator()
    x, y = torch.randn(2, 5, 3), torch.randn(1, 7, 3)
    a.update(x, torch.tensor([5, 2]))
    b.update(y, torch.tensor([7]))
    both.update(x, torch.tensor([5, 2]))
    both.update(y, torch.tensor([7]))
    merged = a.merge(b)
    assert merged.count == both.count == 14
    torch.testing.assert_close(merged.mean_std()[0], both.mean_std()[0])


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_cmvn_save_load_roundtrip(tmp_path, suffix):
    cmvn = GlobalCMVN(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0]), count=7)
    path = tmp_path / f"cmvn{suffix}"
    cmvn.save(path)
    if suffix == ".json":
        assert json.loads(path.read_text())["count"] == 7
    loaded = GlobalCMVN.load(path)
    torch.testing.assert_close(loaded.mean, cmvn.mean)
    torch.testing.assert_close(loaded.std, cmvn.std)
    assert set(loaded.state_dict()) == {"mean", "std"}


def test_cmvn_rejects_empty_statistics():
    with pytest.raises(ValueError):
        compute_cmvn_stats([])
