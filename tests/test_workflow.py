"""The workflow end to end on the small embedded corpus, tracked by a real `mlflow server`."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from asrflow.manifest import read_manifest, read_records

from .servers import mlflow_server

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
pytestmark = pytest.mark.slow


def snakemake(workdir, *args, env=None, check=True, override=None):
    """Run the workflow on the small config, with ``override`` (YAML text) merged on top."""
    configs = [str(REPO / "config" / "small.yaml")]
    if override:
        extra = Path(workdir) / "override.yaml"
        extra.write_text(override)
        configs.append(str(extra))
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2", *args,
           "--configfile", *configs]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def planned_jobs(output: str) -> dict[str, int]:
    """Rule -> count from the 'Job stats' table of a dry run."""
    table = output.split("Job stats:")[-1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m.group(1) != "total"}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("wf")
    with mlflow_server(root / "mlflow") as uri:
        # MLflow samples system metrics every 10 s by default: longer than the small DAG's training.
        # PATH without the venv, as a user's shell running `.venv/bin/snakemake` (`make run`) has it:
        # the workflow itself must find horovodrun and the venv's tools.
        venv_bin = str(Path(sys.executable).parent)
        path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p and p != venv_bin)
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "ASRFLOW_INVOCATION": "test-invocation",
               "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1", "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1",
               "PATH": path}
        work = root / "work"
        work.mkdir()
        first = snakemake(work, env=env)
        yield {"work": work, "uri": uri, "env": env, "log": first.stderr}


def test_data_prep_outputs_and_report(tracked_run):
    work = tracked_run["work"]
    report = json.loads((work / "results/prep/data_report.json").read_text())
    # the three deliberately broken files are quarantined with their reasons, the rest went on
    assert report["quarantine"]["count"] == 3
    assert set(report["quarantine"]["by_kind"]) == {"unreadable", "silent", "clipped"}
    prepared = read_manifest(work / "results/prep/truncated.jsonl")
    assert {u.split for u in prepared} == {"train", "dev", "test"}
    assert all(u.sample_rate == 16000 and u.duration <= 15.0 for u in prepared)
    corpus = read_manifest(work / "results/corpus/manifest.jsonl")
    trunc = read_records(work / "results/prep/truncation_report.jsonl")
    # every corpus utterance is accounted for: prepared, quarantined, or reported by truncation
    accounted = {r["id"] for r in trunc} | set(report["quarantine"]["ids"])
    assert accounted == {u.id for u in corpus}
    assert report["bucketing"]["bucketed"]["padding_ratio"] < report["bucketing"]["random"]["padding_ratio"]
    assert report["noise"]["environments"]["heldout"] == ["PCAFETER", "TMETRO"]


def test_training_produced_a_model_with_horovod(tracked_run):
    work = tracked_run["work"]
    summary = json.loads((work / "results/train/full/train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 2
    assert (work / "results/train/full/model.pt").stat().st_size > 10_000
    ranks = sorted(p.name for p in (work / "logs/train/full.ranks").iterdir())
    assert ranks == ["rank0.log", "rank1.log"]


def test_second_invocation_does_nothing(tracked_run):
    proc = snakemake(tracked_run["work"], "-n", env=tracked_run["env"])
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_changing_a_bucketing_parameter_reruns_only_bucketing_and_what_follows(tracked_run):
    proc = snakemake(tracked_run["work"], "-n", env=tracked_run["env"], override="bucketing: {frame_budget: 7000}\n")
    jobs = planned_jobs(proc.stdout + proc.stderr)
    assert set(jobs) == {"bucketing", "data_report", "train", "evaluate", "ablation_table", "benchmark",
                         "held_out_voice", "all"}, jobs


def test_changing_an_evaluation_parameter_does_not_retrain(tracked_run):
    proc = snakemake(tracked_run["work"], "-n", env=tracked_run["env"], override="evaluation: {beam_size: 8}\n")
    jobs = planned_jobs(proc.stdout + proc.stderr)
    assert "train" not in jobs and "evaluate" in jobs, jobs


def test_every_step_is_in_one_mlflow_experiment(tracked_run):
    client = MlflowClient(tracked_run["uri"])
    exp = client.get_experiment_by_name("asrflow-small")
    runs = client.search_runs([exp.experiment_id], "tags.`asrflow.invocation` = 'test-invocation'", max_results=500)
    steps = {r.data.tags["asrflow.step"] for r in runs}
    assert {"make_embedded_corpus", "synthesize_noise", "fetch_demand", "resample", "merge_resampled", "truncate",
            "vocab", "phone_lexicon", "bucketing", "noise_manifest", "data_report", "cmvn", "train",
            "held_out_voice_set", "held_out_voice"} <= steps
    assert all(r.info.status == "FINISHED" for r in runs)
    by_step = {r.data.tags["asrflow.step"]: r for r in runs}
    trunc = by_step["truncate"]
    assert trunc.data.params["config.prep.max_duration"] == "15.0"
    assert trunc.data.metrics["utterances_in"] > 0 and "dropped" in trunc.data.metrics
    assert [i.dataset.name for i in trunc.inputs.dataset_inputs] == ["truncated"]
    train = by_step["train"]
    assert train.data.params["world_size"] == "2"
    assert {"train_loss", "lr", "grad_norm", "utt_per_s", "audio_s_per_s", "skipped_steps", "dev_loss",
            "dev_cer"} <= set(train.data.metrics)
    assert any(m.startswith("system/") for m in train.data.metrics), "system metrics are on for training"
    artifacts = {f.path for f in client.list_artifacts(train.info.run_id)}
    assert "checkpoint" in artifacts
    assert client.search_logged_models([exp.experiment_id]), "the model is logged with mlflow.pytorch"


def test_lint_is_clean():
    proc = subprocess.run([SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--lint"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_transcribe_takes_stereo_44k_audio(tracked_run, tmp_path):
    """The user-facing entry point: any rate, two channels, through the trained model and the LM."""
    import numpy as np
    import soundfile as sf

    from asrflow.audio import read_audio
    from asrflow.manifest import read_manifest

    work = tracked_run["work"]
    test_utt = next(u for u in read_manifest(work / "results/prep/truncated.jsonl") if u.split == "test")
    mono, sr = read_audio(test_utt.audio)
    t = np.arange(int(len(mono) * 44100 / sr))
    resampled = np.interp(t * sr / 44100, np.arange(len(mono)), mono)
    stereo = np.stack([resampled, 0.5 * resampled], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 44100)
    cli = str(Path(sys.executable).with_name("asrflow-transcribe"))
    # plain greedy, an LM given by hand, and the evaluation's own decoding (decoding.json: its LM found
    # relative to the file, its lexicon, weights and blank penalty)
    for extra in ([], ["--lm", str(work / "results/lm/words.arpa")],
                  ["--decoding", str(work / "results/eval/full/decoding.json")]):
        proc = subprocess.run([cli, "--model", str(work / "results/train/full/model.pt"), str(path), *extra],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        name, _, text = proc.stdout.strip().partition("\t")
        assert name == str(path)
        assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ")


def test_evaluation_outputs(tracked_run):
    work = tracked_run["work"]
    metrics = json.loads((work / "results/eval/full/metrics.json").read_text())
    assert set(metrics["by_condition"]["greedy"]) == {"clean", "10", "0"}
    assert "clean" in metrics["by_condition"]["lm"]
    assert metrics["lm_tuning"]["dev_utterances"] > 0 and metrics["lm_tuning"]["table"]
    assert set(metrics["per_speaker_group"]["greedy"]) >= {"espeak"}
    hyps = read_records(work / "results/eval/full/hypotheses.jsonl")
    test_ids = {u.id for u in read_manifest(work / "results/prep/truncated.jsonl") if u.split == "test"}
    assert {h["id"] for h in hyps if h["condition"] == "clean" and h["decoder"] == "greedy"} == test_ids
    for png in ("wer_vs_snr.png", "per_dialect.png"):
        assert (work / "results/eval/full" / png).read_bytes()[:4] == b"\x89PNG"
    assert "| full |" in (work / "results/report/ablations.md").read_text()
    assert "utt/s" in (work / "results/benchmark/benchmark.md").read_text()


def test_the_held_out_voice_set_is_new_audio_of_the_unheard_family_and_every_variant_is_scored(tracked_run):
    work = tracked_run["work"]
    corpus = read_records(work / "results/corpus/manifest.jsonl")
    spoken = {seg[2] for r in corpus for seg in r["segments"]}
    dev_speakers = {r["speaker"] for r in corpus if r["split"] == "dev"}
    made = read_manifest(work / "results/held_out_voice/prep.jsonl")
    quarantined = json.loads((work / "results/held_out_voice/quarantined.json").read_text())
    assert len(made) + len(quarantined) == 6
    for u in made:
        assert u.extra["held_out_family"] and u.extra["voice"] == "ked_diphone" and u.sample_rate == 16000
        assert u.text not in spoken and u.speaker not in dev_speakers
    rep = json.loads((work / "results/held_out_voice/report.json").read_text())
    assert [r["model"] for r in rep["models"]] == ["full"] and rep["utterances"] == len(made)
    decoding = json.loads((work / "results/eval/full/decoding.json").read_text())
    assert rep["models"][0]["blank_penalty"] == decoding["blank_penalty"]
    lo, hi = rep["models"][0]["cer_95"]
    assert lo <= rep["models"][0]["cer"] <= hi
    assert "| full |" in (work / "results/held_out_voice/report.md").read_text()
    client = MlflowClient(tracked_run["uri"])
    exp = client.get_experiment_by_name("asrflow-small")
    run = client.search_runs([exp.experiment_id], "tags.`asrflow.step` = 'held_out_voice'")[0]
    assert run.data.metrics["full.cer"] == pytest.approx(rep["models"][0]["cer"])


def test_the_snakemake_report_builds(tracked_run):
    report = tracked_run["work"] / "report.html"
    snakemake(tracked_run["work"], "--report", str(report), env=tracked_run["env"])
    html = report.read_text(errors="replace")
    assert report.stat().st_size > 50_000 and "wer_vs_snr.png" in html
