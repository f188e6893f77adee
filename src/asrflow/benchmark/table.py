"""The benchmark report as markdown tables (the reference post's format first, details after) and a
PNG bar chart."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from asrflow.benchmark.gpu import format_util

NA = "–"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub-flavoured markdown table; ``align`` is one letter per column (l/r/c), default l then r."""
    headers = [str(h) for h in headers]
    align = align or "l" + "r" * (len(headers) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    for row in rows:
        cells = [str(c).replace("|", "\\|") for c in row]
        if len(cells) != len(headers):
            raise ValueError(f"row has {len(cells)} cells, table has {len(headers)} columns")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return NA
    return f"{value:,.{digits}f}{suffix}"


def pct(value: float | None, digits: int = 0) -> str:
    return NA if value is None else f"{100 * value:.{digits}f}%"


def config_label(precision: str, processes: int) -> str:
    """"single-process FP32" / "2-process Horovod BF16" (the reference: "single-machine FP32",
    "distributed FP16")."""
    p = precision.upper()
    return f"single-process {p}" if processes == 1 else f"{processes}-process Horovod {p}"


def gpu_util(entry: Mapping[str, Any]) -> str:
    gpu = entry.get("gpu")
    if not gpu and str(entry.get("device", "cpu")).startswith("cuda"):
        return "n/a (no NVML)"  # a GPU run where pynvml could not be used
    return format_util(gpu["util_mean"] if gpu else None)


def reference_table(throughput: Sequence[Mapping[str, Any]]) -> str:
    """| config | throughput (utt/s) | GPU utilization | — the reference post's table."""
    rows = [(config_label(t["precision"], t["processes"]), fmt(t["utt_per_s"]), gpu_util(t)) for t in throughput]
    return markdown_table(["config", "throughput (utt/s)", "GPU utilization"], rows)


def details_table(throughput: Sequence[Mapping[str, Any]], scaling: Mapping[str, Mapping[str, float]]) -> str:
    rows = []
    for t in throughput:
        s = scaling.get(f"{t['precision']}.np{t['processes']}")
        mem = t.get("memory", {})
        peak = mem.get("cuda_max_allocated_mb") if mem.get("cuda_max_allocated_mb") is not None else mem.get("peak_rss_mb")
        rows.append((config_label(t["precision"], t["processes"]), fmt(t["utt_per_s"]), fmt(t["audio_s_per_s"]),
                     fmt(t["median_step_s"], 3), t["measured_steps"], fmt(s["speedup"], 2) + "×" if s else NA,
                     pct(s["efficiency"]) if s else NA, pct(t["data_share"]), pct(t.get("cpu_util")),
                     fmt(peak, 0), gpu_util(t)))
    return markdown_table(["config", "utt/s", "audio s/s", "median step (s)", "steps/rank", "speed-up",
                           "scaling efficiency", "data-loading share", "CPU util/thread", "peak mem (MB)",
                           "GPU util"], rows)


UNFROZEN_SUFFIX = "-unfrozen"  # a model row measured with nothing frozen (runner.with_unfrozen_phases)


def models_table(models: Sequence[Mapping[str, Any]]) -> str:
    """One row per compared model: what it is, and its one-process training throughput."""
    rows = [(r["label"], r["model"].get("name", "?"), f"{r['parameters']:,}", f"{r['trainable_parameters']:,}",
             fmt(r["utt_per_s"]), fmt(r["audio_s_per_s"]), fmt(r["median_step_s"], 3), fmt(r["mean_step_s"], 3),
             r["measured_steps"], fmt(r["peak_mem_mb"], 0)) for r in models]
    return markdown_table(["variant", "model", "parameters", "trainable at step 0", "utt/s", "audio s/s",
                           "median step (s)", "mean step (s)", "steps", "peak mem (MB)"], rows)


def models_note(models: Sequence[Mapping[str, Any]]) -> str:
    m = models[0]
    note = (f"Each variant's training recipe, 1 process, {m['precision'].upper()}, its own batching, on the same "
            "measured utterances as the tables above; throughput = utterances / total measured step time.")
    if any(r["trainable_parameters"] < r["parameters"] for r in models):
        # the rate of a frozen phase is not the rate after unfreeze_after_steps: say which one this is
        note += (" Measured as training starts (step 0): a frozen pretrained encoder (`freeze`) gets no "
                 "gradient, so its row is the frozen phase's rate, before any `unfreeze_after_steps`.")
    if any(r["label"].endswith(UNFROZEN_SUFFIX) for r in models):
        note += (f" A `{UNFROZEN_SUFFIX}` row is the same recipe as it trains after `unfreeze_after_steps` (nothing "
                 "frozen, or only what `frozen_after_unfreeze` keeps frozen): the rate of those steps.")
    return note


def breakdown_table(throughput: Sequence[Mapping[str, Any]]) -> str:
    rows = [(config_label(t["precision"], t["processes"]), pct(t["loader_wait_share"], 1), pct(t["features_share"], 1),
             pct(1 - t["data_share"], 1)) for t in throughput]
    return markdown_table(["config", "waiting for the loader", "features + augmentation", "forward / backward / allreduce / step"], rows)


def batching_table(batching: Mapping[str, Any]) -> str:
    epoch = batching["padding_epoch"]
    measured = {m["batching"]: m for m in batching["measured"]}
    rows = []
    for mode, stats in epoch.items():
        m = measured.get(mode)
        rows.append((mode, pct(stats["padding_ratio"], 1), stats["batches"], fmt(stats["mean_batch_size"], 1),
                     stats["max_batch_frames"], stats["over_budget_batches"],
                     pct(m["padding_ratio"], 1) if m else NA, fmt(m["utt_per_s"]) if m else NA,
                     fmt(m["audio_s_per_s"]) if m else NA, fmt(m["median_step_s"], 3) if m else NA))
    return markdown_table(["batching", "padding (epoch)", "batches/epoch", "mean batch", "max batch frames",
                           "over budget", "padding (measured)", "utt/s", "audio s/s", "median step (s)"], rows)


def memory_table(memory: Mapping[str, Any]) -> str:
    rows = []
    for key, label in (("off", "off"), ("on", "on")):
        m = memory.get(key)
        if not m:
            continue
        rows.append((label, fmt(m.get("saved_activations_mb"), 1), fmt(m["peak_rss_mb"], 0), fmt(m["rss_before_mb"], 0),
                     fmt(m["step_increase_mb"], 0),
                     fmt(m.get("cuda_max_allocated_mb"), 0) if m.get("cuda_max_allocated_mb") is not None else "n/a (cpu)",
                     fmt(m.get("utt_per_s"))))
    return markdown_table(["gradient checkpointing", "activations kept for backward (MB)", "peak RSS (MB)",
                           "RSS before steps (MB)", "RSS increase during steps (MB)", "peak GPU allocated (MB)",
                           "utt/s"], rows)


def prep_table(prep: Mapping[str, Any]) -> str:
    rows = [(r["workers"], r["utterances_out"], fmt(r["audio_s"], 1), fmt(r["wall_s"], 2), fmt(r["audio_h_per_h"], 0),
             fmt(r["speedup"], 2) + "×", pct(r["efficiency"]), fmt(max(r["worker_s"]), 2)) for r in prep["rows"]]
    return markdown_table(["workers", "utterances", "audio (s)", "wall (s)", "audio h / wall h", "speed-up",
                           "efficiency", "slowest worker (s)"], rows)


def model_summary(model: Mapping[str, Any]) -> str:
    """"conformer (d_model 144, num_layers 4; 2,012,345 parameters)"; a pretrained model names its checkpoint
    and freeze instead of dimensions it reads from there, and says how many parameters train at step 0."""
    parts = [f"{k} {model[k]}" for k in ("d_model", "num_layers", "hidden_size", "subsampling_channels")
             if model.get(k) is not None]
    parts += [f"{k} {model[k]}" for k in ("checkpoint", "freeze") if model.get(k) not in (None, "none")]
    count = f"{model['parameters']:,} parameters"
    trainable = model.get("trainable_parameters")
    if trainable is not None and trainable != model["parameters"]:
        count += f", {trainable:,} trainable at step 0"
    return f"{model.get('name', '?')} ({', '.join(parts)}; {count})"


def backend_summary(report: Mapping[str, Any]) -> str:
    if report.get("backend") != "horovod":
        return "no Horovod (one process; multi-process rows need Horovod)"
    args = report["settings"].get("horovod_args", "")
    return "Horovod" + (" (Gloo)" if "--gloo" in args else "") + " with hvd.DistributedOptimizer"


def measured_steps(report: Mapping[str, Any]) -> int:
    one = [t for t in report["throughput"] if t["processes"] == 1]
    return one[0]["measured_steps"] if one else report["settings"]["steps"]


def precision_note(report: Mapping[str, Any]) -> str:
    labels = [t["precision"].upper() for t in report["throughput"] if t["processes"] == 1]
    tp = report.get("training_precision")
    note = f"Precisions: {', '.join(labels)}"
    if tp:
        note += f"; training's `precision: {tp['setting']}` runs {tp['resolves_to'].upper()} on this device"
    return note + "."


def contention_note(report: Mapping[str, Any]) -> list[str]:
    c = report.get("contention") or {}
    if not c.get("flagged"):
        return []
    load = report["device"].get("load_average_1m")
    return [f"**Warning:** a single-process run got only {pct(c['min_single_process_cpu_util'])} of a core while "
            f"timed (load average {load} at start): other processes shared the machine, so the timings below "
            "are slower and noisier than on an idle one (see the CPU util column).", ""]


def render_markdown(report: Mapping[str, Any]) -> str:
    s, d = report["settings"], report["data"]
    out = ["# Training throughput benchmark", "",
           f"Device: {report['device_summary']}.  ",
           f"Model: {model_summary(report['model'])}; {s['threads_per_rank']} thread(s) per rank; "
           f"{backend_summary(report)}.  ",
           f"Data: {d['measured_utterances']} utterances ({d['measured_audio_s']:.1f} s of audio) of the prepared "
           f"training set ({d['train_utterances']} utterances), frame budget {d['frame_budget']}"
           f"{' (benchmark override)' if d.get('frame_budget_overridden') else ''}, {d['passes']} pass(es); "
           f"{s['warmup_steps']} warm-up steps per rank, then {measured_steps(report)} measured steps at 1 process "
           "(N processes split the same batches). Throughput = utterances / total measured step time (slowest "
           "rank per step).  ",
           precision_note(report), "", *contention_note(report),
           reference_table(report["throughput"]), ""]
    if report.get("models"):
        out += ["## Throughput per model", "", models_table(report["models"]), "", models_note(report["models"]), ""]
    out += ["## Throughput, scaling and step time", "",
            details_table(report["throughput"], report["scaling"]), "",
            "Scaling efficiency = throughput_N / (N × throughput_1). Data-loading share = (time waiting for the loader workers + feature "
            "extraction and augmentation) / step time, summed over ranks.", "",
            breakdown_table(report["throughput"]), ""]
    if report.get("batching"):
        out += ["## Batching (1 process, {})".format(report["batching"]["precision"].upper()), "",
                batching_table(report["batching"]), "",
                "fixed_random: shuffled fixed-size batches; bucketed_fixed: fixed-size batches within duration "
                "buckets; dynamic: buckets packed under the frame budget (training's batching); random_budget: "
                "shuffled, packed under the frame budget. Epoch columns: the whole training set; measured: the "
                "benchmark's utterances.", ""]
    if report.get("memory"):
        out += ["## Peak memory and gradient checkpointing (1 process, {})".format(report["memory"]["precision"].upper()),
                "", memory_table(report["memory"]), ""]
        out += ["Activations kept for backward: bytes autograd saves during the forward pass of the largest "
                "measured batch (exact, any device). Peak RSS: the process's high-water mark over the training "
                "steps (reset before them); on CPU it also holds allocator caches, so small activation "
                "differences do not show there.", ""]
        cmp = report["memory"].get("comparison")
        if cmp:
            basis = {"saved_activations_mb": "activations kept for backward", "cuda_max_allocated_mb": "peak GPU memory",
                     "step_increase_mb": "RSS increase"}[cmp["basis"]]
            out += [f"Gradient checkpointing changes {basis} by {fmt(-cmp['saved_mb'], 1)} MB "
                    f"({pct(-cmp['saved_fraction']) if cmp['saved_fraction'] is not None else NA}) and throughput "
                    f"by {fmt(1 / cmp['slowdown'], 2) if cmp.get('slowdown') else NA}×.", ""]
    if report.get("prep_scaling"):
        p = report["prep_scaling"]
        out += ["## Data-prep scaling (resampling)", "", prep_table(p), "",
                f"{p['utterances']} utterances of the corpus manifest ({p['source_audio_s']:.1f} s of source "
                "audio) split into disjoint parts, one `asrflow.prep.resample` process per part, run at once; "
                "wall time includes interpreter start-up.", ""]
    out += [f"Benchmark wall time: {report['wall_s']:.0f} s.", ""]
    return "\n".join(out)


def plot(report: Mapping[str, Any], path: str | Path) -> None:
    """Bars: throughput per configuration, and per batching mode (padding ratio on top of each bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batching = report.get("batching", {}).get("measured", [])
    fig, axes = plt.subplots(1, 2 if batching else 1, figsize=(11 if batching else 6, 4), squeeze=False)
    ax = axes[0][0]
    tp = report["throughput"]
    labels = [config_label(t["precision"], t["processes"]).replace(" Horovod", "\nHorovod") for t in tp]
    colors = ["tab:blue" if t["precision"] == "fp32" else "tab:orange" for t in tp]
    bars = ax.bar(range(len(tp)), [t["utt_per_s"] for t in tp], color=colors)
    for bar, t in zip(bars, tp):
        ax.annotate(f"{t['utt_per_s']:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(tp)), labels, fontsize=8)
    ax.set_ylabel("utterances / s")
    ax.set_title("training throughput")
    if batching:
        ax = axes[0][1]
        bars = ax.bar(range(len(batching)), [m["utt_per_s"] for m in batching], color="tab:green")
        for bar, m in zip(bars, batching):
            ax.annotate(f"pad {100 * m['padding_ratio']:.0f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(batching)), [m["batching"] for m in batching], fontsize=8)
        ax.set_ylabel("utterances / s")
        ax.set_title(f"batching (1 process, {report['batching']['precision'].upper()})")
    fig.suptitle(report["device_summary"].split(";")[0], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
