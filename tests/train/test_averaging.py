"""Weight averaging (`average_of`): the mean of same-model parents, loadable by transcribe; a clear error
for parents that are not the same model."""
import json

import pytest
import torch

from asrflow.text import CharVocab
from asrflow.train.averaging import average_models, averaged_summary
from asrflow.train.models import build_model
from asrflow.train.pretrained.checkpoints import CheckpointError

CONFIG = {"name": "conformer", "d_model": 16, "num_heads": 2, "ffn_dim": 16, "num_layers": 1, "kernel_size": 3,
          "subsampling_channels": 4, "dropout": 0.0}
VOCAB = CharVocab(["<blank>", *"abcd "])


def write_model(path, seed, config=CONFIG, vocab=VOCAB, run_id="run"):
    torch.manual_seed(seed)
    model = build_model(config, len(vocab), 20)
    torch.save({"model": model.state_dict(), "model_config": dict(config), "n_mels": 20, "vocab": vocab.to_dict(),
                "sample_rate": 16000, "mlflow_run_id": run_id}, path)
    return model.state_dict()


def test_every_float_tensor_is_the_parents_mean_and_transcribe_loads_it(tmp_path):
    from asrflow.transcribe import emissions, load_model

    a = write_model(tmp_path / "a.pt", 1, run_id="run-a")
    b = write_model(tmp_path / "b.pt", 2, run_id="run-b")
    averaged = average_models([tmp_path / "a.pt", tmp_path / "b.pt"])
    floats = [k for k, v in a.items() if v.is_floating_point()]
    assert floats
    for k in floats:
        torch.testing.assert_close(averaged["model"][k], (a[k].double() + b[k].double()).div(2).to(a[k].dtype),
                                   rtol=0, atol=1e-7)
        assert not torch.equal(averaged["model"][k], a[k]) or torch.equal(a[k], b[k])
    assert [p["mlflow_run_id"] for p in averaged["averaged_from"]] == ["run-a", "run-b"]
    assert all(len(p["sha256"]) == 64 for p in averaged["averaged_from"])
    torch.save(averaged, tmp_path / "avg.pt")
    log_probs, lens = emissions(load_model(tmp_path / "avg.pt"), [torch.randn(8000), torch.randn(4000)])
    assert log_probs.shape[0] == 2 and log_probs.shape[-1] == len(VOCAB) and torch.isfinite(log_probs).all()
    assert torch.allclose(log_probs.exp().sum(-1)[0, : int(lens[0])], torch.ones(int(lens[0])), atol=1e-4)


def test_a_model_averaged_with_itself_is_bitwise_unchanged(tmp_path):
    a = write_model(tmp_path / "a.pt", 1)
    averaged = average_models([tmp_path / "a.pt", tmp_path / "a.pt", tmp_path / "a.pt"])
    for k, v in a.items():
        assert torch.equal(averaged["model"][k], v), k


def test_stages_that_differ_only_in_training_settings_average(tmp_path):
    write_model(tmp_path / "a.pt", 1, config={**CONFIG, "gradient_checkpointing": False, "dropout": 0.0})
    write_model(tmp_path / "b.pt", 2, config={**CONFIG, "gradient_checkpointing": True, "dropout": 0.1})
    averaged = average_models([tmp_path / "a.pt", tmp_path / "b.pt"])
    assert averaged["model_config"]["dropout"] == 0.1  # the last stage's, as exported


def test_parents_that_are_not_one_model_stop_with_the_path_and_the_difference(tmp_path):
    write_model(tmp_path / "a.pt", 1)
    write_model(tmp_path / "vocab.pt", 2, vocab=CharVocab(["<blank>", *"abcde "]))
    write_model(tmp_path / "arch.pt", 3, config={**CONFIG, "ffn_dim": 32})
    with pytest.raises(CheckpointError, match=r"vocab\.pt: its vocabulary differs"):
        average_models([tmp_path / "a.pt", tmp_path / "vocab.pt"])
    with pytest.raises(CheckpointError, match=r"arch\.pt: its model_config differs"):
        average_models([tmp_path / "a.pt", tmp_path / "arch.pt"])
    with pytest.raises(CheckpointError, match="missing.pt"):
        average_models([tmp_path / "a.pt", tmp_path / "missing.pt"])
    with pytest.raises(CheckpointError, match="at least two"):
        average_models([tmp_path / "a.pt"])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: cannot read"):
        average_models([tmp_path / "a.pt", tmp_path / "junk.pt"])


def test_the_summary_counts_every_parents_training(tmp_path):
    for name, steps, seconds in (("s1", 4200, 4323.0), ("s2", 2300, 2533.4)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"variant": name, "global_step": steps,
                                                           "train_seconds": seconds, "history": [{}]}))
    s = averaged_summary("avg", [tmp_path / "s1.json", tmp_path / "s2.json"])
    assert s["global_step"] == 6500 and s["train_seconds"] == pytest.approx(6856.4)
    assert s["history"] == [] and s["averaged_from"] == ["s1", "s2"]


