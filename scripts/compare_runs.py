#!/usr/bin/env python3
"""Are two workflow runs the same model? Compares results/train/<variant>/model.pt tensor by tensor
(torch.equal), the dev history of train_summary.json, and results/eval/<variant>/metrics.json's
headline figures. Exit 0 when all are identical.

    .venv/bin/python scripts/compare_runs.py RESULTS_A RESULTS_B [--variant NAME]

The variant defaults to the default run's (the first of config/config.yaml's training.run_variants).
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "config.yaml"


def default_variant() -> str:
    """The variant `make run` trains: the first of the default config's run_variants."""
    return yaml.safe_load(DEFAULT_CONFIG.read_text())["training"]["run_variants"][0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="a results/ folder")
    ap.add_argument("b", type=Path, help="another results/ folder")
    ap.add_argument("--variant", default=None, help="default: the default run's variant (%(prog)s reads config/config.yaml)")
    args = ap.parse_args()
    args.variant = args.variant or default_variant()
    models = [torch.load(r / "train" / args.variant / "model.pt", map_location="cpu", weights_only=False)["model"]
              for r in (args.a, args.b)]
    differing = sorted(k for k in models[0].keys() | models[1].keys()
                       if k not in models[0] or k not in models[1] or not torch.equal(models[0][k], models[1][k]))
    print(f"model.pt: {len(models[0])} tensors, {len(differing)} differing {differing[:5]}")
    history = [[(e["step"], e["dev_cer"]) for e in json.loads((r / "train" / args.variant / "train_summary.json").read_text())["history"]]
               for r in (args.a, args.b)]
    print(f"dev history: {'equal' if history[0] == history[1] else 'DIFFERENT'}")
    heads = [json.loads((r / "eval" / args.variant / "metrics.json").read_text())["headline"] for r in (args.a, args.b)]
    same_metrics = heads[0] == heads[1]
    for k in sorted(heads[0]):
        print(f"{k}: {heads[0][k]!r} vs {heads[1].get(k)!r}")
    return 0 if not differing and history[0] == history[1] and same_metrics else 1


if __name__ == "__main__":
    sys.exit(main())
