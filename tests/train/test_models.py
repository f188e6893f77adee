import pytest
import torch

from asrflow.train.models import (
    BiLSTMEncoder,
    ConformerEncoder,
    ConvSubsampling,
    batchnorm_modules,
    build_model,
    count_parameters,
    reverse_within_lengths,
)

N_MELS, VOCAB = 20, 7
TINY = {
    "conformer": {"name": "conformer", "d_model": 32, "num_heads": 2, "ffn_dim": 64, "num_layers": 2,
                  "kernel_size": 7, "subsampling_channels": 8, "dropout": 0.0},
    "bilstm": {"name": "bilstm", "d_model": 24, "hidden_size": 16, "num_layers": 2,
               "subsampling_channels": 8, "dropout": 0.0},
}


def _feats(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), N_MELS, generator=g)
    for b, n in enumerate(lengths):
        x[b, n:] = 0.0
    return x, torch.tensor(lengths)


@pytest.mark.parametrize("factor", [2, 3, 4, 6, 8])
def test_subsampling_lengths_are_exact(factor):
    sub = ConvSubsampling(N_MELS, 16, channels=4, factor=factor)
    for n in [1, 6, 7, 8, 9, 10, 23, 24, 25, 50]:
        x = torch.randn(1, n, N_MELS)
        y, lens = sub(x, torch.tensor([n]))
        expected = y.size(1) if n >= sub.min_input_frames else 0
        assert lens.item() == expected, (n, lens.item(), y.size(1))
    _, lens = sub(*_feats([100]))
    # unpadded convolutions lose their receptive field's edge, about min_input_frames / factor outputs
    assert abs(lens.item() - 100 / factor) < sub.min_input_frames / factor + 1


@pytest.mark.parametrize("name", ["conformer", "bilstm"])
def test_model_outputs_fp32_log_probs_and_lengths(name):
    torch.manual_seed(0)
    model = build_model(TINY[name], VOCAB, N_MELS).eval()
    x, lens = _feats([40, 33, 17])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_probs, out_lens = model(x, lens)
    assert log_probs.dtype == torch.float32
    assert log_probs.shape == (3, 9, VOCAB)
    assert out_lens.tolist() == model.output_lengths(lens).tolist() == [9, 7, 3]
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3, 9))


@pytest.mark.parametrize("name", ["conformer", "bilstm"])
def test_real_frames_do_not_depend_on_padding(name):
    torch.manual_seed(0)
    model = build_model(TINY[name], VOCAB, N_MELS).eval()
    x, lens = _feats([60, 25])
    with torch.no_grad():
        batched, out_lens = model(x, lens)
        alone, alone_lens = model(x[1:, :25], lens[1:])
    n = int(out_lens[1])
    assert n == int(alone_lens[0]) == alone.size(1)
    torch.testing.assert_close(batched[1, :n], alone[0], rtol=1e-4, atol=1e-5)


def test_masked_conformer_layers_match_torchaudio_without_padding():
    torch.manual_seed(0)
    enc = ConformerEncoder(16, num_heads=2, ffn_dim=32, num_layers=2, depthwise_conv_kernel_size=5).eval()
    x, lens = torch.randn(2, 11, 16), torch.tensor([11, 11])
    ours, _ = enc(x, lens)
    ref, _ = enc.conformer(x, lens)
    torch.testing.assert_close(ours, ref)


def _run(model, x, lens, seed):
    torch.manual_seed(seed)
    log_probs, out_lens = model(x, lens)
    mask = torch.arange(log_probs.size(1))[None, :] < out_lens[:, None]
    (log_probs * mask[:, :, None]).logsumexp(-1).sum().backward()
    return log_probs.detach()


