"""Inference sees what training saw: a ±20 dB gain change does not move the CER (issue 11), and
``asrflow-transcribe`` on a file gives what the evaluation's path gives.

A tiny conformer is trained here, in process, on loudness-normalized tone "speech" (the letters of
tests/train/trainer_fixtures.py), exported in model.pt's format, and scored on a test set played at
the original level and 20 dB louder and quieter.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from asrflow.evaluate.scoring import score_corpus
from asrflow.loudness import Frontend
from asrflow.manifest import Utterance, read_records, write_manifest
from asrflow.text import CharVocab
from asrflow.train.features import LogMel, compute_cmvn_stats
from asrflow.train.models import build_model
from asrflow.transcribe import load_for_model, load_model, transcribe
from asrflow.transcribe import main as transcribe_main
from tests.train.trainer_fixtures import N_MELS, SR, TINY_MODEL, WORDS, synth

STEPS = 220
GAINS_DB = (-20.0, 20.0)


def make_data(n: int, seed: int) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        text = " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), size=int(rng.integers(1, 3))))
        out.append((text, synth(text, rng, round(float(rng.uniform(0.6, 1.4)), 3))))
    return out


def _batch(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([len(w) for w in waves])
    x = torch.zeros(len(waves), int(lens.max()))
    for i, w in enumerate(waves):
        x[i, : len(w)] = w
    return x, lens


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """model.pt of a tiny model trained on normalized audio, and a test set written at three levels."""
    root = tmp_path_factory.mktemp("gain")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    fe = Frontend()
    train = [(t, torch.from_numpy(fe.normalize(w))) for t, w in make_data(48, seed=0)]  # what prep writes
    vocab = CharVocab.build(t for t, _ in train)
    logmel = LogMel(N_MELS)
    cmvn = compute_cmvn_stats(logmel(w[None], torch.tensor([len(w)])) for _, w in train)
    model = build_model(dict(TINY_MODEL), len(vocab), N_MELS, cmvn=cmvn)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ctc = torch.nn.CTCLoss(zero_infinity=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        items = [train[i] for i in torch.randperm(len(train), generator=gen)[:8].tolist()]
        feats, feat_lens = logmel(*_batch([w for _, w in items]))
        log_probs, out_lens = model(feats, feat_lens)
        targets = [torch.tensor(vocab.encode(t)) for t, _ in items]
        loss = ctc(log_probs.transpose(0, 1), torch.cat(targets), out_lens, torch.tensor([len(t) for t in targets]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    path = root / "model.pt"
    # the keys the training rule's export writes, plus the front end it is asked to store
    torch.save({"model": model.state_dict(), "model_config": dict(TINY_MODEL), "n_mels": N_MELS,
                "vocab": vocab.to_dict(), "sample_rate": SR, "frontend": fe.to_dict()}, path)

    test = make_data(16, seed=1)
    files: dict[str, list] = {}
    for name, gain_db, subtype in (("ref", 0.0, "FLOAT"), ("-20", -20.0, "FLOAT"), ("+20", 20.0, "FLOAT"),
                                   ("-20 pcm16", -20.0, "PCM_16")):
        paths = []
        for k, (_, w) in enumerate(test):
            p = root / f"{name.replace(' ', '_')}_{k:02d}.wav"
            # the synthesizer's level (peaks near 0.4), i.e. not what prep normalizes to
            sf.write(p, w * np.float32(10 ** (gain_db / 20)), SR, subtype=subtype)
            paths.append(p)
        files[name] = paths
    return {"root": root, "model": path, "refs": [t for t, _ in test], "files": files}


def test_a_20_db_gain_change_moves_cer_by_at_most_2_points(trained):
    model = load_model(trained["model"])
    assert model.frontend == Frontend()
    cer = {name: score_corpus(trained["refs"], transcribe(model, paths)).cer for name, paths in trained["files"].items()}
    assert cer["ref"] < 0.25, f"the tiny model did not learn (CER {cer['ref']:.1%}), so the test would prove nothing"
    for name, value in cer.items():
        assert abs(value - cer["ref"]) <= 0.02, cer


def test_the_front_end_makes_features_level_invariant_and_the_decoded_text_identical(trained):
    model = load_model(trained["model"])
    logmel = LogMel(N_MELS)
    hyps = {}
    for name in ("ref", "-20", "+20"):
        paths = trained["files"][name]
        waves = [load_for_model(p, model.frontend) for p in paths]
        feats = [logmel(w[None], torch.tensor([len(w)]))[0][0] for w in waves]
        if name == "ref":
            ref_feats = feats
        else:
            for a, b in zip(feats, ref_feats):
                torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)
        hyps[name] = transcribe(model, paths)
    assert hyps["-20"] == hyps["ref"] == hyps["+20"]
    # without the normalization the features move with the level (what the test guards against)
    raw = [torch.from_numpy(sf.read(p, dtype="float32")[0]) for p in (trained["files"]["ref"][0], trained["files"]["-20"][0])]
    raw_feats = [logmel(w[None], torch.tensor([len(w)]))[0][0] for w in raw]
    assert (raw_feats[0] - raw_feats[1]).mean() > 2.0


def write_heldout_noise(tmp_path) -> Path:
    """A noise manifest of one 2 s held-out recording (what evaluate() mixes its SNR conditions from)."""
    from asrflow.data.demand import write_noise_manifest

    noise_path = tmp_path / "noise.wav"
    sf.write(noise_path, (0.05 * np.random.default_rng(3).standard_normal(2 * SR)).astype(np.float32), SR)
    noise_manifest = tmp_path / "noise.jsonl"
    write_noise_manifest(noise_manifest, [{"id": "demand-PARK-ch01", "env": "PARK", "channel": 1, "audio": str(noise_path),
                                           "duration": 2.0, "sample_rate": SR, "split": "heldout", "rms_dbfs": -26.0}])
    return noise_manifest


def _transcribe_cli(capsys, argv: list[str]) -> dict[str, str]:
    """asrflow-transcribe's printed lines, as {audio path: text}."""
    capsys.readouterr()
    assert transcribe_main(argv) == 0
    out = {}
    for line in capsys.readouterr().out.splitlines():
        path, _, text = line.partition("\t")
        out[path] = text
    return out


