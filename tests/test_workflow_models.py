"""The workflow on config/small.yaml with each model name: the from-scratch conformer and one variant per
pretrained encoder (whisper_encoder and wav2vec2, from tiny random Hugging Face checkpoints written here),
trained, evaluated, benchmarked side by side, and transcribing with model.pt alone."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asrflow.manifest import read_manifest, read_records
from .pretrained_checkpoints import WHISPER_30S_POSITIONS, write_hf_w2v, write_hf_whisper

from .test_workflow import snakemake

pytestmark = pytest.mark.slow

MODEL_OF_VARIANT = {"full": "conformer", "whisper": "whisper_encoder", "w2v": "wav2vec2",
                    "whisper_cached": "whisper_encoder", "whisper_ft": "whisper_encoder"}


def override_yaml(whisper: Path, w2v: Path) -> str:
    # The pretrained variants take a few steps only: the test is about the plumbing (checkpoint in, model.pt
    # out, evaluation, benchmark, transcription), not their accuracy; unfreezing mid-run exercises the
    # schedule the real transfer recipe uses.
    return f"""
experiment: asrflow-small-models
corpus: {{held_out_dev: 3}}   # dev also has the held-out voice, which whisper_wise's share is chosen on
training:
  run_variants: [full, whisper, w2v, whisper_cached, whisper_ft, whisper_avg, whisper_wise]
  variants:
    whisper:
      model: {{name: whisper_encoder, checkpoint: "{whisper}", freeze: all, unfreeze_after_steps: 4,
              pretrained_lr_scale: 0.1, head_lstm_layers: 0}}
      max_steps: 8
    w2v:
      model: {{name: wav2vec2, checkpoint: "{w2v}", freeze: 1}}
      max_steps: 8
    whisper_cached:   # the head alone, on the frozen encoder's outputs cached by the rule encoder_cache
      model: {{name: whisper_encoder, checkpoint: "{whisper}", freeze: all, head_lstm_layers: 0}}
      encoder_cache: true
      noise: {{enabled: false}}
      specaugment: {{enabled: false}}
      max_steps: 8
    whisper_ft:       # then everything fine-tuned from that model: init_from makes it a DAG input
      model: {{name: whisper_encoder, checkpoint: "{whisper}", freeze: none, head_lstm_layers: 0}}
      init_from: results/train/whisper_cached/model.pt
      max_steps: 4
    whisper_avg:      # no training: the mean of the two stages' weights (rule average_models)
      average_of: [whisper_cached, whisper_ft]
    whisper_wise:     # no training: whisper_ft mixed back towards its checkpoint by the share best on dev (WiSE-FT),
      average_of: [whisper_ft]          # the stem and lowest block, or the whole encoder, as dev prefers
      pretrained_share: [0.0, 0.5, 1.0]
      pretrained_share_blocks: [1, 2]
benchmark: {{steps: 2, warmup_steps: 1, processes: [1], precisions: [fp32], batching: [dynamic],
            gradient_checkpointing: false, prep_workers: []}}
