"""The ablation table: each training variant's accuracy, robustness, dialect spread and convergence."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

COLUMNS = ("variant", "greedy_wer_clean", "greedy_cer_clean", "greedy_wer_5db", "greedy_cer_5db", "lm_wer_clean",
           "dialect_wer_spread", "train_minutes", "steps", "minutes_to_dev_cer", "best_dev_cer")


def minutes_to_reach(history: list[dict], target_cer: float) -> float | None:
    """Training minutes until the dev CER first reached ``target_cer`` (None: never)."""
    for row in history:
        if row.get("dev_cer", 1.0) <= target_cer:
            return round(row["train_seconds"] / 60, 2)
    return None


def ablation_rows(variants: Sequence[str], metrics_paths: Sequence[str], summary_paths: Sequence[str],
                  target_dev_cer: float) -> list[dict]:
    rows = []
    for variant, mpath, spath in zip(variants, metrics_paths, summary_paths):
        m = json.loads(Path(mpath).read_text())
        s = json.loads(Path(spath).read_text())
        h = m["headline"]
        rows.append({
            "variant": variant,
            "greedy_wer_clean": round(h["greedy_wer_clean"], 4),
            "greedy_cer_clean": round(h["greedy_cer_clean"], 4),
            "greedy_wer_5db": round(h.get("greedy_wer_5db", float("nan")), 4),
            "greedy_cer_5db": round(m["by_condition"]["greedy"].get("5", {}).get("cer", float("nan")), 4),
            "lm_wer_clean": round(h.get("lm_wer_clean", float("nan")), 4),
            "dialect_wer_spread": round(h["dialect_wer_spread"], 4),
            "train_minutes": round(s["train_seconds"] / 60, 2),
            "steps": s["global_step"],
            "minutes_to_dev_cer": minutes_to_reach(s["history"], target_dev_cer),
            "best_dev_cer": round(min((r["dev_cer"] for r in s["history"]), default=float("nan")), 4),
        })
    return rows


def relative_reduction(baseline: float, value: float) -> float:
    """How much lower ``value`` is than ``baseline``, as a fraction of the baseline (0.18 = 18% lower)."""
    return (baseline - value) / baseline if baseline else float("nan")


def claims_against_baseline(rows: list[dict], target_dev_cer: float, full: str = "full",
                            baseline: str = "baseline") -> list[str]:
    """The reference post's two claims (18% lower error, 3x faster training) as this run measured them:
    sentences for the table's foot, empty when the run lacks either variant."""
    by_name = {r["variant"]: r for r in rows}
    if full not in by_name or baseline not in by_name:
        return []
    f, b = by_name[full], by_name[baseline]
    lines = []
    for key, what in (("greedy_wer_clean", "greedy WER, clean"), ("greedy_cer_clean", "greedy CER, clean"),
                      ("greedy_wer_5db", "greedy WER at 5 dB"), ("greedy_cer_5db", "greedy CER at 5 dB")):
        r = relative_reduction(b[key], f[key])
        lines.append(f"- {what}: {full} {f[key]:.1%} vs {baseline} {b[key]:.1%}, "
                     f"{abs(r):.1%} {'lower' if r >= 0 else 'higher'} (the post claims 18% lower)")
    tf, tb = f["minutes_to_dev_cer"], b["minutes_to_dev_cer"]
    if tf is not None and tb is not None:
        speed = f"{tb / tf:.2f}x faster" if tb >= tf else f"{tf / tb:.2f}x slower"
        lines.append(f"- time to dev CER {target_dev_cer:.0%}: {full} {tf:.2f} min vs {baseline} {tb:.2f} min, "
                     f"{speed} (the post claims 3x faster)")
    else:
        reached = [n for n, t in ((full, tf), (baseline, tb)) if t is not None]
        lines.append(f"- time to dev CER {target_dev_cer:.0%}: reached by {', '.join(reached) or 'neither'} "
                     f"within the budget")
    return lines


def write_ablation_table(rows: list[dict], csv_path: str | Path, md_path: str | Path,
                         target_dev_cer: float | None = None) -> None:
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join("—" if r[c] is None else (f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]))
                                       for c in COLUMNS) + " |")
    claims = claims_against_baseline(rows, target_dev_cer) if target_dev_cer is not None else []
    if claims:
        lines += ["", "The full recipe against the baseline (same data, same training-time budget):", *claims]
    Path(md_path).write_text("\n".join(lines) + "\n")


def plot_training_curves(variants: Sequence[str], summary_paths: Sequence[str], path: str | Path) -> None:
    """Dev loss and dev CER against training minutes, one line per variant (the convergence claim)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_cer) = plt.subplots(1, 2, figsize=(10, 4))
    for variant, spath in zip(variants, summary_paths):
        hist = json.loads(Path(spath).read_text())["history"]
        minutes = [h["train_seconds"] / 60 for h in hist]
        ax_loss.plot(minutes, [h["dev_loss"] for h in hist], marker=".", label=variant)
        ax_cer.plot(minutes, [h["dev_cer"] * 100 for h in hist], marker=".", label=variant)
    ax_loss.set(xlabel="training minutes", ylabel="dev CTC loss (plain)", title="Dev loss")
    ax_cer.set(xlabel="training minutes", ylabel="dev CER (%) greedy", title="Dev CER")
    for ax in (ax_loss, ax_cer):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
