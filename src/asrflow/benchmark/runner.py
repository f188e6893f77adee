"""The whole benchmark in one run: worker processes for every measurement, then the report.

Measurements, in this order (one process at a time, so they do not compete for cores):

1. ``np1``       one process: reference precision with training's batching (also the memory figure
                 without checkpointing), the other precisions, then the other batching modes;
2. ``np1-ckpt``  one process: the reference case with gradient checkpointing (memory with it);
3. ``npN``       ``horovodrun -np N -H localhost:N --gloo``: every precision with training's batching;
4. ``model-V``   one process per model to compare (each training variant's recipe, default every trained
                 variant): the reference precision with the variant's own batching, on the same utterances
                 as the rows above; the benchmarked variant's row reuses its ``np1`` measurement;
5. data prep     1..k resampling processes on disjoint parts of a fixed corpus subset.

The reference precision is the first of ``precisions`` (fp32 by default). A precision is a training
setting (fp32, bf16, fp16, auto) or ``mixed``: fp16 with a GradScaler on CUDA, bf16 on CPU — the mixed
precision of the device, even where training's ``auto`` keeps fp32 (CPUs without native bf16).
Settings that come out the same on this device are measured once.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from asrflow.benchmark import memory as memory_mod
from asrflow.benchmark import padding, table
from asrflow.benchmark.device import describe, device_info
from asrflow.benchmark.throughput import config_key, precision_label, precision_speedup, scaling_table, summarize
from asrflow.manifest import write_json
from asrflow.train.sampler import BucketPlan

log = logging.getLogger("asrflow.benchmark")

DEFAULT_BATCHING = ["fixed_random", "bucketed_fixed", "dynamic"]
PRECISION_CHOICES = ("fp32", "mixed", "auto", "bf16", "fp16")
# A compute-bound single-thread process gets ~100% of a core on an idle machine; much less means other
# processes took the CPU while it was timed.
CONTENTION_THRESHOLD = 0.85


def default_device():
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def resolve(precision: str, device) -> tuple[str, str]:
    """A benchmark precision -> (the training ``precision`` setting to run, the dtype label: fp32/bf16/fp16)."""
    from asrflow.train.precision import resolve_precision

    setting = ("fp16" if device.type == "cuda" else "bf16") if precision == "mixed" else precision
    dtype, _ = resolve_precision(setting, device)
    return setting, precision_label(str(dtype) if dtype is not None else None)


def resolved_precisions(settings: "BenchmarkSettings", device) -> list[tuple[str, str, str]]:
    """(requested, setting, label) per distinct label, in the configured order."""
    out, seen = [], set()
    for p in settings.precisions:
        setting, label = resolve(p, device)
        if label not in seen:
            seen.add(label)
            out.append((p, setting, label))
    return out


@dataclass
class BenchmarkSettings:
    """The config's ``benchmark:`` section (model, variant and models are resolved by the rule)."""
    steps: int = 6                     # measured steps at 1 process (N processes share the same batches)
    warmup_steps: int = 2              # per rank, per configuration, not measured
    processes: list[int] = field(default_factory=lambda: [1, 2])
    precisions: list[str] = field(default_factory=lambda: ["fp32", "mixed"])
    batching: list[str] = field(default_factory=lambda: list(DEFAULT_BATCHING))
    gradient_checkpointing: bool = True   # also measure with checkpointing on (memory table)
    frame_budget: int | None = None    # null: the bucketing plan's; else batches are re-planned with this budget
    prep_workers: list[int] = field(default_factory=lambda: [1, 2])
    prep_utterances: int = 60
    horovod_args: str = "--gloo"
    timeout_s: int = 600               # per worker process
    seed: int = 1234

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, seed: int = 1234) -> "BenchmarkSettings":
        cfg = dict(cfg or {})
        for k in ("model", "variant", "models", "data_path"):  # read by the rule itself / by data_path_benchmark
            cfg.pop(k, None)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown benchmark option(s) {unknown}")
        cfg.setdefault("seed", seed)
        s = cls(**{k: v for k, v in cfg.items() if v is not None})
        s.processes = sorted({int(n) for n in s.processes} | {1})  # 1 process is the scaling baseline
        for mode in s.batching:
            padding.check_mode(mode)
        for p in s.precisions:
            if p not in PRECISION_CHOICES:
                raise ValueError(f"benchmark precision must be one of {PRECISION_CHOICES}, got {p!r}")
        if not s.precisions:
            raise ValueError("benchmark precisions must not be empty")
        if s.steps < 1 or s.warmup_steps < 0:
            raise ValueError("benchmark steps must be >= 1 and warmup_steps >= 0")
        if s.frame_budget is not None and s.frame_budget < 1:
            raise ValueError("benchmark frame_budget must be positive (or null)")
        return s


