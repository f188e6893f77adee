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
