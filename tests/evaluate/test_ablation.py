"""The ablation table: rows from real-shaped metrics/summary files, time to a dev CER, the claims lines."""
import csv
import json

import pytest

from asrflow.evaluate.ablation import (ablation_rows, claims_against_baseline, minutes_to_reach,
                                       plot_training_curves, relative_reduction, write_ablation_table)


def _history(cers, seconds_per_epoch=60.0):
    return [{"epoch": i, "step": 100 * (i + 1), "train_seconds": seconds_per_epoch * (i + 1), "dev_loss": 2.0 - 0.1 * i,
             "dev_cer": c, "dev_wer": min(1.0, 2 * c)} for i, c in enumerate(cers)]


def _variant_files(tmp_path, name, wer, cer, wer5, cers, dialect_wers=(0.5, 0.7)):
    metrics = {"headline": {"greedy_wer_clean": wer, "greedy_cer_clean": cer, "greedy_wer_5db": wer5,
                            "lm_wer_clean": wer - 0.05, "dialect_wer_spread": max(dialect_wers) - min(dialect_wers)},
               "by_condition": {"greedy": {"clean": {"wer": wer, "cer": cer}, "5": {"wer": wer5, "cer": wer5 / 2}}}}
    history = _history(cers)
    summary = {"train_seconds": history[-1]["train_seconds"], "global_step": history[-1]["step"], "history": history}
    m, s = tmp_path / f"{name}.metrics.json", tmp_path / f"{name}.summary.json"
    m.write_text(json.dumps(metrics))
    s.write_text(json.dumps(summary))
    return str(m), str(s)


@pytest.fixture
def two_variants(tmp_path):
    full = _variant_files(tmp_path, "full", 0.60, 0.25, 0.80, [0.6, 0.45, 0.35, 0.30], dialect_wers=(0.5, 0.6))
    base = _variant_files(tmp_path, "baseline", 0.80, 0.40, 1.00, [0.9, 0.7, 0.55, 0.45, 0.42, 0.40])
    return ["baseline", "full"], [base[0], full[0]], [base[1], full[1]]


def test_minutes_to_reach_is_the_first_epoch_at_or_below_target():
    hist = _history([0.6, 0.45, 0.5, 0.3])
    assert minutes_to_reach(hist, 0.45) == 2.0   # epoch 1 ends at 120 s; the later rise does not matter
    assert minutes_to_reach(hist, 0.3) == 4.0
    assert minutes_to_reach(hist, 0.1) is None
    assert minutes_to_reach([], 0.5) is None


def test_rows_carry_each_variants_numbers(two_variants):
    rows = ablation_rows(*two_variants, target_dev_cer=0.45)
    base, full = rows
    assert base["variant"] == "baseline" and full["variant"] == "full"
    assert full["greedy_cer_clean"] == 0.25 and base["greedy_wer_5db"] == 1.0 and base["greedy_cer_5db"] == 0.5
    assert full["steps"] == 400 and base["steps"] == 600
    assert full["train_minutes"] == 4.0 and base["train_minutes"] == 6.0
    assert full["minutes_to_dev_cer"] == 2.0 and base["minutes_to_dev_cer"] == 4.0
    assert full["best_dev_cer"] == 0.30 and base["best_dev_cer"] == 0.40
    assert full["dialect_wer_spread"] == pytest.approx(0.1) and base["dialect_wer_spread"] == pytest.approx(0.2)


def test_claims_compare_full_with_baseline(two_variants):
    rows = ablation_rows(*two_variants, target_dev_cer=0.45)
    assert relative_reduction(0.8, 0.6) == pytest.approx(0.25)
    lines = claims_against_baseline(rows, 0.45)
    assert lines[0] == "- greedy WER, clean: full 60.0% vs baseline 80.0%, 25.0% lower (the post claims 18% lower)"
    assert lines[1].startswith("- greedy CER, clean: full 25.0% vs baseline 40.0%, 37.5% lower")
    assert lines[2].startswith("- greedy WER at 5 dB: full 80.0% vs baseline 100.0%, 20.0% lower")
    assert lines[3].startswith("- greedy CER at 5 dB: full 40.0% vs baseline 50.0%, 20.0% lower")
    assert lines[4] == "- time to dev CER 45%: full 2.00 min vs baseline 4.00 min, 2.00x faster (the post claims 3x faster)"
    never = ablation_rows(*two_variants, target_dev_cer=0.1)
    assert claims_against_baseline(never, 0.1)[4] == "- time to dev CER 10%: reached by neither within the budget"
    assert claims_against_baseline([r for r in rows if r["variant"] == "full"], 0.45) == []
    # a full recipe that loses says so, rather than "-5% lower" or "0.5x faster"
    swapped = [dict(r, variant={"full": "baseline", "baseline": "full"}[r["variant"]]) for r in rows]
    lost = claims_against_baseline(swapped, 0.45)
    assert "33.3% higher" in lost[0] and lost[-1].endswith("2.00x slower (the post claims 3x faster)")


def test_table_files_and_curves(two_variants, tmp_path):
    rows = ablation_rows(*two_variants, target_dev_cer=0.45)
    csv_path, md_path, png = tmp_path / "a.csv", tmp_path / "a.md", tmp_path / "curves.png"
    write_ablation_table(rows, csv_path, md_path, target_dev_cer=0.45)
    with open(csv_path) as fh:
        read = list(csv.DictReader(fh))
    assert [r["variant"] for r in read] == ["baseline", "full"] and read[1]["minutes_to_dev_cer"] == "2.0"
    md = md_path.read_text().splitlines()
    assert md[0].startswith("| variant | greedy_wer_clean") and md[2].startswith("| baseline | 0.8 | 0.4 | 1 | 0.5 |")
    assert "2.00x faster" in md[-1]
    plot_training_curves(two_variants[0], two_variants[2], png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
