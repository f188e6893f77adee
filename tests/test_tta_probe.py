"""scripts/tta_probe.py: its per-setting CERs are the evaluation path's, adapted or not."""
import json
import subprocess
import sys
from pathlib import Path

from asrflow.evaluate.adaptation import AdaptSettings, adapted_emissions
from asrflow.evaluate.run import compute_emissions, greedy, load_waves
from asrflow.evaluate.scoring import score_corpus
from asrflow.manifest import read_manifest
from asrflow.transcribe import load_model
from tests.test_soup_probe import dev_manifest
from tests.train.test_averaging import write_finetuned_whisper

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "tta_probe.py"


def test_the_probe_scores_dev_plain_and_adapted_as_the_evaluation_does(tmp_path):
    model_path = write_finetuned_whisper(tmp_path)[0]
    manifest = dev_manifest(tmp_path)
    decoding = tmp_path / "decoding.json"
    decoding.write_text(json.dumps({"blank_penalty": 0.5}))
    out = tmp_path / "probe.json"
    subprocess.run([sys.executable, str(SCRIPT), "--manifest", str(manifest), "--split", "dev", "--model", str(model_path),
                    "--decoding", str(decoding), "--steps", "2", "--lr", "1e-3", "--parameters", "all", "--threads", "1",
                    "--out", str(out)], check=True)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["steps"], r["lr"]) for r in rows] == [(0, None), (2, 1e-3)]
    model = load_model(model_path)
    utts = sorted(read_manifest(manifest), key=lambda u: u.id)
    waves = load_waves(utts, model.frontend)
    plain = greedy(model, compute_emissions(model, waves, 16), 0.5)
    adapted = greedy(model, adapted_emissions(model, waves, AdaptSettings(2, 1e-3, 2.5, "all")), 0.5)
    for row, hyps in zip(rows, (plain, adapted)):
        assert row["hyps"] == hyps
        assert row["all"] == round(100 * score_corpus([u.text for u in utts], [hyps[u.id] for u in utts]).cer, 2)
