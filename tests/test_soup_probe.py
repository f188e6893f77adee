"""scripts/soup_probe.py: the mean of models from different clones, mixed back by the share and depth dev
prefers, is exactly what the average_models rule would make of the same parents."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from asrflow.manifest import Utterance, write_manifest
from asrflow.train.averaging import average_models, mix_with_pretrained, pretrained_part
from tests.train.test_averaging import write_finetuned_whisper

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "soup_probe.py"


def dev_manifest(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    utts = []
    for i, text in enumerate(["A CAT", "THE DOG", "A BIRD SANG"]):
        audio = tmp_path / f"dev{i}.wav"
        sf.write(audio, (0.05 * rng.standard_normal(16000)).astype(np.float32), 16000)
        utts.append(Utterance(id=f"dev{i}", audio=audio.name, text=text, duration=1.0, sample_rate=16000,
                              speaker="s", dialect="en-us", split="dev"))
    path = tmp_path / "truncated.jsonl"
    write_manifest(path, utts)
    return path


def test_the_soup_is_the_parents_mean_mixed_back_as_dev_chooses(tmp_path):
    # two "fine-tunes" of one pretrained checkpoint (one path, as the rule's parents share theirs)
    a = write_finetuned_whisper(tmp_path, seed=7)[0].rename(tmp_path / "a.pt")
    b = write_finetuned_whisper(tmp_path, seed=8)[0].rename(tmp_path / "b.pt")
    out = tmp_path / "soup"
    subprocess.run([sys.executable, str(SCRIPT), "--dev-manifest", str(dev_manifest(tmp_path)), "--out", str(out),
                    "--shares", "0,0.5", "--blocks", "1", "--blank-penalties", "0,1", str(a), str(b)], check=True)
    choice = json.loads((out / "choice.json").read_text())
    grid = choice["grid"]
    assert [(row["share"], row["blocks"]) for row in grid] == [(0.0, 1), (0.5, 1)]  # share 0 scored once
    best = min(grid, key=lambda row: (row["cer"], row["share"]))  # a tie goes to the least change
    assert choice["chosen"]["chosen"] == best["share"]
    assert json.loads((out / "decoding.json").read_text()) == {"blank_penalty": best["blank_penalty"]}

    mean = average_models([a, b])
    pa, pb = torch.load(a, weights_only=False)["model"], torch.load(b, weights_only=False)["model"]
    name = next(k for k in pa if k.startswith("encoder.") and pa[k].is_floating_point())
    assert torch.allclose(mean["model"][name], (pa[name] + pb[name]) / 2)
    expected = mix_with_pretrained(mean, pretrained_part(mean, 1), best["share"]) if best["share"] else mean
    soup = torch.load(out / "model.pt", weights_only=False)
    assert all(torch.equal(soup["model"][k], expected["model"][k]) for k in expected["model"])