LAUNCHER_KEYS = ("np", "hosts")  # per-variant process layout, not training options


def benchmark_train_params(train: Mapping[str, Any], model: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The variant's training recipe as the workers get it: launcher keys dropped, ``model`` (the
    benchmark's override, possibly partial) merged over the recipe's model."""
    params = {k: v for k, v in dict(train).items() if k not in LAUNCHER_KEYS}
    if model:
        params["model"] = {**dict(params.get("model", {})), **dict(model)}
    return params


@dataclass
class Inputs:
    manifest: Path
    plan: Path
    vocab: Path
    cmvn: Path
    noise: Path | None = None
    corpus: Path | None = None   # corpus manifest, for the data-prep scaling
    phones: Path | None = None   # phone lexicon (rule phone_lexicon), for a recipe with a phone CTC head


@dataclass
class WorkerRun:
    name: str
    processes: int
    cases: list[dict[str, Any]]


def case(precision: tuple[str, str, str], batching: str, checkpointing: bool = False,
         role: str = "throughput") -> dict[str, Any]:
    requested, setting, label = precision
    return {"name": f"{label}-{batching}{'-ckpt' if checkpointing else ''}", "precision": setting,
            "requested": requested, "label": label, "batching": batching,
            "gradient_checkpointing": checkpointing, "role": role}


def plan_runs(settings: BenchmarkSettings, training_batching: str = "dynamic", device=None) -> list[WorkerRun]:
    precisions = resolved_precisions(settings, device if device is not None else default_device())
    ref = precisions[0]
    first = [case(ref, training_batching, role="throughput+memory")]
    first += [case(p, training_batching) for p in precisions[1:]]
    first += [case(ref, m, role="batching") for m in settings.batching if m != training_batching]
    runs = [WorkerRun("np1", 1, first)]
    if settings.gradient_checkpointing:
        runs.append(WorkerRun("np1-ckpt", 1, [case(ref, training_batching, True, role="memory")]))
    runs += [WorkerRun(f"np{n}", n, [case(p, training_batching) for p in precisions])
             for n in settings.processes if n > 1]
    return runs


@dataclass
class ModelUnderTest:
    """One row of the per-model table: a training variant's recipe, as its workers get it."""
    label: str                 # the variant's name
    params: dict[str, Any]     # its training recipe (launcher keys dropped)
    encoder_cache: str | None = None  # its frozen-encoder cache folder, for a recipe with encoder_cache: true


def recipe_batching(train_params: Mapping[str, Any]) -> str:
    """The benchmark's name for the batching a recipe trains with."""
    return "dynamic" if train_params.get("bucketing", True) else "random_budget"


def same_recipe(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def with_unfrozen_phases(models: list[ModelUnderTest]) -> list[ModelUnderTest]:
    """Each model, followed, for a recipe that unfreezes its pretrained encoder after N steps, by the same
    recipe with nothing frozen, or only what ``frozen_after_unfreeze`` keeps frozen (label ``V-unfrozen``).
    The benchmark measures from step 0, where such a recipe is still frozen and 2-3x faster than in the
    steps after N, which are most of its training."""
    out = []
    for m in models:
        out.append(m)
        model = dict(m.params.get("model", {}))
        if model.get("freeze", "none") not in ("none", None) and int(model.get("unfreeze_after_steps") or 0) > 0:
            after = model.pop("frozen_after_unfreeze", None)  # the stem and blocks that stay frozen after unfreezing
            unfrozen = {**dict(m.params), "model": {**model, "freeze": "none" if after is None else int(after),
                                                     "unfreeze_after_steps": 0}}
            out.append(ModelUnderTest(m.label + table.UNFROZEN_SUFFIX, unfrozen))
    return out


def plan_model_runs(models: list[ModelUnderTest], settings: BenchmarkSettings, reference_params: Mapping[str, Any],
                    device=None) -> list[tuple[ModelUnderTest, WorkerRun | None]]:
    """A one-process worker per model (and per unfrozen phase, :func:`with_unfrozen_phases`), measuring the
    reference precision with the model's own batching; None for a model whose recipe is the grid's (its
    ``np1`` row measured exactly that already)."""
    ref = resolved_precisions(settings, device if device is not None else default_device())[0]
    planned = []
    for m in with_unfrozen_phases(models):
        if same_recipe(benchmark_train_params(m.params), reference_params):
            planned.append((m, None))
        else:
            planned.append((m, WorkerRun(f"model-{m.label}", 1, [case(ref, recipe_batching(m.params), role="model")])))
    return planned


MODEL_ROW_FIELDS = ("precision", "batching", "utt_per_s", "audio_s_per_s", "median_step_s", "mean_step_s",
                    "utt_per_s_median", "measured_steps", "utterances", "audio_s", "data_share", "cpu_util")


def model_row(model: ModelUnderTest, measured: Mapping[str, Any], reused: bool) -> dict[str, Any]:
    """The per-model table's row: what the model is, and its one-process training throughput."""
    mem = measured["memory"]
    return {"label": model.label, "model": dict(model.params.get("model", {})),
            "parameters": measured["total_parameters"], "trainable_parameters": measured["parameters"],
            **{k: measured[k] for k in MODEL_ROW_FIELDS},
            "peak_mem_mb": mem["cuda_max_allocated_mb"] if mem.get("cuda_max_allocated_mb") is not None
            else mem["peak_rss_mb"],
            "device": measured["device"], "reused_reference_measurement": reused}


def worker_env(threads_per_rank: int) -> dict[str, str]:
    env = dict(os.environ)
    for k in list(env):  # never inherit a rank identity from an enclosing horovodrun
        if k.startswith(("HOROVOD_", "OMPI_", "PMI_")):
            env.pop(k)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    n = str(max(1, threads_per_rank))
    env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, PYTHONHASHSEED="0", MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false")
    return env


def horovodrun() -> str:
    local = Path(sys.executable).parent / "horovodrun"
    found = str(local) if local.exists() else shutil.which("horovodrun")
    if not found:
        raise RuntimeError("horovodrun is not installed in this environment: the N-process measurements need "
                           "Horovod (scripts/install.sh, or the training env); or set benchmark.processes: [1]")
    return found


def benchmark_plan(plan: BucketPlan, settings: BenchmarkSettings) -> BucketPlan:
    """The plan batches are drawn from: the bucketing rule's, with the benchmark's frame budget if set."""
    if settings.frame_budget is None:
        return plan
    return BucketPlan(durations=dict(plan.durations), edges=list(plan.edges), frame_budget=int(settings.frame_budget),
                      max_batch_size=plan.max_batch_size, dialects=dict(plan.dialects))


def used_utterances(plan: BucketPlan, settings: BenchmarkSettings, runs: list[WorkerRun]) -> list[str]:
    """Every utterance some worker will step on (warm-up included): the only audio workers need to load."""
    ids: set[str] = set()
    for run in runs:
        for c in run.cases:
            sched = padding.benchmark_schedule(plan, c["batching"], settings.seed, settings.steps,
                                               settings.warmup_steps, run.processes)
            ids.update(u for b in sched.warmup + sched.measured for u in b)
    return sorted(ids)


def worker_command(run: WorkerRun, inputs: Inputs, params: Path, spec: Path, out: Path, log_dir: Path,
                   horovod_args: str = "--gloo", plans: tuple[Path, Path] | None = None,
                   encoder_cache: str | None = None) -> list[str]:
    load_plan, schedule_plan = plans or (inputs.plan, inputs.plan)
    cmd = [sys.executable, "-m", "asrflow.benchmark.worker", "--manifest", str(inputs.manifest),
           "--plan", str(load_plan), "--schedule-plan", str(schedule_plan), "--vocab", str(inputs.vocab),
           "--cmvn", str(inputs.cmvn),
           "--params", str(params), "--spec", str(spec), "--out", str(out), "--log-dir", str(log_dir)]
    if inputs.noise is not None:
        cmd += ["--noise", str(inputs.noise)]
    if encoder_cache:
        cmd += ["--encoder-cache", str(encoder_cache)]
    if inputs.phones is not None:
        cmd += ["--phones", str(inputs.phones)]
    if run.processes > 1:
        cmd = [horovodrun(), "-np", str(run.processes), "-H", f"localhost:{run.processes}",
               *shlex.split(horovod_args), *cmd]
    return cmd


def run_worker(run: WorkerRun, inputs: Inputs, params: Path, settings: BenchmarkSettings, work: Path,
               log_dir: Path, env: dict[str, str], plans: tuple[Path, Path] | None = None,
               encoder_cache: str | None = None) -> dict[str, Any]:
    spec = work / f"{run.name}.spec.json"
    out = work / f"{run.name}.out.json"
    write_json(spec, {"seed": settings.seed, "steps": settings.steps, "warmup_steps": settings.warmup_steps,
                      "cases": run.cases})
    cmd = worker_command(run, inputs, params, spec, out, log_dir / f"{run.name}.ranks", settings.horovod_args, plans,
                         encoder_cache)
    log_path = log_dir / f"{run.name}.log"
    log.info("%s: %s", run.name, " ".join(shlex.quote(c) for c in cmd))
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        proc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=settings.timeout_s)
    if proc.returncode != 0 or not out.exists():
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"benchmark worker {run.name} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    log.info("%s: done in %.1f s", run.name, time.perf_counter() - t0)
    return json.loads(out.read_text())


def entry(raw: Mapping[str, Any]) -> dict[str, Any]:
    """One measured configuration for the report: its case, summary numbers, memory and GPU."""
    c = raw["case"]
    return {"name": c["name"], "role": c.get("role", "throughput"), "precision": raw["precision"],
            "requested_precision": c.get("requested", c["precision"]), "processes": raw["processes"], "batching": c["batching"],
            "gradient_checkpointing": c["gradient_checkpointing"], "device": raw["device"], **summarize(raw),
            "memory": raw["memory"], "gpu": raw["gpu"], "parameters": raw["parameters"],
            "total_parameters": raw["total_parameters"]}


def memory_entry(e: Mapping[str, Any]) -> dict[str, Any]:
    m = e["memory"]
    return {**m, "utt_per_s": e["utt_per_s"], "step_increase_mb": round(max(0.0, m["peak_rss_mb"] - m["rss_before_mb"]), 1)}


def build_report(entries: list[dict[str, Any]], settings: BenchmarkSettings, plan: BucketPlan, train_params: Mapping,
                 training_batching: str, info: Mapping[str, Any], prep: Mapping[str, Any] | None,
                 wall_s: float, backend: str, models: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    ref = settings.precisions[0]
    grid = [e for e in entries if e["batching"] == training_batching and not e["gradient_checkpointing"]]
    grid.sort(key=lambda e: (e["processes"], settings.precisions.index(e["requested_precision"])))
    throughput = [e for e in grid if e["processes"] in settings.processes]
    first = grid[0]
    ids, passes = padding.measured_utterances(plan, settings.seed, settings.steps)
    report: dict[str, Any] = {
        "device": dict(info), "device_summary": describe(info), "backend": backend,
        "settings": {**settings.__dict__, "threads_per_rank": int(train_params.get("threads_per_rank", 1)),
                     "training_batching": training_batching, "reference_precision": ref},
        "model": {**dict(train_params.get("model", {})), "parameters": first["total_parameters"],
                  "trainable_parameters": first["parameters"]},
        "data": {"train_utterances": len(plan.durations), "measured_utterances": len(ids), "passes": passes,
                 "measured_audio_s": sum(plan.durations[u] for u in ids), "frame_budget": plan.frame_budget,
                 "frame_budget_overridden": settings.frame_budget is not None},
        "throughput": throughput,
        "scaling": scaling_table(throughput),
        "precision_speedup": precision_speedup(throughput),
        "models": list(models or []),
    }
    one = [e for e in entries if e["processes"] == 1 and e["requested_precision"] == ref
           and not e["gradient_checkpointing"]]
    modes = list(dict.fromkeys([*settings.batching, training_batching]))
    report["batching"] = {
        "precision": first["precision"],
        "padding_epoch": padding.padding_comparison(plan, settings.seed),
        "measured": [e for mode in modes for e in one if e["batching"] == mode],  # one entry per mode
    }
    off = next((e for e in one if e["role"] == "throughput+memory"), None)
    on = next((e for e in entries if e["gradient_checkpointing"]), None)
    if off is not None:
        mem = {"precision": off["precision"], "off": memory_entry(off)}
        if on is not None:
            mem["on"] = memory_entry(on)
            mem["comparison"] = memory_mod.checkpointing_comparison(mem["off"], mem["on"])
        report["memory"] = mem
    # only meaningful for CPU training (a GPU run's process waits on the device by design)
    single = [e["cpu_util"] for e in entries
              if e["processes"] == 1 and e.get("cpu_util") is not None and e["device"] == "cpu"]
    report["contention"] = {"min_single_process_cpu_util": min(single) if single else None,
                            "threshold": CONTENTION_THRESHOLD,
                            "flagged": bool(single) and min(single) < CONTENTION_THRESHOLD}
    report["all_measurements"] = entries
    if prep is not None:
        report["prep_scaling"] = prep
    report["wall_s"] = wall_s
    return report


def mlflow_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """Flat metrics: throughput.fp32.np1.utt_per_s, scaling.bf16.np2.efficiency, batching.dynamic.padding_ratio, ..."""
    m: dict[str, float] = {}
    for t in report["throughput"]:
        key = config_key(t["precision"], t["processes"])
        for k in ("utt_per_s", "audio_s_per_s", "median_step_s", "utt_per_s_median", "data_share",
                  "loader_wait_share", "features_share", "cpu_util"):
            if t.get(k) is not None:
                m[f"throughput.{key}.{k}"] = t[k]
        m[f"throughput.{key}.peak_rss_mb"] = t["memory"]["peak_rss_mb"]
        if t.get("gpu"):
            m[f"throughput.{key}.gpu_util"] = t["gpu"]["util_mean"]
            m[f"throughput.{key}.gpu_mem_mb"] = t["gpu"]["mem_used_max_mb"]
        if t["memory"].get("cuda_max_allocated_mb") is not None:
            m[f"throughput.{key}.cuda_max_allocated_mb"] = t["memory"]["cuda_max_allocated_mb"]
    for row in report.get("models", []):
        for k in ("utt_per_s", "audio_s_per_s", "median_step_s", "mean_step_s", "peak_mem_mb"):
            m[f"models.{row['label']}.{k}"] = row[k]
    for key, s in report["scaling"].items():
        m[f"scaling.{key}.speedup"] = s["speedup"]
        m[f"scaling.{key}.efficiency"] = s["efficiency"]
    for key, v in report["precision_speedup"].items():
        m[f"precision_speedup.{key}"] = v
    b = report.get("batching") or {}
    for mode, stats in b.get("padding_epoch", {}).items():
        m[f"batching.{mode}.padding_ratio"] = stats["padding_ratio"]
    for e in b.get("measured", []):
        m[f"batching.{e['batching']}.utt_per_s"] = e["utt_per_s"]
        m[f"batching.{e['batching']}.audio_s_per_s"] = e["audio_s_per_s"]
        m[f"batching.{e['batching']}.measured_padding_ratio"] = e["padding_ratio"]
    mem = report.get("memory") or {}
    for k in ("off", "on"):
        if k in mem:
            for f in ("saved_activations_mb", "peak_rss_mb", "rss_before_mb", "step_increase_mb", "cuda_max_allocated_mb",
                      "utt_per_s"):
                if mem[k].get(f) is not None:
                    m[f"memory.checkpointing_{k}.{f}"] = mem[k][f]
    if mem.get("comparison"):
        m["memory.checkpointing_saved_mb"] = mem["comparison"]["saved_mb"]
    for r in (report.get("prep_scaling") or {}).get("rows", []):
        m[f"prep.workers{r['workers']}.audio_h_per_h"] = r["audio_h_per_h"]
        m[f"prep.workers{r['workers']}.wall_s"] = r["wall_s"]
        m[f"prep.workers{r['workers']}.efficiency"] = r["efficiency"]
    m["benchmark_wall_s"] = report["wall_s"]
    return {k: float(v) for k, v in m.items()}


def run_benchmark(inputs: Inputs, settings: BenchmarkSettings, train_params: Mapping[str, Any],
                  prep_settings: Any | None, out_json: Path, out_md: Path, out_png: Path,
                  log_dir: Path, models: list[ModelUnderTest] | None = None) -> dict[str, Any]:
    """Run every measurement, write the JSON, markdown and PNG; returns the report. ``models``: the
    recipes of the per-model throughput table (none: no such table)."""
    t0 = time.perf_counter()
    info = device_info()
    log.info("device: %s", describe(info))
    plan = benchmark_plan(BucketPlan.from_dict(json.loads(Path(inputs.plan).read_text())), settings)
    batching = recipe_batching(train_params)
    threads = int(train_params.get("threads_per_rank", 1))
    env = worker_env(threads)
    log_dir.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    backend = "single"
    with tempfile.TemporaryDirectory(prefix="asrflow-benchmark-") as tmp:
        work = Path(tmp)
        params_path = work / "params.json"
        params_path.write_text(json.dumps(dict(train_params)))
        device = default_device()
        runs = plan_runs(settings, batching, device)
        model_runs = plan_model_runs(list(models or []), settings, train_params, device)
        plans = (work / "plan.used.json", work / "plan.schedule.json")
        every_run = runs + [run for _, run in model_runs if run is not None]
        write_json(plans[0], padding.sub_plan(plan, used_utterances(plan, settings, every_run)).to_dict())
        write_json(plans[1], plan.to_dict())
        for run in runs:
            out = run_worker(run, inputs, params_path, settings, work, log_dir, env, plans)
            backend = out.get("backend", backend)
            entries += [entry(raw) for raw in out["cases"]]
        reference = next(e for e in entries if e["role"] == "throughput+memory")
        model_rows = []
        for model, run in model_runs:
            if run is None:
                model_rows.append(model_row(model, reference, reused=True))
                continue
            model_params = work / f"params.{run.name}.json"
            model_params.write_text(json.dumps(benchmark_train_params(model.params)))
            model_env = worker_env(int(model.params.get("threads_per_rank", 1)))
            out = run_worker(run, inputs, model_params, settings, work, log_dir, model_env, plans, model.encoder_cache)
            model_rows.append(model_row(model, entry(out["cases"][0]), reused=False))
        prep = None
        if inputs.corpus is not None and settings.prep_workers and prep_settings is not None:
            from asrflow.benchmark import prep_scaling

            log.info("data-prep scaling: %s workers on %d utterances", settings.prep_workers, settings.prep_utterances)
            prep = prep_scaling.measure(Path(inputs.corpus), settings.prep_utterances, settings.prep_workers,
                                        prep_settings, work / "prep", env={**env, "OMP_NUM_THREADS": "1"})
    report = build_report(entries, settings, plan, train_params, batching, info, prep,
                          time.perf_counter() - t0, backend, model_rows)
    setting = str(train_params.get("precision", "auto"))
    report["training_precision"] = {"setting": setting, "resolves_to": resolve(setting, device)[1]}
    for p in (out_json, out_md, out_png):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    write_json(out_json, report)
    Path(out_md).write_text(table.render_markdown(report))
    table.plot(report, out_png)
    return report
