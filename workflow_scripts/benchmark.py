"""Snakemake job: the training throughput benchmark (tables, JSON, chart, MLflow metrics)."""
from pathlib import Path

from asrflow.benchmark.runner import (BenchmarkSettings, Inputs, ModelUnderTest, benchmark_train_params, mlflow_metrics,
                                      run_benchmark)
from asrflow.prep.resample import ResampleSettings
from asrflow.workflow import step_run

smk = snakemake  # noqa: F821 (injected by Snakemake)
p = smk.params
with step_run(smk, "benchmark") as run:
    settings = BenchmarkSettings.from_config({"horovod_args": p.horovod_args, **p.settings}, seed=p.seed)
    inputs = Inputs(manifest=Path(smk.input.manifest), plan=Path(smk.input.plan), vocab=Path(smk.input.vocab),
                    cmvn=Path(smk.input.cmvn), noise=Path(smk.input.noise), corpus=Path(smk.input.corpus),
                    phones=Path(smk.input.phones[0]) if smk.input.phones else None)
    report = run_benchmark(inputs, settings, benchmark_train_params(p.train, p.model), ResampleSettings(**p.prep),
                           Path(smk.output.json), Path(smk.output.md), Path(smk.output.png),
                           Path(smk.log[0]).with_suffix(".workers"),
                           models=[ModelUnderTest(m["label"], m["params"], m.get("encoder_cache")) for m in p.models])
    run.params({f"benchmark.device.{k}": v for k, v in report["device"].items()} |
               {"benchmark.parameters": report["model"]["parameters"]})
    run.metrics(mlflow_metrics(report))
    for path in (smk.output.md, smk.output.json, smk.output.png):
        run.artifact(path)
