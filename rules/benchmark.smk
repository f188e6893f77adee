# Training throughput benchmark: precision x Horovod processes, batching, memory, data-prep scaling.
# Not part of `rule all` by default; `snakemake results/benchmark/benchmark.md` runs it.


def benchmark_train_params():
    """The variant's training recipe, with the benchmark's model when one is configured."""
    bench = config.get("benchmark", {})
    params = variant_params(bench.get("variant") or config["training"]["run_variants"][0])
    if bench.get("model"):
        params["model"] = {**params["model"], **bench["model"]}
    params.pop("np", None)
    return params


def benchmark_settings():
    bench = dict(config.get("benchmark", {}))
    bench.pop("model", None)
    bench.pop("variant", None)
    bench.setdefault("horovod_args", config["horovod"].get("extra_args", "--gloo"))
    return bench


rule benchmark:
    input:
        manifest="results/prep/truncated.jsonl",
        plan="results/prep/buckets.json",
        vocab="results/prep/vocab.json",
        cmvn="results/prep/cmvn.json",
        noise="results/noise/manifest.jsonl",
        corpus="results/corpus/manifest.jsonl",
    output:
        json="results/benchmark/benchmark.json",
        md="results/benchmark/benchmark.md",
        png="results/benchmark/throughput.png",
    log:
        "logs/benchmark/benchmark.log",
    benchmark:
        "benchmarks/benchmark/benchmark.tsv"
    params:
        settings=benchmark_settings(),
        train=benchmark_train_params(),
        seed=config["seed"],
        prep={k: config["prep"][k] for k in ("sample_rate", "target_rms_dbfs", "peak_ceiling_dbfs",
                                              "silence_dbfs", "clip_fraction", "min_duration")},
    # the N-process measurement needs N cores to itself; nothing else should run meanwhile
    threads: max(config.get("benchmark", {}).get("processes", [1, 2]) + config.get("benchmark", {}).get("prep_workers", [1, 2]))
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/evaluation.yaml"
    script:
        f"{SCRIPTS}/benchmark.py"