@pytest.mark.parametrize("name", ["conformer", "bilstm"])
def test_gradient_checkpointing_matches_plain(name):
    cfg = dict(TINY[name], dropout=0.1)  # dropout on: recomputation must replay the same masks
    torch.manual_seed(0)
    plain = build_model(cfg, VOCAB, N_MELS).train()
    ckpt = build_model(dict(cfg, gradient_checkpointing=True), VOCAB, N_MELS).train()
    ckpt.load_state_dict(plain.state_dict())
    x, lens = _feats([30, 22])
    out_plain = _run(plain, x, lens, seed=5)
    out_ckpt = _run(ckpt, x, lens, seed=5)
    torch.testing.assert_close(out_ckpt, out_plain)
    for (name_p, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name_p)
    # BatchNorm running stats took exactly one update despite the recomputation
    for bp, bq in zip(batchnorm_modules(plain), batchnorm_modules(ckpt)):
        torch.testing.assert_close(bq.running_mean, bp.running_mean)
        torch.testing.assert_close(bq.running_var, bp.running_var)
        assert int(bq.num_batches_tracked) == int(bp.num_batches_tracked) == 1


def test_conformer_batchnorms_are_exposed():
    model = build_model(TINY["conformer"], VOCAB, N_MELS)
    assert len(batchnorm_modules(model)) == TINY["conformer"]["num_layers"]
    gn = build_model(dict(TINY["conformer"], use_group_norm=True), VOCAB, N_MELS)
    assert batchnorm_modules(gn) == []


def test_zero_length_utterance_does_not_poison_batch():
    model = build_model(TINY["conformer"], VOCAB, N_MELS).train()
    x, lens = _feats([30, 3])  # 3 frames -> 0 output frames
    log_probs, out_lens = model(x, lens)
    assert out_lens.tolist() == [6, 0]
    assert torch.isfinite(log_probs).all()


def test_build_model_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="model name"):
        build_model({"name": "transformer"}, VOCAB, N_MELS)
    with pytest.raises(ValueError, match="unknown"):
        build_model({"name": "bilstm", "hiden_size": 3}, VOCAB, N_MELS)


def test_bilstm_on_padded_batches_equals_the_packed_bilstm():
    """Both directions run on the padded batch (the backward one reversed within each length): real
    frames and their gradients equal nn.LSTM's on a PackedSequence, padding gets 0, an empty utterance too."""
    torch.manual_seed(0)
    enc = BiLSTMEncoder(6, hidden_size=5, num_layers=2, dropout=0.0)
    x = torch.randn(3, 20, 6, requires_grad=True)
    lens = torch.tensor([20, 13, 0])
    out, out_lens = enc(x, lens)
    ref = x
    for lstm in enc.layers:
        packed = torch.nn.utils.rnn.pack_padded_sequence(ref, lens.clamp_min(1), batch_first=True, enforce_sorted=False)
        ref = torch.nn.utils.rnn.pad_packed_sequence(lstm(packed)[0], batch_first=True, total_length=20)[0]
    assert out.shape == (3, 20, 10) and out_lens is lens
    torch.testing.assert_close(out[0], ref[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1, :13], ref[1, :13], atol=1e-6, rtol=0)
    assert out[1, 13:].abs().max() == 0 and out[2].abs().max() == 0
    grad, = torch.autograd.grad(out[:2].sum(), x, retain_graph=True)
    grad_ref, = torch.autograd.grad(ref[:2].sum(), x)
    torch.testing.assert_close(grad[:2], grad_ref[:2], atol=1e-6, rtol=0)
    assert grad[1, 13:].abs().max() == 0  # padding never reaches a real frame, in either direction
    alone, _ = enc(x[1:2, :13], lens[1:2])
    torch.testing.assert_close(alone[0], out[1, :13], atol=1e-6, rtol=0)
    assert torch.equal(reverse_within_lengths(torch.tensor([3, 0]), 4), torch.tensor([[2, 1, 0, 3], [0, 1, 2, 3]]))


def test_count_parameters():
    enc = BiLSTMEncoder(4, hidden_size=3, num_layers=1)
    assert count_parameters(enc) == 2 * 4 * 3 * (4 + 3 + 2)
    enc.layers[0].weight_ih_l0.requires_grad_(False)
    assert count_parameters(enc) == 2 * 4 * 3 * (4 + 3 + 2) - 4 * 3 * 4
    assert count_parameters(enc, trainable_only=False) == 2 * 4 * 3 * (4 + 3 + 2)