def test_transcribe_of_a_file_equals_the_evaluation_path(trained, tmp_path, capsys):
    """A stereo 22.05 kHz recording at another level, and plain ones: evaluate() scores what transcribe says."""
    from asrflow.evaluate.ngram_lm import build_lm
    from asrflow.evaluate.run import EvalSettings, compute_emissions, evaluate, greedy, load_waves

    model = load_model(trained["model"])
    utts = []
    for k, (ref, path) in enumerate(zip(trained["refs"], trained["files"]["-20"])):
        if k == 0:  # a stereo 22.05 kHz copy at yet another level
            x, _ = sf.read(path, dtype="float32")
            x = torch.from_numpy(x * np.float32(3.0))
            import torchaudio

            y = torchaudio.functional.resample(x, SR, 22050).numpy()
            path = tmp_path / "stereo22k.wav"
            sf.write(path, np.stack([y, 0.5 * y], axis=1), 22050, subtype="FLOAT")
        split = "test" if k < 10 else "dev"
        utts.append(Utterance(id=f"t{k:02d}", audio=str(path), text=ref, duration=1.0, sample_rate=SR, speaker="s1",
                              dialect="d1", split=split, extra={"engine": "tones"}))
    manifest = tmp_path / "manifest.jsonl"
    write_manifest(manifest, utts, relative_audio=False)
    noise_manifest = write_heldout_noise(tmp_path)
    lm = tmp_path / "words.arpa"
    build_lm([" ".join(np.random.default_rng(i).choice(WORDS, 3)) for i in range(60)], lm, order=3)

    test = [u for u in utts if u.split == "test"]
    # the evaluation's front end is transcribe's, sample for sample
    waves = load_waves(test, model.frontend)
    for u in test:
        assert torch.equal(waves[u.id], load_for_model(u.audio, model.frontend))

    settings = EvalSettings(snr_levels=(10.0,), beam_size=8, beam_size_token=8, lm_weights=(0.5, 1.0), word_scores=(0.0,),
                            dev_tune_utterances=6, lm_conditions=("clean",), threads=1, lexicon="lm_vocab",
                            beam_sizes=(4, 8), blank_penalties=(0.0, 1.0, 4.0))
    metrics = evaluate(trained["model"], manifest, noise_manifest, lm, tmp_path / "eval", settings)
    penalty = metrics["greedy_tuning"]["blank_penalty"]
    grid = {row["blank_penalty"]: row["cer"] for row in metrics["greedy_tuning"]["grid"]}
    assert set(grid) == {0.0, 1.0, 4.0} and grid[penalty] == min(grid.values())
    one_by_one = {u.id: transcribe(model, [u.audio], blank_penalty=penalty)[0] for u in test}
    assert greedy(model, compute_emissions(model, waves, batch_size=16), penalty) == one_by_one
    records = read_records(tmp_path / "eval" / "hypotheses.jsonl")
    clean_greedy = {r["id"]: r["hyp"] for r in records if r["condition"] == "clean" and r["decoder"] == "greedy"}
    assert clean_greedy == one_by_one
    assert metrics["lm_tuning"]["lexicon"] == "lm_vocab" and metrics["lm_tuning"]["beam_size"] in (4, 8)
    assert metrics["test_oov"]["oov_rate"] == 0.0 and metrics["test_oov"]["lexicon_words"] == len(WORDS)
    lm_hyps = [r["hyp"] for r in records if r["decoder"] == "lm"]
    assert lm_hyps and all(set(h.split()) <= set(WORDS) for h in lm_hyps)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["headline"]["test_oov_rate"] == 0.0

    # asrflow-transcribe --decoding decoding.json says what the evaluation said, with its LM and without
    decoding = tmp_path / "eval" / "decoding.json"
    saved = json.loads(decoding.read_text())
    assert saved["blank_penalty"] == penalty and saved["lexicon"] == "lm_vocab"
    assert saved["beam_size"] == metrics["lm_tuning"]["beam_size"] and saved["lm_weight"] == metrics["lm_tuning"]["lm_weight"]
    clean_lm = {r["id"]: r["hyp"] for r in records if r["condition"] == "clean" and r["decoder"] == "lm"}
    for flags, expected in (([], clean_lm), (["--no-lm"], clean_greedy)):
        out = _transcribe_cli(capsys, ["--model", str(trained["model"]), "--decoding", str(decoding), *flags,
                                       *[u.audio for u in test]])
        assert out == {str(u.audio): expected[u.id] for u in test}
    with pytest.raises(SystemExit, match="no such file"):
        transcribe_main(["--model", str(trained["model"]), "--decoding", str(tmp_path / "none.json"), test[0].audio])


