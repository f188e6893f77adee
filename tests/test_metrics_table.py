"""scripts/metrics_table.py: the variants' figures side by side, read from their metrics.json."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_metrics(results: Path, variant: str, cer: float) -> None:
    out = results / "eval" / variant
    out.mkdir(parents=True)
    cond = lambda c: {"cer": c, "wer": 3 * c}  # noqa: E731
    out.joinpath("metrics.json").write_text(json.dumps({
        "by_condition": {"greedy": {"5": cond(2 * cer), "clean": cond(cer), "20": cond(1.5 * cer)},
                         "lm": {"clean": cond(cer / 2)}},
        "per_speaker_group": {"greedy": {"espeak": cond(cer)}, "lm": {"espeak": cond(cer / 2)}},
        "greedy_tuning": {"blank_penalty": 0.5, "grid": [{"blank_penalty": 0.0, "cer": 0.2},
                                                         {"blank_penalty": 0.5, "cer": 0.1234}],
                         "by_group": {"espeak": 0.1, "festival (held-out voice)": 0.2}}}))


def test_one_column_per_variant_clean_first_then_snr_from_the_highest(tmp_path):
    write_metrics(tmp_path, "a", 0.1)
    write_metrics(tmp_path, "b", 0.04)
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "metrics_table.py"), "a", "b", "--results",
                          str(tmp_path)], capture_output=True, text=True, timeout=60, check=True).stdout
    lines = out.splitlines()
    assert lines[0] == "| test (`metrics.json`) | `a` | `b` |"
    assert "| dev CER (greedy, blank penalty chosen on dev) | 12.34% | 12.34% |" in lines
    greedy = [line.split(" | ")[0] for line in lines if line.startswith("| greedy CER / WER")]
    assert greedy == ["| greedy CER / WER, clean", "| greedy CER / WER, 20 dB", "| greedy CER / WER, 5 dB"]
    assert "| greedy CER / WER, clean | 10.0% / 30.0% | 4.0% / 12.0% |" in lines
    assert "| lm CER, clean, espeak | 5.0% | 2.0% |" in lines
    assert "| dev CER, festival (held-out voice) | 20.00% | 20.00% |" in lines  # corpus.held_out_dev
