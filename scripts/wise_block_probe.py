#!/usr/bin/env python3
"""Which depths of a fine-tuned encoder should WiSE-FT mix back? A diagnosis beside the rule
``average_models`` (which mixes the stem and the lowest k blocks by one share, ``pretrained_share_blocks``):
here each depth gets a share of its own, and every spec is scored by greedy dev CER per speaker group, as
the rule scores its grid (``dev_greedy_tuning``: blank penalty chosen on dev).

A spec is one share per depth, comma-separated: the stem, then each block, then what lies above the blocks
(Whisper: the final layer norm); ``0.4,0.3,0,0,0,0`` for Whisper tiny's stem, 4 blocks and the top.

    .venv/bin/python scripts/wise_block_probe.py results/train/whisper_tiny/model.pt 0,0,0,0,0,0 0.4,0.4,0,0,0,0
"""
import argparse
import json
import tempfile
from pathlib import Path

import torch

from asrflow.evaluate.run import dev_greedy_tuning
from asrflow.loudness import Frontend
from asrflow.train.averaging import encoder_blocks, pretrained_part


def depth_of(ckpt: dict) -> dict[str, int]:
    """Each pretrained tensor's depth: 0 the stem, i + 1 block i, blocks + 1 the rest of the encoder; the
    units ``freeze: k`` and ``pretrained_share_blocks`` count (``unit_depths``)."""
    from asrflow.text import vocab_from_dict
    from asrflow.train.pretrained import build_pretrained_model
    from asrflow.train.pretrained.freezing import unit_depths

    model = build_pretrained_model(ckpt["model_config"], len(vocab_from_dict(ckpt["vocab"])), load_weights=False)
    depth, top = unit_depths(model), encoder_blocks(ckpt) + 1
    pretrained = pretrained_part(ckpt)
    return {name: depth.get(id(p), top) for name, p in model.named_parameters() if name in pretrained}


def mix_by_depth(ckpt: dict, pretrained: dict[str, torch.Tensor], depth: dict[str, int], shares: list[float]) -> dict:
    """``ckpt`` with each pretrained tensor at ``(1 - s) * its own + s * pretrained``, s its depth's share."""
    state = dict(ckpt["model"])
    for name, v in pretrained.items():
        s = shares[depth[name]]
        state[name] = ((1.0 - s) * state[name].to(torch.float64) + s * v.to(torch.float64)).to(state[name].dtype)
    return {**ckpt, "model": state}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("specs", nargs="+", help="one share per depth: stem, each block, the top")
    ap.add_argument("--manifest", default="results/prep/truncated.jsonl")
    ap.add_argument("--blank-penalties", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0])
    ap.add_argument("--out", help="write every spec's scores here (JSON)")
    args = ap.parse_args()
    ckpt = torch.load(args.model, map_location="cpu", weights_only=False)
    frontend = Frontend(**json.loads((Path(args.model).parent / "frontend.json").read_text()))
    pretrained, depth = pretrained_part(ckpt), depth_of(ckpt)
    rows = []
    for spec in args.specs:
        shares = [float(x) for x in spec.split(",")]
        if len(shares) != max(depth.values()) + 1:
            raise SystemExit(f"{spec}: {len(shares)} shares, but the encoder has {max(depth.values()) + 1} depths "
                             f"(the stem, {encoder_blocks(ckpt)} blocks, the top)")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.pt"
            torch.save(mix_by_depth(ckpt, pretrained, depth, shares), path)
            tuning = dev_greedy_tuning(path, Path(args.manifest), args.blank_penalties, frontend)
        rows.append({"shares": shares, "cer": tuning["cer"], "blank_penalty": tuning["blank_penalty"],
                     "by_group": tuning["by_group"]})
        groups = "  ".join(f"{g} {100 * c:.2f}" for g, c in sorted(tuning["by_group"].items()))
        print(f"{spec}  dev CER {100 * tuning['cer']:.2f}%  ({groups})", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