def test_test_time_adaptation_is_chosen_on_dev_and_followed_by_held_out_voice_and_transcribe(trained, tmp_path, capsys):
    """evaluate() tries each adaptation setting on dev (none first), keeps the lowest CER, decodes test with
    it and writes it to decoding.json; transcribe --decoding and the held-out-voice scorer then adapt alike."""
    from asrflow.evaluate.adaptation import AdaptSettings, adapted_emissions
    from asrflow.evaluate.held_out_voice import score_models
    from asrflow.evaluate.run import EvalSettings, evaluate, greedy, load_waves

    model = load_model(trained["model"])
    utts = [Utterance(id=f"t{k:02d}", audio=str(path), text=ref, duration=1.0, sample_rate=SR, speaker="s1",
                      dialect="d1", split="test" if k < 6 else "dev", extra={"engine": "tones"})
            for k, (ref, path) in enumerate(zip(trained["refs"][:12], trained["files"]["-20"][:12]))]
    manifest = tmp_path / "manifest.jsonl"
    write_manifest(manifest, utts, relative_audio=False)
    noise_manifest = write_heldout_noise(tmp_path)
    adapt = AdaptSettings(2, 1e-3, 2.5, "all")
    grid = (AdaptSettings(0), adapt)
    metrics = evaluate(trained["model"], manifest, noise_manifest, None, tmp_path / "eval",
                       EvalSettings(snr_levels=(), threads=1, blank_penalties=(0.0, 1.0), adaptation=grid))
    rows = metrics["greedy_tuning"]["adaptation"]["grid"]
    assert [r["steps"] for r in rows] == [0, 2]
    best = min(rows, key=lambda r: r["cer"])  # a tie keeps no adaptation
    assert metrics["greedy_tuning"]["adaptation"]["chosen"]["steps"] == best["steps"]
    assert metrics["greedy_tuning"]["cer"] == best["cer"]

    # a grid of the adapted setting alone: test is decoded adapted, and everything downstream follows
    out = tmp_path / "eval_adapted"
    metrics = evaluate(trained["model"], manifest, noise_manifest, None, out,
                       EvalSettings(snr_levels=(), threads=1, blank_penalties=(0.0, 1.0), adaptation=(adapt,)))
    penalty = metrics["greedy_tuning"]["blank_penalty"]
    saved = json.loads((out / "decoding.json").read_text())
    assert saved["adaptation"] == adapt.to_dict()
    test = [u for u in utts if u.split == "test"]
    expected = greedy(model, adapted_emissions(model, load_waves(test, model.frontend), adapt), penalty)
    records = read_records(out / "hypotheses.jsonl")
    assert {r["id"]: r["hyp"] for r in records if r["decoder"] == "greedy"} == expected
    cli = _transcribe_cli(capsys, ["--model", str(trained["model"]), "--decoding", str(out / "decoding.json"),
                                   *[u.audio for u in test]])
    assert cli == {u.audio: expected[u.id] for u in test}
    plain = _transcribe_cli(capsys, ["--model", str(trained["model"]), "--decoding", str(out / "decoding.json"),
                                     "--adapt-steps", "0", *[u.audio for u in test]])
    assert plain == {u.audio: transcribe(model, [u.audio], blank_penalty=penalty)[0] for u in test}
    rep, scores = score_models([("m", Path(trained["model"]), out / "decoding.json")], test)
    assert scores[0].adaptation == adapt.to_dict() and scores[0].hyps == expected
