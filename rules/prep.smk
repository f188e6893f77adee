# Resampling (sharded), truncation, vocabulary and bucketing of the corpus.


rule resample_shard:
    input:
        manifest="results/corpus/manifest.jsonl",
    output:
        manifest="results/prep/resampled/shard_{shard}.jsonl",
        quarantine="results/prep/resampled/quarantine_{shard}.jsonl",
        wavs=directory("results/prep/resampled/wav_{shard}"),
    log:
        "logs/prep/resample_shard_{shard}.log",
    benchmark:
        "benchmarks/prep/resample_shard_{shard}.tsv"
    params:
        num_shards=config["prep"]["shards"],
        sample_rate=config["prep"]["sample_rate"],
        target_rms_dbfs=config["prep"]["target_rms_dbfs"],
        peak_ceiling_dbfs=config["prep"]["peak_ceiling_dbfs"],
        silence_dbfs=config["prep"]["silence_dbfs"],
        min_dynamic_range_db=config["prep"]["min_dynamic_range_db"],
        clip_fraction=config["prep"]["clip_fraction"],
        min_duration=config["prep"]["min_duration"],
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    conda:
        "../envs/audio.yaml"
    script:
        f"{SCRIPTS}/resample_shard.py"


rule merge_resampled:
    input:
        manifests=expand("results/prep/resampled/shard_{shard}.jsonl", shard=SHARDS),
        quarantines=expand("results/prep/resampled/quarantine_{shard}.jsonl", shard=SHARDS),
    output:
        manifest="results/prep/resampled.jsonl",
        quarantine="results/prep/quarantine.jsonl",
    log:
        "logs/prep/merge_resampled.log",
    benchmark:
        "benchmarks/prep/merge_resampled.tsv"
    threads: 1
    resources:
        mem_mb=500,
        runtime=10,
    conda:
        "../envs/tracking.yaml"
    script:
        f"{SCRIPTS}/merge_resampled.py"


rule truncate:
    input:
        manifest="results/prep/resampled.jsonl",
    output:
        manifest="results/prep/truncated.jsonl",
        report="results/prep/truncation_report.jsonl",
        summary="results/prep/truncation_summary.json",
        wavs=directory("results/prep/truncated_wav"),
    log:
        "logs/prep/truncate.log",
    benchmark:
        "benchmarks/prep/truncate.tsv"
    params:
        max_duration=config["prep"]["max_duration"],
        splits=config["prep"]["truncate_splits"],
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/audio.yaml"
    script:
        f"{SCRIPTS}/truncate.py"


rule vocab:
    input:
        manifest="results/prep/truncated.jsonl",
    output:
        vocab="results/prep/vocab.json",
    log:
        "logs/prep/vocab.log",
    benchmark:
        "benchmarks/prep/vocab.tsv"
    params:
        units=config["prep"].get("units", "char"),
        bpe_vocab_size=config["prep"].get("bpe_vocab_size", 256),
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    conda:
        "../envs/tracking.yaml"
    script:
        f"{SCRIPTS}/vocab.py"


rule bucketing:
    input:
        manifest="results/prep/truncated.jsonl",
    output:
        plan="results/prep/buckets.json",
        report="results/prep/bucketing_report.json",
    log:
        "logs/prep/bucketing.log",
    benchmark:
        "benchmarks/prep/bucketing.tsv"
    params:
        num_buckets=config["bucketing"]["num_buckets"],
        frame_budget=config["bucketing"]["frame_budget"],
        max_batch_size=config["bucketing"]["max_batch_size"],
        seed=config["seed"],
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    conda:
        "../envs/tracking.yaml"
    script:
        f"{SCRIPTS}/bucketing.py"


rule data_report:
    input:
        corpus="results/corpus/summary.json",
        quarantine="results/prep/quarantine.jsonl",
        truncation="results/prep/truncation_summary.json",
        bucketing="results/prep/bucketing_report.json",
        manifest="results/prep/truncated.jsonl",
        noise="results/noise/manifest.jsonl",
    output:
        report="results/prep/data_report.json",
    log:
        "logs/prep/data_report.log",
    benchmark:
        "benchmarks/prep/data_report.tsv"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    conda:
        "../envs/tracking.yaml"
    script:
        f"{SCRIPTS}/data_report.py"


rule phone_lexicon:
    """espeak-ng's phones of every training and dev word, for a variant with an auxiliary phone CTC
    head (model.phone_ctc_layer; asrflow.phones). Test transcripts are never read."""
    input:
        manifest="results/prep/truncated.jsonl",
    output:
        phones="results/prep/phones.json",
    log:
        "logs/prep/phone_lexicon.log",
    benchmark:
        "benchmarks/prep/phone_lexicon.tsv"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    conda:
        "../envs/tracking.yaml"
    script:
        f"{SCRIPTS}/phone_lexicon.py"
