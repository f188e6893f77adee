"""Throughput arithmetic: what one measured configuration's step records add up to, and scaling.

A worker reports, for each measured step, the step time (the slowest rank's: with synchronous
gradient allreduce every rank waits for it), the utterances, audio seconds and frames all ranks
processed, plus per-rank sums of the time spent waiting for the loader workers, feature extraction/augmentation and CPU.
Every configuration processes the same utterances (see ``padding.benchmark_schedule``), so

    throughput = utterances processed / total measured step time

compares the configurations on equal work. The median step time (robust to a stray slow step on a
shared machine) is reported next to it, with the median-based rate ``mean utts per step / median
step time``.
"""
from __future__ import annotations

import statistics
from typing import Any, Iterable, Mapping

FIELDS = ("step_s", "utts", "audio_s", "real_frames", "padded_frames")


def precision_label(amp_dtype: str | None) -> str:
    """"torch.bfloat16" / "bf16" / None -> "bf16" / "fp32" (the name used in metric keys and tables)."""
    if amp_dtype in (None, "", "None", "fp32", "torch.float32"):
        return "fp32"
    return {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(amp_dtype), str(amp_dtype))


def config_key(precision: str, processes: int) -> str:
    return f"{precision}.np{processes}"


def summarize(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Headline numbers of one configuration from a worker's raw record."""
    steps = raw["per_step"]
    step_s = [float(x) for x in steps["step_s"]]
    total = sum(step_s)
    if not step_s or total <= 0:
        raise ValueError("no measured steps")
    utts, audio = sum(steps["utts"]), sum(steps["audio_s"])
    real, padded = sum(steps["real_frames"]), sum(steps["padded_frames"])
    median = statistics.median(step_s)
    ranks = raw["rank_totals"]
    rank_time = max(1e-12, float(ranks["step_s"]))
    threads = max(1, int(raw.get("threads_per_rank", 1)))
    return {
        "utt_per_s": utts / total,
        "audio_s_per_s": audio / total,
        "median_step_s": median,
        "mean_step_s": total / len(step_s),
        "utt_per_s_median": (utts / len(step_s)) / median,
        "measured_steps": len(step_s),
        "utterances": int(utts),
        "audio_s": audio,
        "padding_ratio": 1.0 - real / padded if padded else 0.0,
        "loader_wait_share": ranks["loader_wait_s"] / rank_time,
        "features_share": ranks["features_s"] / rank_time,
        "data_share": (ranks["loader_wait_s"] + ranks["features_s"]) / rank_time,
        "cpu_util": ranks["cpu_s"] / (rank_time * threads) if "cpu_s" in ranks else None,
        "skipped_steps": int(raw.get("skipped_steps", 0)),
    }


def scaling_efficiency(throughput_n: float, throughput_1: float, n: int) -> float:
    """throughput_N / (N x throughput_1): 1.0 is perfect linear scaling."""
    if n < 1:
        raise ValueError(f"process count must be >= 1, got {n}")
    if throughput_1 <= 0:
        raise ValueError("single-process throughput must be positive")
    return throughput_n / (n * throughput_1)


def scaling_table(results: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Scaling of every (precision, N) against (precision, 1): {"bf16.np2": {"speedup": .., "efficiency": ..}}."""
    by_key = {config_key(r["precision"], r["processes"]): r for r in results}
    out = {}
    for key, r in by_key.items():
        base = by_key.get(config_key(r["precision"], 1))
        if base is None or r["processes"] == 1:
            continue
        out[key] = {"speedup": r["utt_per_s"] / base["utt_per_s"],
                    "efficiency": scaling_efficiency(r["utt_per_s"], base["utt_per_s"], r["processes"])}
    return out


def precision_speedup(results: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Mixed precision vs fp32 at each process count: {"bf16.np1": 1.3, ...}."""
    by_key = {config_key(r["precision"], r["processes"]): r for r in results}
    out = {}
    for key, r in by_key.items():
        base = by_key.get(config_key("fp32", r["processes"]))
        if base is not None and r["precision"] != "fp32":
            out[key] = r["utt_per_s"] / base["utt_per_s"]
    return out
