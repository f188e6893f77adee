"""The voice adversary (asrflow.train.adversary): a classifier that learns the voices, an encoder that learns to
confuse it, pooling over real frames, and the trainer training both beside CTC while model.pt leaves it out."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F_
from torch import nn

from asrflow.train.adversary import (AdversarySettings, VoiceAdversary, attach_voice_adversary, confusion_scale,
                                     mean_pool, utterance_label)

from . import trainer_fixtures as F


def test_the_confusion_term_is_ramped_in_linearly():
    assert [confusion_scale(s, 200) for s in (0, 50, 200, 1000)] == [0.0, 0.25, 1.0, 1.0]
    assert confusion_scale(0, 0) == 1.0


def test_mean_pool_counts_real_frames_only():
    hidden = torch.randn(2, 6, 3)
    padded = hidden.clone()
    padded[1, 4:] = 1e6  # padding beyond row 1's 4 frames: must not count
    pooled = mean_pool(padded, torch.tensor([6, 4]))
    torch.testing.assert_close(pooled[0], hidden[0].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1, :4].mean(0))


class _Encoder(nn.Module):
    output_dim = 8

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 8)

    def forward(self, x, lens):
        return self.proj(x), lens


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = _Encoder()

    def forward(self, x, lens):
        return self.encoder(x, lens)


def _adversary_losses(model, x, lens, labels, confusion_weight=1.0):
    model(x, lens)
    return model.voice_adversary.loss(labels, confusion_weight)


def _two_voices():
    torch.manual_seed(0)
    x, lens = torch.randn(8, 10, 5), torch.full((8,), 10)
    x[:4] += 1.0  # two "voices" that differ in their mean: the classifier can tell them apart
    model = _Model()
    attach_voice_adversary(model, AdversarySettings(enabled=True), ["a", "b"])
    return model, x, lens, ["a"] * 4 + ["b"] * 4


def test_each_term_trains_its_own_side_only():
    """The classifier's cross-entropy reaches the classifier alone, the confusion term the encoder alone."""
    model, x, lens, labels = _two_voices()
    for term, trained, untouched in ((0, model.voice_adversary, model.encoder), (1, model.encoder, model.voice_adversary)):
        model.zero_grad(set_to_none=True)
        _adversary_losses(model, x, lens, labels)[term].backward()
        assert all(p.grad is None for p in untouched.parameters()), term
        assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in trained.parameters()), term


def test_the_classifier_learns_the_voice_and_the_encoder_learns_to_hide_it():
    """A gradient step on the classifier lowers its cross-entropy on the true voices; one on the encoder moves
    the classifier's prediction towards uniform (its confusion term falls towards ln 2)."""
    model, x, lens, labels = _two_voices()
    for term, part in ((0, model.voice_adversary), (1, model.encoder)):
        before = float(_adversary_losses(model, x, lens, labels)[term].detach())
        model.zero_grad(set_to_none=True)
        _adversary_losses(model, x, lens, labels)[term].backward()
        with torch.no_grad():
            for p in part.parameters():
                p -= 0.05 * p.grad
        after = float(_adversary_losses(model, x, lens, labels)[term].detach())
        assert after < before, (term, before, after)
    assert float(_adversary_losses(model, x, lens, labels)[1].detach()) >= math.log(2) - 1e-6


def test_the_confusion_term_is_lowest_for_a_prediction_that_says_nothing():
    """Its floor is ln(number of voices), reached by a uniform prediction; it is scaled by the ramp's weight."""
    model, x, lens, labels = _two_voices()
    with torch.no_grad():
        model.voice_adversary.net[2].weight.zero_()
        model.voice_adversary.net[2].bias.zero_()
    confused = _adversary_losses(model, x, lens, labels)[1]
    assert float(confused.detach()) == pytest.approx(math.log(2))
    assert float(_adversary_losses(model, x, lens, labels, 0.25)[1].detach()) == pytest.approx(0.25 * math.log(2))


