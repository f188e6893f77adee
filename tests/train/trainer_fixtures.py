"""A tiny training setup built without the workflow: synthetic audio, manifest, vocab, bucket plan,
CMVN, noise manifest and params, plus helpers to run ``workflow_scripts/train.py`` in a subprocess.

Used by ``test_trainer.py`` and by ``bn_probe.py`` (which runs under horovodrun).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from asrflow.data.demand import write_noise_manifest
from asrflow.manifest import Utterance, read_manifest, write_json, write_manifest
from asrflow.prep.bucketing import build_plan
from asrflow.text import CharVocab
from asrflow.train.features import LogMel, compute_cmvn_stats

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
TRAIN_SCRIPT = REPO / "workflow_scripts" / "train.py"

SR = 16000
N_MELS = 40
# A small alphabet; each letter has its own tone, so the audio really depends on the transcript.
LETTER_HZ = {"A": 300.0, "B": 520.0, "C": 780.0, "D": 1100.0, "E": 1500.0}
WORDS = ["AB", "BAD", "CAB", "DE", "ACE", "BED", "DAB", "EBB"]

TINY_MODEL = {"name": "conformer", "d_model": 32, "num_heads": 2, "ffn_dim": 64, "num_layers": 2,
              "kernel_size": 7, "subsampling": 4, "subsampling_channels": 16}


def synth(text: str, rng: np.random.Generator, duration: float) -> np.ndarray:
    """One tone per letter (a short upward chirp around the letter's frequency), silence for spaces."""
    n = int(round(duration * SR))
    out = np.zeros(n, dtype=np.float64)
    seg = n // max(1, len(text))
    t = np.arange(seg) / SR
    for i, ch in enumerate(text):
        if ch == " ":
            continue
        f0 = LETTER_HZ[ch]
        phase = 2 * np.pi * (f0 * t + 0.25 * f0 * t * t / max(t[-1], 1e-3))
        env = np.hanning(seg)
        out[i * seg:(i + 1) * seg] += 0.3 * env * np.sin(phase) + 0.1 * env * np.sin(2 * phase)
    out += 0.003 * rng.standard_normal(n)
    return np.clip(out, -1, 1).astype(np.float32)


@dataclass
class Setup:
    root: Path
    manifest: Path
    plan: Path
    vocab: Path
    cmvn: Path
    noise: Path
    tracking_uri: str
    utts: list[Utterance] = field(default_factory=list)

    def params_file(self, name: str, **overrides: Any) -> Path:
        params = base_params()
        for k, v in overrides.items():
            params[k] = v
        path = self.root / f"params-{name}.json"
        path.write_text(json.dumps(params, indent=1))
        return path

    def args(self, params: Path, out_dir: Path, log_dir: Path | None = None, experiment: str = "trainer-test") -> list[str]:
        a = ["--manifest", str(self.manifest), "--plan", str(self.plan), "--vocab", str(self.vocab),
             "--cmvn", str(self.cmvn), "--noise", str(self.noise), "--params", str(params),
             "--out-dir", str(out_dir), "--experiment", experiment, f"--tracking-uri={self.tracking_uri}"]
        if log_dir is not None:
            a += ["--log-dir", str(log_dir)]
        return a


def base_params() -> dict[str, Any]:
    return {"variant": "tiny", "model": dict(TINY_MODEL), "n_mels": N_MELS, "epochs": 2, "lr": 3e-3,
            "warmup_steps": 2, "checkpoint_every_steps": 2, "precision": "fp32", "log_every": 1,
            "noise": {"enabled": True, "p": 0.5, "snr_db": [10.0, 20.0]},
            "specaugment": {"enabled": True, "freq_mask_param": 5, "time_mask_param": 10, "n_freq_masks": 1,
                            "n_time_masks": 1, "max_time_ratio": 0.2},
            "oversample_temperature": 2.0, "threads_per_rank": 1, "seed": 1234,
            "loader_workers": 1,  # audio read by a DataLoader worker, as in the workflow: resume stays bitwise
            "sortagrad_epochs": 0}  # shuffled from the first step: the loss-decrease check compares like with like


def build_setup(root: Path, n_train: int = 16, n_dev: int = 4, seed: int = 0) -> Setup:
    root.mkdir(parents=True, exist_ok=True)
    audio_dir = root / "audio"
    audio_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    utts = []
    for k in range(n_train + n_dev):
        split = "train" if k < n_train else "dev"
        words = [WORDS[int(i)] for i in rng.integers(0, len(WORDS), size=int(rng.integers(1, 3)))]
        text = " ".join(words)
        duration = round(float(rng.uniform(0.5, 1.5)), 3)
        wave = synth(text, rng, duration)
        path = audio_dir / f"u{k:02d}.wav"
        sf.write(path, wave, SR, subtype="PCM_16")
        utts.append(Utterance(id=f"u{k:02d}", audio=str(path), text=text, duration=len(wave) / SR,
                              sample_rate=SR, speaker=f"s{k % 3}", dialect="d1" if k % 4 else "d2", split=split))
    manifest = root / "manifest.jsonl"
    write_manifest(manifest, utts)
    utts = read_manifest(manifest)

    vocab = CharVocab.build(u.text for u in utts if u.split == "train")
    vocab_path = root / "vocab.json"
    vocab.save(vocab_path)

    train = [u for u in utts if u.split == "train"]
    plan = build_plan({u.id: u.duration for u in train}, {u.id: u.dialect for u in train},
                      num_buckets=2, frame_budget=400, max_batch_size=4)
    plan_path = root / "buckets.json"
    write_json(plan_path, plan.to_dict())

    logmel = LogMel(N_MELS)

    def feats():
        for u in train:
            x, _ = sf.read(u.audio, dtype="float32")
            yield logmel(torch.from_numpy(x)[None], torch.tensor([len(x)]))

    cmvn_path = root / "cmvn.json"
    compute_cmvn_stats(feats()).save(cmvn_path)

    noise_dir = root / "noise"
    noise_dir.mkdir(exist_ok=True)
    records = []
    for i, (env, split) in enumerate((("HALL", "train"), ("CAR", "train"), ("PARK", "heldout"))):
        x = (0.05 * rng.standard_normal(2 * SR)).astype(np.float32)
        if i == 1:  # a low-passed ("car") noise, so the two train noises differ in colour
            x = np.convolve(x, np.ones(16) / 4, mode="same").astype(np.float32)
        path = noise_dir / f"{env}_ch01.wav"
        sf.write(path, x, SR, subtype="PCM_16")
        y, _ = sf.read(path, dtype="float64")
        rms = 20 * math.log10(float(np.sqrt(np.mean(y * y))))
        records.append({"id": f"demand-{env}-ch01", "env": env, "channel": 1, "audio": str(path),
                        "duration": len(y) / SR, "sample_rate": SR, "split": split, "rms_dbfs": round(rms, 3)})
    noise_path = root / "noise.jsonl"
    write_noise_manifest(noise_path, records)

    return Setup(root=root, manifest=manifest, plan=plan_path, vocab=vocab_path, cmvn=cmvn_path, noise=noise_path,
                 tracking_uri=f"sqlite:///{root / 'mlflow' / 'mlflow.db'}", utts=utts)


def clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)
    for k in list(env):  # a test run under horovodrun must not leak its rank into the children
        if k.startswith(("HOROVOD_", "OMPI_", "PMI_")):
            env.pop(k)
    # no MLflow usage telemetry from test runs (it is sent from a background thread, off the result path)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
                "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"})
    return env


