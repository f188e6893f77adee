#!/usr/bin/env python3
"""The test figures of several variants side by side: a markdown table from each
results/eval/<variant>/metrics.json (dev CER at the blank penalty chosen on dev, greedy and LM CER/WER by
condition, greedy CER per speaker group).

    .venv/bin/python scripts/metrics_table.py VARIANT [VARIANT ...] [--results results]
"""
import argparse
import json
from pathlib import Path


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def column(metrics: dict) -> dict[str, str]:
    by_condition, groups = metrics["by_condition"], metrics["per_speaker_group"]
    tuning = metrics.get("greedy_tuning") or {}
    chosen = [g for g in tuning.get("grid", []) if g["blank_penalty"] == tuning.get("blank_penalty")]
    col = {"dev CER (greedy, blank penalty chosen on dev)": f"{100 * chosen[0]['cer']:.2f}%" if chosen else "–",
           "blank penalty (dev)": str(tuning.get("blank_penalty", "–"))}
    for group, cer in (tuning.get("by_group") or {}).items():  # e.g. the held-out voice of corpus.held_out_dev
        col[f"dev CER, {group}"] = f"{100 * cer:.2f}%"
    for decoder in ("greedy", "lm"):
        conditions = by_condition.get(decoder, {})
        # clean first, then the SNRs from the highest down
        for condition in sorted(conditions, key=lambda c: (c != "clean", -float(c) if c != "clean" else 0.0)):
            v = conditions[condition]
            label = "clean" if condition == "clean" else f"{condition} dB"
            col[f"{decoder} CER / WER, {label}"] = f"{pct(v['cer'])}% / {pct(v['wer'])}%"
        for group, v in groups.get(decoder, {}).items():
            col[f"{decoder} CER, clean, {group}"] = f"{pct(v['cer'])}%"
    return col


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--results", type=Path, default=Path("results"))
    args = ap.parse_args()
    cols = {v: column(json.loads((args.results / "eval" / v / "metrics.json").read_text())) for v in args.variants}
    rows = list(dict.fromkeys(k for c in cols.values() for k in c))
    print("| test (`metrics.json`) | " + " | ".join(f"`{v}`" for v in args.variants) + " |")
    print("|---|" + "---|" * len(args.variants))
    for r in rows:
        print(f"| {r} | " + " | ".join(cols[v].get(r, "–") for v in args.variants) + " |")


if __name__ == "__main__":
    main()
