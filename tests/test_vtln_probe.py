"""scripts/vtln_probe.py: its test-time warp goes through the model's own front end and acoustic model,
and factor 1 gives exactly the emissions evaluation computes."""
import importlib.util
from pathlib import Path

import numpy as np
import torch

from asrflow.evaluate.run import compute_emissions
from asrflow.text import CharVocab
from asrflow.train.features import LogMel
from asrflow.train.models import build_model
from asrflow.transcribe import Recognizer
from tests.train.trainer_fixtures import N_MELS, SR, TINY_MODEL, synth

REPO = Path(__file__).resolve().parents[1]


def load_probe():
    spec = importlib.util.spec_from_file_location("vtln_probe", REPO / "scripts" / "vtln_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_factor_one_is_evaluations_emissions_and_another_factor_changes_them():
    torch.manual_seed(0)
    vocab = CharVocab.build(["AB BAD", "CAB DE"])
    model = Recognizer(LogMel(N_MELS), build_model(dict(TINY_MODEL), len(vocab), N_MELS), vocab).eval()
    rng = np.random.default_rng(0)
    waves = {f"u{i}": torch.from_numpy(synth(text, rng, d).astype(np.float32))
             for i, (text, d) in enumerate([("AB", 0.8), ("CAB DE", 1.6), ("BAD", 1.1)])}
    probe = load_probe()
    reference = compute_emissions(model, waves, batch_size=2)
    unwarped = probe.warped_emissions(model, waves, 1.0, 4800.0, batch_size=2)
    warped = probe.warped_emissions(model, waves, 1.1, 4800.0, batch_size=2)
    assert set(unwarped) == set(reference) == set(warped)
    for uid in waves:
        assert torch.equal(unwarped[uid], reference[uid])
        assert warped[uid].shape == reference[uid].shape  # a warp along frequency keeps every frame
        assert not torch.allclose(warped[uid], reference[uid])
    assert SR == model.sample_rate
