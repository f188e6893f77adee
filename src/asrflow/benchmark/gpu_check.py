"""One-process training throughput on whatever device there is: the prepared GPU check.

    python -m asrflow.benchmark.gpu_check --out gpu_check.md [--utterances 600 --steps 40 --warmup 5]

It needs no prepared corpus (the GPU machine has none): it writes a synthetic one (tone sequences
with LibriSpeech-like lengths, 2-16 s, and their transcripts), then runs the trainer's own context
and epoch loop (``build_context`` + ``run_batches``, no Horovod) for each model x precision:

* models: the default recipe's Conformer (``config/config.yaml``) and a ~30M-parameter Conformer
  (d 384, 8 heads, ffn 1536, 8 layers, kernel 31: 29.8M);
* precisions: fp32, fp16 + GradScaler, bf16 (each one skipped, with the reason, where the device
  does not support it: fp16 on CPU).

Table columns: utt/s and audio-s/s over the measured steps, mean step time, GPU utilization (NVML,
sampled every 50 ms), peak GPU memory allocated, the loader-wait share of step time, and the loader
workers. ``scripts/gpu_check.sh`` is the wrapper the GPU machine runs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from asrflow.audio import SAMPLE_RATE

BIG_CONFORMER = {"name": "conformer", "d_model": 384, "num_heads": 8, "ffn_dim": 1536, "num_layers": 8,
                 "kernel_size": 31, "dropout": 0.1, "subsampling": 4, "subsampling_channels": 256}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def synthetic_corpus(root: Path, n: int, seed: int = 0) -> dict[str, Path]:
    """Tone-per-letter audio (2-16 s) with its transcripts, a vocabulary, a plan, CMVN and noise."""
    from asrflow.data.demand import write_noise_manifest
    from asrflow.manifest import Utterance, write_json, write_manifest
    from asrflow.prep.bucketing import build_plan
    from asrflow.text import CharVocab
    from asrflow.train.features import LogMel, compute_cmvn_stats

    rng = np.random.default_rng(seed)
    audio = root / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    utts = []
    for k in range(n + 8):
        seconds = float(rng.uniform(2.0, 16.0))
        n_letters = max(2, int(seconds * 4))
        letters = rng.integers(0, 26, size=n_letters)
        text = "".join(LETTERS[i] if j % 6 != 5 else " " for j, i in enumerate(letters)).strip()
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        per = len(t) // n_letters
        f0 = 200.0 + 60.0 * np.repeat(letters, per)[: len(t)]
        f0 = np.pad(f0, (0, len(t) - len(f0)), constant_values=200.0)
        wave = (0.2 * np.sin(2 * np.pi * np.cumsum(f0) / SAMPLE_RATE) + 0.005 * rng.standard_normal(len(t)))
        path = audio / f"g{k:05d}.wav"
        sf.write(path, wave.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
        utts.append(Utterance(id=f"g{k:05d}", audio=str(path), text=" ".join(text.split()), duration=len(t) / SAMPLE_RATE,
                              sample_rate=SAMPLE_RATE, speaker="s", dialect="d", split="train" if k < n else "dev"))
    manifest = root / "manifest.jsonl"
    write_manifest(manifest, utts)
    vocab = CharVocab.build(u.text for u in utts)
    vocab.save(root / "vocab.json")
    train = [u for u in utts if u.split == "train"]
    plan = build_plan({u.id: u.duration for u in train}, {u.id: "d" for u in train}, num_buckets=8,
                      frame_budget=24000, max_batch_size=64)
    write_json(root / "buckets.json", plan.to_dict())
    logmel = LogMel(80)
    feats = (logmel(torch.from_numpy(sf.read(u.audio, dtype="float32")[0])[None], torch.tensor([int(u.duration * SAMPLE_RATE)]))
             for u in train[:64])
    compute_cmvn_stats(feats).save(root / "cmvn.json")
    noise = root / "noise.wav"
    sf.write(noise, (0.05 * rng.standard_normal(4 * SAMPLE_RATE)).astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
    write_noise_manifest(root / "noise.jsonl", [{"id": "demand-N-ch01", "env": "N", "channel": 1, "audio": str(noise),
                                                 "duration": 4.0, "sample_rate": SAMPLE_RATE, "split": "train",
                                                 "rms_dbfs": -26.0}])
    return {"manifest": manifest, "plan": root / "buckets.json", "vocab": root / "vocab.json",
            "cmvn": root / "cmvn.json", "noise": root / "noise.jsonl"}


def default_model() -> dict[str, Any]:
    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parents[3] / "config" / "config.yaml").read_text())
    model = dict(cfg["training"]["base"]["model"])
    # the phone CTC head is a training aid of negligible cost (one linear layer) that needs a phone
    # lexicon of the corpus: the throughput check's synthetic corpus has none
    model.pop("phone_ctc_layer", None)
    return model


def measure(files: dict[str, Path], model: dict[str, Any], precision: str, steps: int, warmup: int,
            workers: int, work: Path) -> dict[str, Any]:
    from asrflow.benchmark.gpu import GpuSampler
    from asrflow.train.distributed import World
    from asrflow.train.params import TrainParams
    from asrflow.train.run import build_context, parse_args
    from asrflow.train.trainer import TrainState, run_batches

    params = {"variant": "gpu-check", "model": model, "precision": precision, "loader_workers": workers,
              "checkpoint_every_steps": 0, "log_every": 1_000_000, "dev_max_utterances": 1, "augment_after_steps": 0,
              "threads_per_rank": 4, "speed_perturb": {"enabled": True, "factors": [0.9, 1.0, 1.1]}}
    params_path = work / f"params-{precision}.json"
    params_path.write_text(json.dumps(params))
    args = parse_args(["--manifest", str(files["manifest"]), "--plan", str(files["plan"]), "--vocab", str(files["vocab"]),
                       "--cmvn", str(files["cmvn"]), "--noise", str(files["noise"]), "--params", str(params_path),
                       "--out-dir", str(work / "out")])
    ctx = build_context(args, TrainParams.from_config(params), World())
    ctx.sampler.set_epoch(1)
    batches = list(ctx.sampler)
    while len(batches) < warmup + steps:
        batches += batches
    cuda = ctx.device.type == "cuda"
    state = TrainState(epoch=1)
    run_batches(ctx, state, batches[:warmup])
    rows: list[tuple[float, float, int, float]] = []
    hook = lambda c, s, r: rows.append((r.step_seconds, r.loader_wait_seconds, len(r.batch.ids), r.batch.audio_seconds))  # noqa: E731
    if cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    gpu = GpuSampler(ctx.device)
    gpu.start()
    state.batch_in_epoch = 0
    run_batches(ctx, state, batches[warmup:warmup + steps], hooks=[hook])
    stats = gpu.stop()
    total = sum(r[0] for r in rows)
    out = {"precision": precision, "model": model, "device": str(ctx.device),
           "parameters": sum(p.numel() for p in ctx.model.parameters()), "steps": len(rows),
           "utt_per_s": sum(r[2] for r in rows) / total, "audio_s_per_s": sum(r[3] for r in rows) / total,
           "step_s": total / len(rows), "loader_wait_share": sum(r[1] for r in rows) / total,
           "skipped_steps": state.skipped_steps, "gpu_util": stats.util_mean if stats else None,
           "peak_gpu_mb": torch.cuda.max_memory_allocated(ctx.device) / 2**20 if cuda else None, "workers": workers}
    del ctx
    if cuda:
        torch.cuda.empty_cache()
    return out


def supported(precision: str, device: torch.device) -> str | None:
    """None when the precision runs here, else why not."""
    if device.type == "cpu" and precision == "fp16":
        return "fp16 autocast is refused on CPU"
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    return None


def render(rows: list[dict[str, Any]], skipped: list[str], header: str) -> str:
    def f(x, d=1):
        return "–" if x is None else f"{x:.{d}f}"

    lines = [header, "", "| model | params | precision | utt/s | audio-s/s | step (s) | GPU util | peak GPU mem (MB) | loader wait | workers |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["model"]
        name = f"conformer d{m.get('d_model')}x{m.get('num_layers')}"
        lines.append(f"| {name} | {r['parameters'] / 1e6:.1f}M | {r['precision']} | {f(r['utt_per_s'])} | "
                     f"{f(r['audio_s_per_s'])} | {f(r['step_s'], 3)} | {f(r['gpu_util'])}{'%' if r['gpu_util'] is not None else ''} | "
                     f"{f(r['peak_gpu_mb'], 0)} | {100 * r['loader_wait_share']:.1f}% | {r['workers']} |")
    lines += [""] + [f"- {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/asrflow-gpu-check"))
    ap.add_argument("--out", type=Path, required=True, help="markdown table (and .json beside it)")
    ap.add_argument("--utterances", type=int, default=600)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--precisions", default="fp32,fp16,bf16")
    ap.add_argument("--models", default="default,big")
    ap.add_argument("--tiny", action="store_true", help="CPU rehearsal: small models and a few steps")
    args = ap.parse_args(argv)
    t0 = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    files = synthetic_corpus(args.work / "corpus", args.utterances)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = {"default": default_model(), "big": dict(BIG_CONFORMER)}
    if args.tiny:
        models = {"default": {**models["default"], "num_layers": 2, "inter_ctc_layer": 1}, "big": {**BIG_CONFORMER, "d_model": 128, "num_heads": 4,
                                                                            "ffn_dim": 256, "num_layers": 2,
                                                                            "subsampling_channels": 32}}
    rows, skipped = [], []
    for name in args.models.split(","):
        for precision in args.precisions.split(","):
            why = supported(precision, device)
            if why:
                skipped.append(f"{name} {precision}: skipped, {why}")
                continue
            r = measure(files, models[name], precision, args.steps, args.warmup, args.workers, args.work)
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "model"}), flush=True)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    header = (f"# GPU check: one process, no Horovod, on {name} (torch {torch.__version__}); "
              f"{args.utterances} synthetic utterances of 2-16 s, {args.steps} measured steps after {args.warmup} "
              f"({time.time() - t0:.0f} s in all)")
    md = render(rows, skipped, header)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "skipped": skipped}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
