"""The frozen-encoder output cache (asrflow.train.pretrained.encoder_cache): what it stores, that a run
trained from it is the frozen run it replaces, and the recipes and caches it refuses."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from asrflow.text import CharVocab
from asrflow.train.data import read_samples
from asrflow.train.models import build_model
from asrflow.train.params import TrainParams
from asrflow.train.pretrained.encoder_cache import (FRAMES_FILE, EncoderCache, EncoderCacheError, build_cache,
                                                    check_recipe)
from tests.pretrained_checkpoints import write_tiny_ct2_whisper

from . import trainer_fixtures as F

OFF = {"enabled": False}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return F.build_setup(tmp_path_factory.mktemp("cache_setup"), n_train=12, n_dev=4)


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    """A tiny random Whisper encoder (CTranslate2 layout) taking up to 2 s, the setup's longest being 1.5 s."""
    folder, _ = write_tiny_ct2_whisper(tmp_path_factory.mktemp("ct2") / "whisper", max_positions=100)
    return folder


def frozen_params(whisper, **overrides):
    """A frozen-encoder recipe a cache can serve: no input augmentation, never unfrozen."""
    p = F.base_params()
    p.update({"model": {"name": "whisper_encoder", "checkpoint": str(whisper), "freeze": "all", "dropout": 0.0},
              "noise": OFF, "specaugment": OFF, "epochs": 3, "lr": 3e-3, "encoder_cache": True})
    p.update(overrides)
    return p


@pytest.fixture(scope="module")
def cache(setup, whisper, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache") / "encoder_cache"
    build_cache(setup.manifest, setup.plan, setup.vocab, frozen_params(whisper), folder)
    return folder


def test_the_cache_holds_each_utterance_encoded_alone(setup, whisper, cache):
    model = build_model(frozen_params(whisper)["model"], len(CharVocab.load(setup.vocab)), 80).eval()
    reader = EncoderCache(cache)
    ids = [u.id for u in setup.utts]
    assert sorted(reader.rows) == sorted(ids)  # every training and dev utterance, nothing else
    for u in setup.utts:
        wave = torch.from_numpy(read_samples(u.audio))[None]
        with torch.no_grad():
            hidden, lens = model.encode(*model.wave_frontend(wave, torch.tensor([wave.shape[1]])))
        cached, cached_lens = reader.read([u.id])
        assert int(cached_lens[0]) == int(lens[0]) > 0
        torch.testing.assert_close(cached, hidden[:, : int(lens[0])], rtol=1e-3, atol=1e-3)  # float16 storage
    assert (cache / FRAMES_FILE).stat().st_size == reader.n_frames * reader.d_model * 2
    both, both_lens = reader.read(ids[:2])
    short = int(both_lens.argmin())
    assert torch.count_nonzero(both[short, int(both_lens[short]):]) == 0  # zero-padded to the longer one


def _train(setup, params, out_dir, cache_dir=None):
    path = setup.root / f"params-{out_dir.name}.json"
    path.write_text(json.dumps(params))
    cmd = F.train_command(setup, path, out_dir)
    if cache_dir is not None:
        cmd += ["--encoder-cache", str(cache_dir)]
    result = F.run(cmd, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return json.loads((out_dir / "train_summary.json").read_text()), F.load_state(out_dir / "model.pt")


def test_a_cached_run_trains_only_the_head_and_matches_the_run_it_replaces(setup, whisper, cache, tmp_path):
    cached, cached_state = _train(setup, frozen_params(whisper), tmp_path / "cached", cache)
    audio, audio_state = _train(setup, frozen_params(whisper, encoder_cache=False), tmp_path / "audio")
    reference = build_model(frozen_params(whisper)["model"], len(CharVocab.load(setup.vocab)), 80).state_dict()
    for k, v in cached_state.items():
        if k.startswith("encoder."):
            assert torch.equal(v, reference[k]), k  # the frozen encoder is exported unchanged
    assert not torch.equal(cached_state["head.weight"], reference["head.weight"])
    # the same batches, the same head steps: only the cache's float16 rounding differs
    for a, b in zip(cached["history"], audio["history"]):
        assert a["step"] == b["step"]
        assert a["dev_loss"] == pytest.approx(b["dev_loss"], rel=1e-3)
    torch.testing.assert_close(cached_state["head.weight"], audio_state["head.weight"], rtol=1e-2, atol=1e-3)
    assert cached["history"][-1]["dev_loss"] < cached["history"][0]["dev_loss"]  # and it learns


@pytest.mark.parametrize("overrides, says", [
    ({"noise": {"enabled": True, "p": 0.5, "snr_db": [0.0, 20.0]}}, "noise.enabled: false"),
    ({"specaugment": {"enabled": True}}, "specaugment.enabled: false"),
    ({"speed_perturb": {"enabled": True, "factors": [0.9, 1.1]}}, "speed_perturb.enabled: false"),
    ({"vtlp": {"enabled": True}}, "vtlp.enabled: false"),
    ({"filter_augment": {"enabled": True}}, "filter_augment.enabled: false"),
    ({"model": {"name": "whisper_encoder", "freeze": 1}}, "freeze: all"),
    ({"model": {"name": "whisper_encoder", "freeze": "all", "unfreeze_after_steps": 10}}, "unfreeze_after_steps"),
    ({"model": {"name": "conformer"}}, "whisper_encoder"),
    ({"model": {"name": "whisper_encoder", "freeze": "all", "phone_ctc_layer": 2}}, "phone_ctc_layer is set"),
])
def test_recipes_a_cache_cannot_serve_are_refused(whisper, overrides, says):
    with pytest.raises(EncoderCacheError, match=says.replace(".", r"\.")):
        check_recipe(TrainParams.from_config(frozen_params(whisper, **overrides)))


def test_a_stale_incomplete_or_missing_cache_is_refused(setup, whisper, cache, tmp_path):
    reader = EncoderCache(cache)
    model = build_model(frozen_params(whisper)["model"], len(CharVocab.load(setup.vocab)), 80)
    reader.check(model.model_config, [u.id for u in setup.utts])  # the right one passes
    other = dict(model.model_config, checkpoint=str(tmp_path / "another"))
    with pytest.raises(EncoderCacheError, match=r"another encoder \(differs in \['checkpoint'\]\)"):
        reader.check(other, [])
    reader.check(dict(model.model_config, head_lstm_layers=2, freeze="all"), [])  # head options keep it valid
    with pytest.raises(EncoderCacheError, match="1 utterance\\(s\\) not cached, e.g. \\['nope'\\]"):
        reader.check(model.model_config, ["nope"])
    with pytest.raises(EncoderCacheError, match=f"{tmp_path / 'none'}: no encoder cache here"):
        EncoderCache(tmp_path / "none")


def test_a_cached_recipe_without_its_cache_folder_stops_at_once(setup, whisper, tmp_path):
    path = setup.root / "params-nocache.json"
    path.write_text(json.dumps(frozen_params(whisper)))
    result = F.run(F.train_command(setup, path, tmp_path / "out"), timeout=120)
    assert result.returncode != 0
    assert "no --encoder-cache folder was given" in result.stderr


def test_the_memory_map_is_not_pickled_into_loader_workers(cache):
    import pickle

    reader = EncoderCache(cache)
    reader.read([next(iter(reader.rows))])
    assert reader._frames is not None
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._frames is None and np.array_equal(clone.read(list(reader.rows)[:1])[0], reader.read(list(reader.rows)[:1])[0])