"""


@pytest.fixture(scope="module")
def models_run(tmp_path_factory):
    pytest.importorskip("transformers", reason="transformers writes the tiny checkpoints")
    root = tmp_path_factory.mktemp("wf_models")
    checkpoints = root / "checkpoints"
    # 30 s of positions: the small corpus has utterances up to 15 s (the test-sized default is 1 s)
    whisper, _ = write_hf_whisper(checkpoints / "whisper", max_source_positions=WHISPER_30S_POSITIONS)
    w2v, _ = write_hf_w2v(checkpoints / "w2v")
    work = root / "work"
    work.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
    snakemake(work, env=env, override=override_yaml(whisper, w2v))
    # from here on the exported models must stand alone
    checkpoints.rename(root / "checkpoints.moved")
    return {"work": work, "env": env}


@pytest.mark.parametrize("variant", list(MODEL_OF_VARIANT))
def test_each_variant_trained_its_model(models_run, variant):
    out = models_run["work"] / "results/train" / variant
    exported = torch.load(out / "model.pt", map_location="cpu", weights_only=False)
    assert exported["model_config"]["name"] == MODEL_OF_VARIANT[variant]
    assert json.loads((out / "params.json").read_text())["model"]["name"] == MODEL_OF_VARIANT[variant]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] > 0 and summary["world_size"] == 2
    if variant != "full":
        assert summary["global_step"] <= 8  # max_steps
    if variant == "full":  # the default recipe's phone CTC head (rule phone_lexicon), exported with the model
        assert exported["model_config"]["phone_ctc_layer"] == 1
        assert exported["model"]["phone_head.weight"].shape[0] == exported["model_config"]["phone_vocab_size"]


@pytest.mark.parametrize("variant", list(MODEL_OF_VARIANT))
def test_each_variant_was_evaluated(models_run, variant):
    work = models_run["work"]
    metrics = json.loads((work / "results/eval" / variant / "metrics.json").read_text())
    clean = metrics["by_condition"]["greedy"]["clean"]
    assert clean["utterances"] > 0
    for value in (clean["cer"], clean["wer"], *metrics["headline"].values()):
        assert isinstance(value, (int, float)) and math.isfinite(value)
    hyps = read_records(work / "results/eval" / variant / "hypotheses.jsonl")
    assert {h["condition"] for h in hyps} >= {"clean", "10", "0"}


def test_benchmark_has_a_row_per_model(models_run):
    work = models_run["work"]
    rows = json.loads((work / "results/benchmark/benchmark.json").read_text())["models"]
    # `whisper` unfreezes its encoder after 4 steps: a second row measures it with nothing frozen
    expected = [row for variant, name in MODEL_OF_VARIANT.items()
                for row in [(variant, name)] + ([("whisper-unfrozen", name)] if variant == "whisper" else [])]
    assert [(r["label"], r["model"]["name"]) for r in rows] == expected
    for r in rows:
        assert math.isfinite(r["utt_per_s"]) and r["utt_per_s"] > 0
        assert math.isfinite(r["audio_s_per_s"]) and r["audio_s_per_s"] > 0
    unfrozen = next(r for r in rows if r["label"] == "whisper-unfrozen")
    assert unfrozen["trainable_parameters"] == unfrozen["parameters"]
    assert next(r for r in rows if r["label"] == "whisper")["trainable_parameters"] < unfrozen["parameters"]
    md = (work / "results/benchmark/benchmark.md").read_text()
    for variant, name in expected:
        assert f"| {variant} | {name} |" in md


@pytest.mark.parametrize("variant", list(MODEL_OF_VARIANT))
def test_transcribe_with_the_exported_model_alone(models_run, variant):
    """model.pt is enough (the pretrained checkpoint folders were moved away), and asrflow-transcribe, given the
    evaluation's decoding.json (its dev-chosen blank penalty), decodes a test file as the evaluation did."""
    work = models_run["work"]
    assert not (work.parent / "checkpoints").exists() and (work.parent / "checkpoints.moved" / "whisper").is_dir()
    test_utt = next(u for u in read_manifest(work / "results/prep/truncated.jsonl") if u.split == "test")
    cli = str(Path(sys.executable).with_name("asrflow-transcribe"))
    decoding = work / "results/eval" / variant / "decoding.json"
    proc = subprocess.run([cli, "--model", str(work / "results/train" / variant / "model.pt"), "--decoding", str(decoding),
                           "--no-lm", test_utt.audio],
                          capture_output=True, text=True, timeout=300, env=models_run["env"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, _, text = proc.stdout.strip("\n").partition("\t")
    assert name == test_utt.audio
    assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ")
    if variant == "w2v":
        return  # its feature encoder's group norm spans the batch's padding: a lone file decodes apart from a batch
    evaluated = next(h for h in read_records(work / "results/eval" / variant / "hypotheses.jsonl")
                     if h["id"] == test_utt.id and h["condition"] == "clean" and h["decoder"] == "greedy")
    assert text == evaluated["hyp"]



def test_the_cached_variant_trained_its_head_on_the_encoder_cache(models_run):
    """The rule encoder_cache ran once, the training rule read from it, and the exported model holds the
    checkpoint's encoder unchanged (so it transcribes from audio like the uncached variants)."""
    work = models_run["work"]
    index = json.loads((work / "results/train/whisper_cached/encoder_cache/index.json").read_text())
    planned = {u["id"] for u in json.loads((work / "results/prep/buckets.json").read_text())["utterances"]}
    assert set(planned) <= set(index["utterances"])
    assert (work / "benchmarks/train/whisper_cached.encoder_cache.tsv").exists()
    assert "training the head on cached encoder outputs" in (work / "logs/train/whisper_cached.log").read_text()
    from asrflow.train.models import build_model

    exported = torch.load(work / "results/train/whisper_cached/model.pt", map_location="cpu", weights_only=False)
    config = dict(exported["model_config"], checkpoint=str(models_run["work"].parent / "checkpoints.moved" / "whisper"))
    reference = build_model(config, exported["model"]["head.weight"].shape[0], 80).state_dict()
    for k, v in exported["model"].items():
        if k.startswith("encoder."):
            assert torch.equal(v, reference[k]), k
    assert not torch.equal(exported["model"]["head.weight"], reference["head.weight"])


def test_init_from_another_variant_trains_after_it_in_the_same_dag(models_run):
    work = models_run["work"]
    log = (work / "logs/train/whisper_ft.log").read_text()
    assert "initialized from results/train/whisper_cached/model.pt" in log
    assert "same vocabulary: output layer loaded" in log
    parent = work / "results/train/whisper_cached/model.pt"
    child = work / "results/train/whisper_ft/model.pt"
    assert parent.stat().st_mtime < child.stat().st_mtime


def test_an_averaged_variant_is_its_parents_mean_and_is_evaluated_like_a_trained_one(models_run):
    work = models_run["work"]
    load = lambda v: torch.load(work / "results/train" / v / "model.pt", map_location="cpu", weights_only=False)
    avg, first, second = load("whisper_avg"), load("whisper_cached"), load("whisper_ft")
    assert avg["model_config"] == second["model_config"] and avg["vocab"] == second["vocab"]
    for k, v in avg["model"].items():
        if v.is_floating_point():
            mean = (first["model"][k].double() + second["model"][k].double()).div(2).to(v.dtype)
            torch.testing.assert_close(v, mean, rtol=0, atol=1e-6)
    assert [Path(p["path"]).parent.name for p in avg["averaged_from"]] == ["whisper_cached", "whisper_ft"]
    assert avg["mlflow_run_id"] and avg["mlflow_run_id"] not in (first["mlflow_run_id"], second["mlflow_run_id"])
    assert not (work / "logs/train/whisper_avg.ranks").exists()  # no Horovod run: nothing was trained
    summary = json.loads((work / "results/train/whisper_avg/train_summary.json").read_text())
    parents = [json.loads((work / "results/train" / v / "train_summary.json").read_text())
               for v in ("whisper_cached", "whisper_ft")]
    assert summary["global_step"] == sum(p["global_step"] for p in parents)
    metrics = json.loads((work / "results/eval/whisper_avg/metrics.json").read_text())
    assert math.isfinite(metrics["headline"]["greedy_cer_clean"])
    assert "| whisper_avg |" in (work / "results/report/ablations.md").read_text()


def test_a_pretrained_share_is_chosen_on_a_dev_set_with_the_held_out_voice(models_run):
    """whisper_wise: its encoder's stem and lowest k blocks are (1 - s) whisper_ft + s the checkpoint's, (s, k)
    the pair with the lowest dev CER, on a dev set that has the held-out voice family (corpus.held_out_dev);
    the rest (the blocks above k, the head) is whisper_ft's."""
    from asrflow.train.averaging import pretrained_part

    work = models_run["work"]
    dev = [u for u in read_manifest(work / "results/prep/truncated.jsonl") if u.split == "dev"]
    assert sum(bool(u.extra.get("held_out_family")) for u in dev) == 3
    load = lambda v: torch.load(work / "results/train" / v / "model.pt", map_location="cpu", weights_only=False)
    wise, ft = load("whisper_wise"), load("whisper_ft")
    record = wise["pretrained_share"]
    grid = record["grid"]
    assert record["encoder_blocks"] == 2  # the test checkpoint's; 2 is the whole encoder
    assert [(row["share"], row["blocks"]) for row in grid] == [(0.0, 1), (0.5, 1), (0.5, 2), (1.0, 1), (1.0, 2)]
    assert all(math.isfinite(row["cer"]) and "festival (held-out voice)" in row["by_group"] for row in grid)
    best = min(grid, key=lambda row: row["cer"])  # the first of equals: the smaller share, then fewer blocks
    assert (record["chosen"], record["blocks"]) == (best["share"], best["blocks"])
    share = record["chosen"]
    # the checkpoint the fixture moved away after the run: read again for the pretrained weights
    moved = dict(ft, model_config={**ft["model_config"], "checkpoint": str(work.parent / "checkpoints.moved/whisper")})
    pretrained = pretrained_part(moved, record["blocks"])
    assert pretrained and all(k.startswith("encoder.") for k in pretrained)
    for k, v in wise["model"].items():
        expected = ((1 - share) * ft["model"][k].double() + share * pretrained[k].double()).to(v.dtype) \
            if k in pretrained else ft["model"][k]
        torch.testing.assert_close(v, expected, rtol=0, atol=1e-6)
    summary = json.loads((work / "results/train/whisper_wise/train_summary.json").read_text())
    assert summary["pretrained_share"]["chosen"] == share
    metrics = json.loads((work / "results/eval/whisper_wise/metrics.json").read_text())
    # evaluation reports dev by speaker group too, at the blank penalty it chose there
    assert set(metrics["greedy_tuning"]["by_group"]) >= {"espeak", "festival (held-out voice)"}


def test_the_default_recipe_trained_its_phone_head_on_the_lexicon_of_train_and_dev_words_only(models_run):
    """The rule phone_lexicon phonemized the training and dev words with espeak-ng; no test transcript
    was read, and the training log names the lexicon it used. The pretrained variants inherit the base
    recipe's phone loss weight, which does nothing for a model without a phone head, and say so."""
    from asrflow.phones import PhoneLexicon

    work = models_run["work"]
    lexicon = PhoneLexicon.load(work / "results/prep/phones.json")
    utts = read_manifest(work / "results/prep/truncated.jsonl")
    seen = {w for u in utts if u.split in ("train", "dev") for w in u.text.split()}
    assert set(lexicon.words) == seen
    assert 20 <= len(lexicon) - 1 <= 80, lexicon.symbols  # an English phone inventory
    assert "auxiliary phone CTC on layer 1" in (work / "logs/train/full.log").read_text()
    assert "phone_ctc_weight 0.20 has no effect" in (work / "logs/train/whisper.log").read_text()
