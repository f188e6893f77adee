#!/usr/bin/env python3
"""The mean of models trained apart (a "model soup", Wortsman et al. 2022), mixed back towards the
pretrained encoder by the share and depth with the lowest dev CER: what `average_of` with
`pretrained_share` / `pretrained_share_blocks` does inside one DAG (the `average_models` rule), for
parents that come from different clones, e.g. the same recipe trained on two corpora that share dev.
Same functions as the rule (``asrflow.train.averaging``, ``dev_greedy_tuning``), so the choice is the one
the rule would make. Writes ``OUT/model.pt`` (loadable by evaluate, transcribe and
``asrflow.evaluate.held_out_voice`` as ``name=OUT/model.pt:OUT/decoding.json``), ``OUT/decoding.json`` (the
blank penalty chosen on dev) and ``OUT/choice.json`` (every candidate's dev CER per speaker group).

    .venv/bin/python scripts/soup_probe.py --dev-manifest results/prep/truncated.jsonl --out /tmp/soup \
        ../clone_a/results/train/whisper_tiny_vtlp/model.pt ../clone_b/results/train/whisper_tiny_vtlp/model.pt
"""
import argparse
import json
import tempfile
from pathlib import Path

import torch

from asrflow.evaluate.run import dev_greedy_tuning
from asrflow.train.averaging import average_models, choose_pretrained_share


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="the parents' model.pt (one architecture, one pretrained encoder)")
    ap.add_argument("--dev-manifest", type=Path, required=True, help="prep's truncated.jsonl; its dev split decides")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shares", default="0,0.1,0.2,0.3,0.4,0.5,0.6", help="pretrained_share candidates")
    ap.add_argument("--blocks", default="1,2,4", help="pretrained_share_blocks candidates")
    ap.add_argument("--blank-penalties", default="0,0.5,1,1.5,2", help="evaluation.blank_penalties")
    args = ap.parse_args()
    penalties = [float(x) for x in args.blank_penalties.split(",")]
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)

    def dev_score(candidate: dict) -> dict:
        with tempfile.TemporaryDirectory(dir=args.out) as tmp:
            path = Path(tmp) / "model.pt"
            torch.save(candidate, path)
            tuning = dev_greedy_tuning(path, args.dev_manifest, penalties)  # the model's own front end
        print(f"dev CER {tuning['cer']:.4f} (blank penalty {tuning['blank_penalty']}) {tuning['by_group']}", flush=True)
        return {"cer": tuning["cer"], "blank_penalty": tuning["blank_penalty"], "by_group": tuning["by_group"]}

    soup = average_models(args.models, min_parents=2)
    best, grid = choose_pretrained_share(soup, [float(x) for x in args.shares.split(",")], dev_score,
                                         [int(k) for k in args.blocks.split(",")])
    torch.save(best, args.out / "model.pt")
    chosen = best["pretrained_share"]
    row = next(r for r in grid if r["share"] == chosen["chosen"] and (chosen["chosen"] == 0 or r["blocks"] == chosen["blocks"]))
    (args.out / "decoding.json").write_text(json.dumps({"blank_penalty": row["blank_penalty"]}))
    (args.out / "choice.json").write_text(json.dumps({"parents": args.models, "chosen": chosen, "grid": grid},
                                                     indent=1, default=str))
    print(f"chosen: share {chosen['chosen']}, blocks {chosen['blocks']}; dev CER {row['cer']:.4f} {row['by_group']}")


if __name__ == "__main__":
    main()
