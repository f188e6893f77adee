# DEMAND noise: synthesized locally (default, offline), downloaded from Zenodo, or from a mirror.
# The synthetic set is published as a local mirror in DEMAND's own zip layout, so every source goes
# through the same md5-verified download and safe extraction.

rule synthesize_noise_mirror:
    output:
        mirror=directory(SYNTHETIC_MIRROR),
    log:
        "logs/noise/synthesize_noise_mirror.log",
    benchmark:
        "benchmarks/noise/synthesize_noise_mirror.tsv"
    params:
        environments=NOISE_ENVS,
        seconds=config["noise"].get("synthetic_seconds", 30),
        channels=max(config["noise"]["channels"]),
        seed=config["seed"],
    threads: 1
    resources:
        mem_mb=1000,
        runtime=20,
    conda:
        "../envs/audio.yaml"
    script:
        f"{SCRIPTS}/synthesize_noise_mirror.py"


rule fetch_demand:
    input:
        mirror=SYNTHETIC_MIRROR if config["noise"]["source"] == "synthetic" else [],
    output:
        archive="resources/demand/zips/{env}_16k.zip",
        env_dir=directory("resources/demand/extracted/{env}"),
    log:
        "logs/noise/fetch_demand_{env}.log",
    benchmark:
        "benchmarks/noise/fetch_demand_{env}.tsv"
    params:
        mirror=lambda wc, input: input.mirror if config["noise"]["source"] == "synthetic" else demand_mirror(),
        synthetic=config["noise"]["source"] == "synthetic",
    threads: 1
    resources:
        mem_mb=500,
        runtime=60,
    retries: 2
    conda:
        "../envs/audio.yaml"
    script:
        f"{SCRIPTS}/fetch_demand.py"


rule noise_manifest:
    input:
        env_dirs=expand("resources/demand/extracted/{env}", env=NOISE_ENVS),
    output:
        manifest="results/noise/manifest.jsonl",
    log:
        "logs/noise/noise_manifest.log",
    benchmark:
        "benchmarks/noise/noise_manifest.tsv"
    params:
        train=config["noise"]["train_environments"],
        heldout=config["noise"]["heldout_environments"],
        channels=config["noise"]["channels"],
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    conda:
        "../envs/audio.yaml"
    script:
        f"{SCRIPTS}/noise_manifest.py"
