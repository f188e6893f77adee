# Training throughput benchmark: precision x Horovod processes, batching, memory, data-prep scaling, and
# the throughput of each model side by side.
# `snakemake results/benchmark/benchmark.md`; settings from the config's `benchmark:` section.


rule benchmark:
    input:
        manifest="results/prep/truncated.jsonl",
        plan="results/prep/buckets.json",
        vocab="results/prep/vocab.json",
        cmvn="results/prep/cmvn.json",
        noise="results/noise/manifest.jsonl",
        corpus="results/corpus/manifest.jsonl",
        # a model that trains from a frozen-encoder cache is measured training from it
        encoder_caches=lambda wc: [p for m in benchmark_models() for p in encoder_cache_index(m["label"])],
        # the phone lexicon, if the benchmarked recipe or a compared model has a phone CTC head
        phones=lambda wc: sorted({p for v in [benchmark_variant()] + [m["label"] for m in benchmark_models()]
                                  for p in phone_lexicon_input(v)}),
    output:
        json="results/benchmark/benchmark.json",
        md="results/benchmark/benchmark.md",
        png="results/benchmark/throughput.png",
    log:
        "logs/benchmark/benchmark.log",
    benchmark:
        "benchmarks/benchmark/benchmark.tsv"
    params:
        settings=config.get("benchmark", {}),
        horovod_args=config["horovod"].get("extra_args", "--gloo"),
        # the recipe of the benchmarked variant (default: the first trained one); `model` overrides its model
        train=lambda wc: variant_params(benchmark_variant()),
        model=config.get("benchmark", {}).get("model") or {},
        models=lambda wc: benchmark_models(),
        seed=config["seed"],
        prep={
            k: config["prep"][k]
            for k in ("sample_rate", "target_rms_dbfs", "peak_ceiling_dbfs", "silence_dbfs", "min_dynamic_range_db",
                      "clip_fraction", "min_duration")
        },
    # the N-process measurement needs N cores to itself: nothing else may run meanwhile
    threads: max(config.get("benchmark", {}).get("processes", [1, 2]) + config.get("benchmark", {}).get("prep_workers", [1, 2]))
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/training.yaml"
    script:
        f"{SCRIPTS}/benchmark.py"


rule data_path_benchmark:
    """The training data path measured: rank memory at 1x and 10x the corpus, loader wait, one reader's
    decoded audio-s/s, start-up on a LibriSpeech-size manifest on every rank, and our sampler against
    lhotse's DynamicBucketingSampler on the same manifest. A few minutes on 2 cores, so it is not part of
    the default target: `snakemake results/benchmark/data_path.md`."""
    input:
        manifest="results/prep/truncated.jsonl",
        plan="results/prep/buckets.json",
        vocab="results/prep/vocab.json",
        cmvn="results/prep/cmvn.json",
        noise="results/noise/manifest.jsonl",
        phones=lambda wc: phone_lexicon_input(first_trained_variant()),
    output:
        json="results/benchmark/data_path.json",
        md=report("results/benchmark/data_path.md", category="Benchmark", labels={"table": "data path"}),
    log:
        "logs/benchmark/data_path.log",
    benchmark:
        "benchmarks/benchmark/data_path.tsv"
    params:
        train=lambda wc: variant_params(first_trained_variant()),
        settings=config.get("benchmark", {}).get("data_path", {}),
    threads: 2
    resources:
        mem_mb=6000,
        runtime=20,
    conda:
        "../envs/training.yaml"
    script:
        f"{SCRIPTS}/data_path_benchmark.py"