def test_bad_settings_and_labels_are_refused_clearly():
    with pytest.raises(ValueError, match="label must be one of"):
        AdversarySettings(label="accent")
    with pytest.raises(ValueError, match="weight > 0"):
        AdversarySettings(weight=0.0)
    with pytest.raises(ValueError, match="use label: speaker"):
        utterance_label("", "s1", "voice")
    assert utterance_label("festival:kal_diphone", "s1", "voice") == "festival:kal_diphone"
    assert utterance_label("", "s1", "speaker") == "s1"
    adversary = VoiceAdversary(4, ["a", "b"])
    with pytest.raises(ValueError, match=r"\['c'\] are not among the training voices"):
        adversary.targets(["a", "c"], torch.device("cpu"))
    with pytest.raises(ValueError, match="at least 2"):
        attach_voice_adversary(_Model(), AdversarySettings(enabled=True), ["a"])
    with pytest.raises(ValueError, match="needs a model with an `encoder`"):
        attach_voice_adversary(nn.Linear(2, 2), AdversarySettings(enabled=True), ["a", "b"])


def test_the_index_reads_each_utterances_voice_from_the_manifest():
    from asrflow.manifest import Utterance
    from asrflow.train.data import UtteranceIndex

    synthetic = Utterance("u1", "a.wav", "HI", 1.0, 16000, "kal-s1", "en-us", "train",
                          {"engine": "festival", "voice": "kal_diphone"})
    real = Utterance("u2", "b.wav", "HI", 1.0, 16000, "1089", "en-us", "train")
    index = UtteranceIndex([synthetic, real])
    assert (index["u1"].voice, index["u1"].speaker) == ("festival:kal_diphone", "kal-s1")
    assert (index["u2"].voice, index["u2"].speaker) == ("", "1089")


ADVERSARY = {"enabled": True, "weight": 0.5, "label": "speaker", "hidden": 16, "ramp_steps": 2}


def test_the_trainer_trains_the_adversary_beside_ctc_and_model_pt_leaves_it_out(tmp_path):
    """training.voice_adversary on the tiny corpus (3 speakers): the classes are the training speakers, every
    step's loss holds the adversary's cross-entropy, its weights change and stay in the checkpoint state, and
    the exported weights load into the model rebuilt from model.pt's config, strictly."""
    from asrflow.transcribe import load_model
    from asrflow.train.run import export_model
    from asrflow.train.trainer import TrainState

    setup = F.build_setup(tmp_path / "data")
    ctx = F.single_process_context(setup, tmp_path, voice_adversary=ADVERSARY)
    adversary = ctx.model.voice_adversary
    assert adversary.classes == sorted({u.speaker for u in setup.utts if u.split == "train"})
    before = {k: v.clone() for k, v in adversary.state_dict().items()}
    seen, state = [], TrainState()
    F.run_steps(ctx, state, 3, hooks=[lambda c, s, r: seen.append(r.outcome.out)])
    assert len(seen) == 3 and all(o.adversary is not None and torch.isfinite(o.adversary) for o in seen)
    assert any(not torch.equal(before[k], v) for k, v in adversary.state_dict().items())
    assert any(k.startswith("voice_adversary.") for k in ctx.model.state_dict())  # checkpoints carry it
    export_model(ctx, state, tmp_path / "model.pt")
    saved = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("voice_adversary.") for k in saved["model"])
    recognizer = load_model(tmp_path / "model.pt")  # strict load of the exported weights into a rebuilt model
    batch = next(ctx.loader.batches([ctx.dev_ids[:2]]))
    ctx.model.eval()
    with torch.no_grad():  # the same CTC output: the adversary never changes what the model transcribes
        torch.testing.assert_close(recognizer.acoustic(*ctx.logmel(batch.waves, batch.wave_lens))[0],
                                   ctx.model(*ctx.logmel(batch.waves, batch.wave_lens))[0])