# ------------------------------------------------------------------------ pretrained_share (WiSE-FT)


def write_finetuned_whisper(tmp_path, seed=7):
    """(model.pt path, the pretrained encoder's state) of a tiny whisper_encoder 'fine-tuned' from a tiny
    CTranslate2 checkpoint: every tensor moved away from the checkpoint's, as training would."""
    from tests.pretrained_checkpoints import write_tiny_ct2_whisper
    from asrflow.train.pretrained import build_pretrained_model, exportable_model_config

    folder, _ = write_tiny_ct2_whisper(tmp_path / "ct2", seed=3)
    config = {"name": "whisper_encoder", "checkpoint": str(folder), "freeze": "none", "head_lstm_layers": 0}
    model = build_pretrained_model(config, len(VOCAB))
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    path = tmp_path / "ft.pt"
    torch.save({"model": model.state_dict(), "model_config": exportable_model_config(model, config), "n_mels": 80,
                "vocab": VOCAB.to_dict(), "sample_rate": 16000, "mlflow_run_id": "ft"}, path)
    return path, pretrained


def test_a_pretrained_share_moves_only_the_encoder_back_towards_its_checkpoint(tmp_path):
    from asrflow.train.averaging import mix_with_pretrained, pretrained_part

    path, pretrained = write_finetuned_whisper(tmp_path)
    ckpt = average_models([path], min_parents=1)
    part = pretrained_part(ckpt)
    assert part and set(part) < set(ckpt["model"])  # the head has no pretrained counterpart
    for k, v in part.items():  # read again from the checkpoint the model_config names
        torch.testing.assert_close(v, pretrained[k], rtol=0, atol=0)
    unchanged, back, quarter = (mix_with_pretrained(ckpt, part, s)["model"] for s in (0.0, 1.0, 0.25))
    for k, v in ckpt["model"].items():
        assert torch.equal(unchanged[k], v), k
        if k in part:
            torch.testing.assert_close(back[k], pretrained[k], rtol=0, atol=1e-7)
            torch.testing.assert_close(quarter[k], (0.75 * v.double() + 0.25 * pretrained[k].double()).to(v.dtype),
                                       rtol=0, atol=1e-7)
        else:  # CTC head (and buffers): the fine-tuned model's own
            assert torch.equal(back[k], v) and torch.equal(quarter[k], v), k
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mix_with_pretrained(ckpt, part, 1.5)


def test_the_share_with_the_lowest_dev_score_is_chosen_and_recorded(tmp_path):
    from asrflow.train.averaging import choose_pretrained_share, pretrained_part

    path, _ = write_finetuned_whisper(tmp_path)
    ckpt = average_models([path], min_parents=1)
    first_encoder_tensor = next(iter(pretrained_part(ckpt)))
    seen = []

    def score(candidate):  # stands in for the dev CER: lowest at the third share scored (0.5)
        share = len(seen) / 4
        seen.append(candidate["model"][first_encoder_tensor])
        return {"cer": abs(share - 0.5), "blank_penalty": 0.0}

    model, grid = choose_pretrained_share(ckpt, [0.75, 0.0, 0.5, 0.25], score)
    assert [row["share"] for row in grid] == [0.0, 0.25, 0.5, 0.75]  # each share scored once, in order
    assert model["pretrained_share"]["chosen"] == 0.5 and model["pretrained_share"]["grid"] == grid
    torch.testing.assert_close(model["model"][first_encoder_tensor], seen[2], rtol=0, atol=0)
    # a tie keeps the smallest share (the least change to the fine-tuned model)
    model, _ = choose_pretrained_share(ckpt, [0.5, 0.25], lambda c: {"cer": 0.1})
    assert model["pretrained_share"]["chosen"] == 0.25
    with pytest.raises(ValueError, match="empty"):
        choose_pretrained_share(ckpt, [], score)
    # no dev set: nothing to choose by, said as such (tune_blank_penalty's cer is None there)
    with pytest.raises(ValueError, match="dev split"):
        choose_pretrained_share(ckpt, [0.0], lambda c: {"cer": None, "blank_penalty": 0.0})


def test_a_pretrained_share_needs_a_pretrained_encoder_and_its_checkpoint(tmp_path):
    from asrflow.train.averaging import pretrained_part

    write_model(tmp_path / "scratch.pt", 1)
    with pytest.raises(CheckpointError, match="nothing to mix back"):
        pretrained_part(average_models([tmp_path / "scratch.pt"], min_parents=1))
    path, _ = write_finetuned_whisper(tmp_path)
    ckpt = average_models([path], min_parents=1)
    (tmp_path / "ct2" / "model.bin").unlink()
    with pytest.raises(CheckpointError, match="model.bin"):
        pretrained_part(ckpt)


