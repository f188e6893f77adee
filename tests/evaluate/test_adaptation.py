"""Test-time adaptation (asrflow.evaluate.adaptation) on a small randomly initialised Whisper-encoder recognizer."""
from __future__ import annotations

import pytest
import torch

from asrflow.evaluate.adaptation import (AdaptSettings, adapted_emissions, adapted_log_probs, adapted_parameters,
                                         entropy_of_speech_frames)
from asrflow.text import CharVocab
from asrflow.train.models import build_model
from asrflow.transcribe import Recognizer

VOCAB = CharVocab(["<blank>", "<unk>", "|", *"ABCDE"])


@pytest.fixture()
def recognizer():
    torch.manual_seed(0)
    acoustic = build_model({"name": "whisper_encoder", "d_model": 32, "num_layers": 2, "num_heads": 4, "ffn_dim": 64,
                            "n_mels": 80, "max_positions": 200, "dropout": 0.0}, len(VOCAB), 80)
    return Recognizer(acoustic.wave_frontend, acoustic, VOCAB).eval()


def _waves(n=3, seconds=0.6):
    g = torch.Generator().manual_seed(1)
    return {f"u{i}": 0.1 * torch.randn(int(seconds * 16000) + 800 * i, generator=g) for i in range(n)}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_no_steps_is_plain_decoding(recognizer):
    wave = _waves(1)["u0"]
    with torch.no_grad():
        lp, lens = recognizer(wave[None], torch.tensor([len(wave)]))
    torch.testing.assert_close(adapted_log_probs(recognizer, wave, AdaptSettings(0)), lp[0, : int(lens[0])])


@pytest.mark.parametrize("which", ["norms", "all"])
def test_adaptation_lowers_the_entropy_and_leaves_the_model_as_it_was(recognizer, which):
    wave = _waves(1)["u0"]
    before = _state(recognizer)
    plain = adapted_log_probs(recognizer, wave, AdaptSettings(0))
    adapted = adapted_log_probs(recognizer, wave, AdaptSettings(8, 1e-2 if which == "norms" else 1e-3, 2.5, which))
    assert adapted.shape == plain.shape
    blank = VOCAB.blank_id
    assert entropy_of_speech_frames(adapted, blank, 2.5) < entropy_of_speech_frames(plain, blank, 2.5)
    after = recognizer.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # episodic: the trained weights untouched
    assert not any(p.requires_grad and p.grad is not None for p in recognizer.parameters())


def test_norms_only_changes_the_layernorms(recognizer):
    norms = {id(p) for p in adapted_parameters(recognizer.acoustic, "norms")}
    assert norms and len(norms) < len(list(recognizer.acoustic.parameters()))
    assert all(isinstance(m, torch.nn.LayerNorm) for m in recognizer.acoustic.modules()
               if any(id(p) in norms for p in m.parameters(recurse=False)))
    assert len(adapted_parameters(recognizer.acoustic, "all")) == len(list(recognizer.acoustic.parameters()))


def test_each_utterance_is_adapted_alone(recognizer):
    """The result for an utterance depends neither on the others nor on their order."""
    waves = _waves(3)
    st = AdaptSettings(3, 1e-2)
    together = adapted_emissions(recognizer, waves, st)
    alone = adapted_emissions(recognizer, {"u1": waves["u1"]}, st)
    reversed_order = adapted_emissions(recognizer, waves, st, ids=["u2", "u1", "u0"])
    torch.testing.assert_close(together["u1"], alone["u1"])
    for uid in waves:
        torch.testing.assert_close(together[uid], reversed_order[uid])


def test_settings_are_checked():
    with pytest.raises(ValueError):
        AdaptSettings(-1)
    with pytest.raises(ValueError):
        AdaptSettings(3, lr=0)
    with pytest.raises(ValueError, match="parameters"):
        AdaptSettings(3, parameters="heads")
    assert not AdaptSettings(0).enabled and AdaptSettings(1).enabled


def test_entropy_ignores_blank_frames():
    confident_blank = torch.log(torch.tensor([[0.97, 0.01, 0.01, 0.01]] * 3))
    unsure_speech = torch.log(torch.tensor([[0.1, 0.4, 0.3, 0.2]]))
    lp = torch.cat([confident_blank, unsure_speech])
    assert entropy_of_speech_frames(lp, 0, 1.0) == pytest.approx(entropy_of_speech_frames(unsure_speech, 0, 1.0))
    assert entropy_of_speech_frames(confident_blank, 0, 1.0) > 0  # all blank: every frame counts


def test_transcribe_flags_override_the_evaluations_adaptation(tmp_path):
    import json

    from asrflow.transcribe import decoding_options

    assert decoding_options(None, {})["adaptation"] is None
    assert decoding_options(None, {"adapt_steps": 3})["adaptation"] == AdaptSettings(3).to_dict()
    chosen = AdaptSettings(5, 3e-5).to_dict()
    path = tmp_path / "decoding.json"
    path.write_text(json.dumps({"blank_penalty": 0.5, "adaptation": chosen}))
    assert decoding_options(path, {})["adaptation"] == chosen
    assert decoding_options(path, {"adapt_lr": 2e-5})["adaptation"] == {**chosen, "lr": 2e-5}
    assert AdaptSettings.from_dict(decoding_options(path, {"adapt_steps": 0})["adaptation"]).enabled is False