def test_the_adversary_loss_is_the_weighted_cross_entropy_of_the_batch(tmp_path):
    """What training_step adds: weight x (the classifier's cross-entropy on the batch's mean-pooled encoder output
    against its speakers + the ramp x its cross-entropy against the uniform distribution)."""
    from asrflow.train.trainer import add_adversary_loss, compute_loss, forward_batch

    setup = F.build_setup(tmp_path / "data")
    ctx = F.single_process_context(setup, tmp_path, voice_adversary=ADVERSARY)
    batch = next(ctx.loader.batches([[u.id for u in setup.utts if u.split == "train"][:4]]))
    ctx.model.eval()  # no dropout: the forward passes below agree
    out = compute_loss(ctx.model, ctx.loss_fn, batch, ctx.logmel, None, ctx.device, None, None)
    ctc_only = float(out.loss.detach())
    add_adversary_loss(ctx, out, batch, step=1)
    captured = {}
    handle = ctx.model.encoder.register_forward_hook(lambda m, i, o: captured.update(out=o))
    with torch.no_grad():
        forward_batch(ctx.model, batch, ctx.logmel, None, ctx.device, None)
        logits = ctx.model.voice_adversary.net(mean_pool(*captured["out"]))
    handle.remove()
    targets = torch.tensor([ctx.model.voice_adversary.classes.index(s) for s in batch.speakers])
    classify = float(F_.cross_entropy(logits, targets))
    confusion = float(-logits.log_softmax(-1).mean())  # against the uniform distribution
    assert float(out.adversary) == pytest.approx(classify, rel=1e-5)
    ramp = 1 / ADVERSARY["ramp_steps"]  # step 1 of 2
    assert float(out.loss.detach()) == pytest.approx(ctc_only + 0.5 * (classify + ramp * confusion), rel=1e-5)


def test_init_from_an_earlier_model_keeps_the_childs_fresh_adversary(tmp_path):
    """A run with a voice adversary can start from any earlier model.pt (which never holds one)."""
    from asrflow.text import CharVocab
    from asrflow.train.models import build_model
    from asrflow.train.pretrained import init_from_asrflow

    vocab = CharVocab(["<blank>", *"abc"])
    cfg = {"name": "conformer", "d_model": 16, "num_heads": 2, "ffn_dim": 16, "num_layers": 2, "kernel_size": 3,
           "subsampling_channels": 4, "dropout": 0.0}
    torch.manual_seed(1)
    parent = build_model(cfg, len(vocab), 20)
    torch.save({"model": parent.state_dict(), "model_config": cfg, "n_mels": 20, "vocab": vocab.to_dict(),
                "sample_rate": 16000}, tmp_path / "model.pt")
    torch.manual_seed(2)
    child = build_model(cfg, len(vocab), 20)
    attach_voice_adversary(child, AdversarySettings(enabled=True), ["a", "b"])
    fresh = {k: v.clone() for k, v in child.voice_adversary.state_dict().items()}
    report = init_from_asrflow(child, tmp_path / "model.pt", vocab)
    assert report.head_loaded and torch.equal(child.head.weight, parent.head.weight)
    assert all(torch.equal(v, fresh[k]) for k, v in child.voice_adversary.state_dict().items())


def test_a_voice_label_needs_voices_in_the_manifest_and_a_cache_is_refused(tmp_path):
    setup = F.build_setup(tmp_path / "data")
    with pytest.raises(ValueError, match="use label: speaker"):
        F.single_process_context(setup, tmp_path, voice_adversary={**ADVERSARY, "label": "voice"})
    with pytest.raises(ValueError, match="encoder_cache skips it"):
        F.single_process_context(setup, tmp_path, voice_adversary=ADVERSARY, encoder_cache=True)


def test_the_adversary_is_part_of_the_resume_fingerprint_only_when_on():
    from asrflow.train.params import TrainParams

    off = TrainParams().fingerprint_spec(["a"], "p")["params"]
    on = TrainParams(voice_adversary=dict(ADVERSARY)).fingerprint_spec(["a"], "p")["params"]
    assert "voice_adversary" not in off and on["voice_adversary"] == ADVERSARY