def test_cmvn_inside_model_and_normalized_flag():
    from asrflow.train.features import GlobalCMVN

    torch.manual_seed(0)
    cmvn = GlobalCMVN(torch.full((N_MELS,), 2.0), torch.full((N_MELS,), 3.0))
    model = build_model(TINY["conformer"], VOCAB, N_MELS, cmvn=cmvn).eval()
    x, lens = _feats([30, 20])
    with torch.no_grad():
        a, _ = model(x, lens)
        b, _ = model(cmvn(x, lens), lens, normalized=True)
    torch.testing.assert_close(a, b)
    assert {"cmvn.mean", "cmvn.std"} <= set(model.state_dict())


def test_intermediate_ctc_head_reads_its_layer_and_self_conditioning_feeds_it_back():
    from asrflow.train.losses import build_ctc_loss

    cfg = {**TINY["conformer"], "num_layers": 3}
    feats, lens = _feats([40, 33])
    torch.manual_seed(0)
    plain = build_model(cfg, VOCAB, N_MELS).eval()
    torch.manual_seed(0)
    inter = build_model({**cfg, "inter_ctc_layer": 1}, VOCAB, N_MELS).eval()
    inter.load_state_dict(plain.state_dict(), strict=False)  # the shared part
    (a, la), (b, lb) = plain(feats, lens), inter(feats, lens)
    assert torch.equal(a, b) and torch.equal(la, lb), "an intermediate head alone changes no output"
    mid = inter.intermediate_log_probs
    assert mid.shape == a.shape and torch.allclose(mid.exp().sum(-1), torch.ones(mid.shape[:2]), atol=1e-5)
    assert plain.intermediate_log_probs is None
    torch.manual_seed(0)
    cond = build_model({**cfg, "inter_ctc_layer": 1, "self_condition": True}, VOCAB, N_MELS).eval()
    cond.load_state_dict({**inter.state_dict(), **{k: v for k, v in cond.state_dict().items() if k.startswith("condition.")}})
    assert not torch.allclose(cond(feats, lens)[0], a), "self-conditioning feeds predictions forward"
    # both heads get gradients from the combined loss
    cond.train()
    out, out_lens = cond(feats, lens)
    loss_fn = build_ctc_loss("plain")
    targets, tlens = torch.tensor([[1, 2, 3], [2, 3, 0]]), torch.tensor([3, 2])
    loss = 0.7 * loss_fn(out, out_lens, targets, tlens).loss + 0.3 * loss_fn(cond.intermediate_log_probs, out_lens, targets, tlens).loss
    loss.backward()
    assert cond.inter_head.weight.grad.abs().sum() > 0 and cond.head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="inter_ctc_layer"):
        build_model({**cfg, "inter_ctc_layer": 3}, VOCAB, N_MELS)


def test_phone_ctc_head_reads_its_layer_and_changes_no_character_output():
    cfg = {**TINY["conformer"], "num_layers": 3}
    feats, lens = _feats([40, 33])
    torch.manual_seed(0)
    plain = build_model(cfg, VOCAB, N_MELS).eval()
    torch.manual_seed(0)
    phones = build_model({**cfg, "phone_ctc_layer": 1, "phone_vocab_size": 7}, VOCAB, N_MELS).eval()
    phones.load_state_dict(plain.state_dict(), strict=False)  # the shared part
    (a, la), (b, lb) = plain(feats, lens), phones(feats, lens)
    assert torch.equal(a, b) and torch.equal(la, lb), "a phone head alone changes no character output"
    lp = phones.phone_log_probs
    assert lp.shape == (*a.shape[:2], 7)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(lp.shape[:2]), atol=1e-5)
    assert plain.phone_log_probs is None
    # with an intermediate character head on another layer, both are produced in one pass
    both = build_model({**cfg, "phone_ctc_layer": 1, "phone_vocab_size": 7, "inter_ctc_layer": 2}, VOCAB, N_MELS)
    both(feats, lens)
    assert both.phone_log_probs.shape[-1] == 7 and both.intermediate_log_probs.shape[-1] == VOCAB
    with pytest.raises(ValueError, match="phone_ctc_layer must be between"):
        build_model({**cfg, "phone_ctc_layer": 3, "phone_vocab_size": 7}, VOCAB, N_MELS)
    with pytest.raises(ValueError, match="needs phone_vocab_size"):
        build_model({**cfg, "phone_ctc_layer": 1}, VOCAB, N_MELS)
