"""scripts/compare_runs.py: two results/ folders are the same model, or it says which tensor differs."""
import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "compare_runs.py"
# what `make run` trains, and so what the script compares unless told otherwise
DEFAULT_VARIANT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["training"]["run_variants"][0]


def write_run(root: Path, weight: torch.Tensor, cer: float, variant: str = DEFAULT_VARIANT) -> Path:
    (root / "train" / variant).mkdir(parents=True)
    (root / "eval" / variant).mkdir(parents=True)
    torch.save({"model": {"head.weight": weight, "head.bias": torch.zeros(2)}}, root / "train" / variant / "model.pt")
    (root / "train" / variant / "train_summary.json").write_text(json.dumps({"history": [{"step": 10, "dev_cer": cer}]}))
    (root / "eval" / variant / "metrics.json").write_text(json.dumps({"headline": {"greedy_cer_clean": cer}}))
    return root


def run(a: Path, b: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(a), str(b), *extra], capture_output=True, text=True,
                          timeout=120)


def test_identical_runs_pass_and_a_one_ulp_difference_is_named(tmp_path):
    w = torch.randn(2, 3)
    a = write_run(tmp_path / "a", w, 0.25)
    same = run(a, write_run(tmp_path / "b", w.clone(), 0.25))
    assert same.returncode == 0, same.stdout + same.stderr
    assert "0 differing" in same.stdout and "dev history: equal" in same.stdout
    nudged = w.clone()
    nudged[0, 0] = torch.nextafter(nudged[0, 0], torch.tensor(float("inf")))
    other = run(a, write_run(tmp_path / "c", nudged, 0.25))
    assert other.returncode == 1 and "1 differing ['head.weight']" in other.stdout


def test_another_variant_is_compared_when_named(tmp_path):
    w = torch.randn(2, 3)
    a = write_run(tmp_path / "a", w, 0.25, variant="full")
    b = write_run(tmp_path / "b", w.clone(), 0.30, variant="full")
    named = run(a, b, "--variant", "full")
    assert named.returncode == 1 and "0 differing" in named.stdout  # same tensors, another test CER
    assert run(a, b).returncode != 0  # the default variant's files are not there: no silent pass
