#!/usr/bin/env python
"""Greedy CER with and without test-time adaptation (asrflow.evaluate.adaptation) over a grid of settings.

    scripts/tta_probe.py --manifest results/prep/truncated.jsonl --split dev --model results/train/V/model.pt \\
        --decoding results/eval/V/decoding.json --steps 0 5 10 --lr 3e-4 1e-3 3e-3

Tune on dev (``--split dev``; ``--held-out-only`` for the held-out voice family's dev utterances, ``--spread N``
for N dev utterances evenly spaced over the ids), never on test. Prints CER per setting and speaker group, and
writes the table and the hypotheses as JSON to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from asrflow.evaluate.adaptation import AdaptSettings, adapted_emissions
from asrflow.evaluate.decoding import greedy_decode
from asrflow.evaluate.run import load_waves, speaker_group, spread_subset
from asrflow.evaluate.scoring import score_utterance
from asrflow.manifest import read_manifest
from asrflow.transcribe import load_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--split", default=None, help="only this split (dev to tune; never test)")
    ap.add_argument("--held-out-only", action="store_true", help="only the held-out voice family's utterances")
    ap.add_argument("--spread", type=int, default=0, help="N utterances evenly spaced over the ids (0: all)")
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--decoding", type=Path, required=True, help="the evaluation's decoding.json (its blank penalty)")
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 5, 10])
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-3])
    ap.add_argument("--temperature", type=float, default=2.5)
    ap.add_argument("--parameters", default="all", choices=["norms", "all"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    utts = read_manifest(args.manifest)
    if args.split:
        utts = [u for u in utts if u.split == args.split]
    if args.held_out_only:
        utts = [u for u in utts if u.extra.get("held_out_family")]
    if args.spread:
        utts = spread_subset(utts, args.spread)
    penalty = float(json.loads(args.decoding.read_text())["blank_penalty"])
    model = load_model(args.model)
    waves = load_waves(utts, model.frontend)
    rows = []
    settings = [AdaptSettings(0)] + [AdaptSettings(s, lr, args.temperature, args.parameters) for s in args.steps if s for lr in args.lr]
    for st in settings:
        t0 = time.perf_counter()
        em = adapted_emissions(model, waves, st)
        hyps = {uid: greedy_decode(lp, None, model.vocab, penalty)[0] for uid, lp in em.items()}
        groups: dict[str, list[int]] = {}
        for u in utts:
            c = score_utterance(u.text, hyps[u.id]).chars
            for g in ("all", speaker_group(u)):
                e, n = groups.get(g, [0, 0])
                groups[g] = [e + c.errors, n + c.ref_len]
        row = {"steps": st.steps, "lr": st.lr if st.steps else None, "seconds": round(time.perf_counter() - t0, 1),
               **{g: round(100 * e / n, 2) for g, (e, n) in sorted(groups.items())}, "hyps": hyps}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "hyps"}), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"utterances": len(utts), "blank_penalty": penalty, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