def test_a_wav2vec2_model_mixes_back_the_same_way(tmp_path):
    pytest.importorskip("transformers", reason="transformers writes the tiny wav2vec2 checkpoint")
    from tests.pretrained_checkpoints import write_hf_w2v
    from asrflow.train.averaging import mix_with_pretrained, pretrained_part
    from asrflow.train.pretrained import build_pretrained_model, exportable_model_config

    folder, _ = write_hf_w2v(tmp_path / "w2v")
    config = {"name": "wav2vec2", "checkpoint": str(folder), "freeze": "none"}
    model = build_pretrained_model(config, len(VOCAB))
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    ckpt = {"model": model.state_dict(), "model_config": exportable_model_config(model, config), "n_mels": 80,
            "vocab": VOCAB.to_dict(), "sample_rate": 16000}
    part = pretrained_part(ckpt)
    assert part and any(k not in part for k in ckpt["model"])  # the CTC head is not pretrained
    back = mix_with_pretrained(ckpt, part, 1.0)["model"]
    for k, v in back.items():
        expected = pretrained[k] if k in part else ckpt["model"][k]
        torch.testing.assert_close(v, expected, rtol=0, atol=1e-6)
    # pretrained_share_blocks 0: wav2vec2's stem only (CNN feature encoder, feature projection, positional conv)
    stem = pretrained_part(ckpt, 0)
    assert stem and set(stem) < set(part)
    assert all(".feature_extractor." in k or ".feature_projection." in k or ".pos_conv_embed." in k for k in stem), sorted(stem)
    assert all(".layers." not in k for k in stem)


def _block_of(name):
    """The encoder block index in a tensor's name (``...layers.<i>....``), None outside the blocks."""
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def test_pretrained_share_blocks_mixes_back_only_the_stem_and_the_lowest_blocks(tmp_path):
    from asrflow.train.averaging import encoder_blocks, mix_with_pretrained, pretrained_part

    path, pretrained = write_finetuned_whisper(tmp_path)
    ckpt = average_models([path], min_parents=1)
    n = encoder_blocks(ckpt)
    assert n == 1 + max(_block_of(k) for k in ckpt["model"] if _block_of(k) is not None) and n >= 2
    everything = pretrained_part(ckpt)
    assert set(pretrained_part(ckpt, n)) == set(everything)  # k = the block count: the whole encoder
    stem_only, lowest = pretrained_part(ckpt, 0), pretrained_part(ckpt, 1)
    assert set(stem_only) == {k for k in everything if k.startswith(("encoder.conv1.", "encoder.conv2."))}
    assert set(lowest) == set(stem_only) | {k for k in everything if _block_of(k) == 0}
    mixed = mix_with_pretrained(ckpt, lowest, 0.5)["model"]
    for k, v in ckpt["model"].items():
        if k in lowest:
            torch.testing.assert_close(mixed[k], (0.5 * v.double() + 0.5 * pretrained[k].double()).to(v.dtype),
                                       rtol=0, atol=1e-7)
        else:  # blocks above k, the final layer norm, the head: the fine-tuned model's, bit for bit
            assert torch.equal(mixed[k], v), k
    with pytest.raises(ValueError, match=f"encoder has {n} blocks"):
        pretrained_part(ckpt, n + 1)


def test_the_share_and_the_depth_are_chosen_together_on_dev(tmp_path):
    from asrflow.train.averaging import choose_pretrained_share, pretrained_part

    path, _ = write_finetuned_whisper(tmp_path)
    ckpt = average_models([path], min_parents=1)
    block0 = next(k for k in pretrained_part(ckpt, 1) if _block_of(k) == 0)
    block1 = next(k for k in pretrained_part(ckpt, 2) if _block_of(k) == 1)
    fine_tuned = ckpt["model"]

    def score(candidate):  # stands in for the dev CER: best where block 0 moves and block 1 does not
        moved0 = not torch.equal(candidate["model"][block0], fine_tuned[block0])
        moved1 = not torch.equal(candidate["model"][block1], fine_tuned[block1])
        return {"cer": 0.2 - 0.05 * moved0 + 0.1 * moved1}

    model, grid = choose_pretrained_share(ckpt, [0.0, 0.3, 0.6], score, blocks=[2, 1])
    # share 0 is the fine-tuned model whatever the depth: scored once; then each (share, k) in order
    assert [(row["share"], row["blocks"]) for row in grid] == [(0.0, 1), (0.3, 1), (0.3, 2), (0.6, 1), (0.6, 2)]
    chosen = model["pretrained_share"]
    assert (chosen["chosen"], chosen["blocks"], chosen["encoder_blocks"]) == (0.3, 1, 2)  # the tie at 0.6: the smaller share
    assert torch.equal(model["model"][block1], fine_tuned[block1])
    assert not torch.equal(model["model"][block0], fine_tuned[block0])
    # without blocks: the whole encoder, recorded as its block count
    model, grid = choose_pretrained_share(ckpt, [0.0, 0.5], lambda c: {"cer": 0.1})
    assert [row["blocks"] for row in grid] == [2, 2] and model["pretrained_share"]["blocks"] == 2
