#!/usr/bin/env python
"""Dev-only sweep of the LM beam search: for each beam size, the best LM weight and word score on the
evaluation's dev-tuning utterances (``evaluation.dev_tune_utterances``, never test), as the evaluation
rule tunes them. Used to choose ``evaluation.beam_size`` and the weight grid (docs/results.md, "Session 9").

    .venv/bin/python scripts/lm_dev_sweep.py results/train/whisper_tiny/model.pt --beams 16 32 64
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from asrflow.evaluate.run import EvalSettings, lm_decoder, load_model, tune_on_dev
from asrflow.manifest import read_manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--manifest", type=Path, default=Path("results/prep/truncated.jsonl"))
    ap.add_argument("--lm", type=Path, default=Path("results/lm/words.arpa"))
    ap.add_argument("--beams", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--lm-weights", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    ap.add_argument("--word-scores", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    ap.add_argument("--lexicon", default="lm_vocab", choices=["none", "lm_vocab", "cmudict"])
    ap.add_argument("--dev-utterances", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model)
    dev = [u for u in read_manifest(args.manifest) if u.split == "dev"]
    print("| beam | LM weight | word score | dev WER (LM) | dev WER (greedy) | seconds |\n|---:|---:|---:|---:|---:|---:|")
    for beam in args.beams:
        s = EvalSettings(lexicon=args.lexicon, beam_sizes=[beam], lm_weights=args.lm_weights,
                         word_scores=args.word_scores, dev_tune_utterances=args.dev_utterances)
        t0 = time.time()
        r = tune_on_dev(model, dev, lm_decoder(model, args.lm, s), s)
        print(f"| {beam} | {r['lm_weight']:g} | {r['word_score']:g} | {100 * r['wer']:.1f}% | "
              f"{100 * r['dev_greedy_wer']:.1f}% | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
