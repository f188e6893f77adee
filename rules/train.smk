# CMVN statistics and the Horovod training rule (one run per training variant).


rule cmvn:
    input:
        manifest="results/prep/truncated.jsonl",
        vocab="results/prep/vocab.json",
    output:
        cmvn="results/prep/cmvn.json",
    log:
        "logs/prep/cmvn.log",
    benchmark:
        "benchmarks/prep/cmvn.tsv"
    params:
        n_mels=config["training"]["base"].get("n_mels", 80),
    threads: 2
    resources:
        mem_mb=3000,
        runtime=15,
    conda:
        "../envs/training.yaml"
    script:
        f"{SCRIPTS}/cmvn.py"


rule encoder_cache:
    """A frozen pretrained encoder's outputs for the variant's training and dev utterances, computed
    once, so that its steps train only the head (asrflow.train.pretrained.encoder_cache)."""
    input:
        manifest="results/prep/truncated.jsonl",
        plan="results/prep/buckets.json",
        vocab="results/prep/vocab.json",
    output:
        index="results/train/{variant}/encoder_cache/index.json",
        frames="results/train/{variant}/encoder_cache/frames.f16",
    log:
        "logs/train/{variant}.encoder_cache.log",
    benchmark:
        "benchmarks/train/{variant}.encoder_cache.tsv"
    params:
        train_json=lambda wc: json.dumps(variant_train_params(wc.variant)),
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/training.yaml"
    script:
        f"{SCRIPTS}/encoder_cache.py"


rule train:
    wildcard_constraints:
        variant=trained_variants_pattern(),
    input:
        manifest="results/prep/truncated.jsonl",
        plan="results/prep/buckets.json",
        vocab="results/prep/vocab.json",
        cmvn="results/prep/cmvn.json",
        noise="results/noise/manifest.jsonl",
        encoder_cache=lambda wc: encoder_cache_index(wc.variant),
        parent=lambda wc: init_from_input(wc.variant),
        phones=lambda wc: phone_lexicon_input(wc.variant),
    output:
        model="results/train/{variant}/model.pt",
        summary="results/train/{variant}/train_summary.json",
    log:
        "logs/train/{variant}.log",
    benchmark:
        "benchmarks/train/{variant}.tsv"
    params:
        train_json=lambda wc: shlex.quote(json.dumps(variant_train_params(wc.variant))),
        # what defines this run, for MLflow; not the whole config, whose unrelated keys would retrain
        run_config=lambda wc: shlex.quote(json.dumps(train_run_config(wc.variant))),
        # what prep did to every waveform; exported with the model, so transcribe does the same
        frontend=shlex.quote(json.dumps({k: config["prep"][k] for k in ("sample_rate", "target_rms_dbfs", "peak_ceiling_dbfs")})),
        launch=lambda wc: horovod_launch(wc.variant)[0],
        program=lambda wc: horovod_launch(wc.variant)[1],
        hosts_env=hosts_file_env(),
        extra=config["horovod"].get("extra_args", "--gloo"),
        experiment=config["experiment"],
        tracking=config["mlflow"].get("tracking_uri") or "",
        out_dir=lambda wc: f"results/train/{wc.variant}",
        env_bin=SNAKEMAKE_ENV_BIN,
        encoder_cache=lambda wc: " ".join(f"--encoder-cache {os.path.dirname(p)}" for p in encoder_cache_index(wc.variant)),
        phones=lambda wc: " ".join(f"--phones {p}" for p in phone_lexicon_input(wc.variant)),
    threads: lambda wc: variant_np(wc.variant)
    resources:
        mem_mb=6000,
        runtime=120,
        nodes=1,
        tasks=lambda wc: variant_np(wc.variant),
    conda:
        "../envs/training.yaml"
    shell:
        # JSON goes through files: horovodrun re-joins the command line and would mangle quoting.
        """
        command -v horovodrun >/dev/null || export PATH={params.env_bin}:"$PATH"
        mkdir -p {params.out_dir}
        printf '%s' {params.train_json} > {params.out_dir}/params.json
        printf '%s' {params.run_config} > {params.out_dir}/run_config.json
        printf '%s' {params.frontend} > {params.out_dir}/frontend.json
        {params.hosts_env} horovodrun {params.launch} {params.extra} \
          {params.program} --manifest {input.manifest} --plan {input.plan} --vocab {input.vocab} \
          --cmvn {input.cmvn} --noise {input.noise} --out-dir {params.out_dir} --experiment {params.experiment} \
          --tracking-uri={params.tracking} --log-dir logs/train/{wildcards.variant}.ranks --archive-stale-checkpoints \
          --params {params.out_dir}/params.json --run-config {params.out_dir}/run_config.json \
          --frontend {params.out_dir}/frontend.json {params.encoder_cache} {params.phones} > {log} 2>&1
        """


rule average_models:
    """A variant with `average_of: [a, b, ...]`: the mean of those variants' weights (weight averaging
    over the ends of training stages; asrflow.train.averaging), with `pretrained_share: [..]` mixed back
    towards the pretrained encoder by the share with the lowest dev CER (WiSE-FT; with
    `pretrained_share_blocks: [k, ..]` only the stem and lowest k blocks, k chosen too). No training: its model
    is evaluated, transcribed and reported like a trained one."""
    wildcard_constraints:
        variant=averaged_variants_pattern(),
    input:
        models=lambda wc: [f"results/train/{v}/model.pt" for v in averaged_parents(wc.variant)],
        summaries=lambda wc: [f"results/train/{v}/train_summary.json" for v in averaged_parents(wc.variant)],
        # the dev set the pretrained share is chosen on (only with pretrained_share)
        manifest=lambda wc: ["results/prep/truncated.jsonl"] if variant_params(wc.variant).get("pretrained_share") else [],
    output:
        model="results/train/{variant}/model.pt",
        summary="results/train/{variant}/train_summary.json",
    log:
        "logs/train/{variant}.log",
    benchmark:
        "benchmarks/train/{variant}.tsv"
    params:
        pretrained_share=lambda wc: variant_params(wc.variant).get("pretrained_share") or [],
        pretrained_share_blocks=lambda wc: variant_params(wc.variant).get("pretrained_share_blocks") or [],
        blank_penalties=config["evaluation"].get("blank_penalties", [0.0]),
        sample_rate=config["prep"]["sample_rate"],
        target_rms_dbfs=config["prep"]["target_rms_dbfs"],
        peak_ceiling_dbfs=config["prep"]["peak_ceiling_dbfs"],
    threads: 2
    resources:
        mem_mb=3000,
        runtime=30,
    conda:
        "../envs/training.yaml"
    script:
        f"{SCRIPTS}/average_models.py"