def train_command(setup: Setup, params: Path, out_dir: Path, log_dir: Path | None = None,
                  experiment: str = "trainer-test") -> list[str]:
    return [PYTHON, str(TRAIN_SCRIPT), *setup.args(params, out_dir, log_dir, experiment)]


def horovodrun(np_: int, command: list[str]) -> list[str]:
    return [str(VENV_BIN / "horovodrun"), "-np", str(np_), "-H", f"localhost:{np_}", "--gloo", *command]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def load_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def single_process_context(setup: Setup, tmp_path: Path, **overrides):
    """The training Context of one process, built as ``train.py`` builds it (no horovodrun), writing
    under ``tmp_path / "out"``; ``overrides`` change the tiny setup's params."""
    from asrflow.train.distributed import World
    from asrflow.train.params import TrainParams
    from asrflow.train.run import build_context, parse_args

    params_path = setup.params_file("inproc", **overrides)
    args = parse_args(setup.args(params_path, tmp_path / "out"))
    threads = torch.get_num_threads()
    ctx = build_context(args, TrainParams.from_config(json.loads(params_path.read_text())), World())
    torch.set_num_threads(threads)  # build_context sets the rank's thread count; give the test process its own back
    return ctx


def run_steps(ctx, state, n: int, hooks=()) -> None:
    """``n`` more optimizer steps of the current epoch."""
    from asrflow.train.trainer import train_one_epoch

    ctx.params.max_steps = state.global_step + n
    train_one_epoch(ctx, state, hooks)
    assert state.global_step == ctx.params.max_steps
