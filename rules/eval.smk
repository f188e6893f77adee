# Language model, evaluation of each trained variant, and the ablation table.


# The LM's text: the embedded corpus's sentence sources (or the training transcripts of a real corpus)
# plus evaluation.lm_text, with every dev/test sentence of the manifest excluded.
rule language_model:
    input:
        manifest="results/prep/truncated.jsonl",
        user_text=[config["evaluation"]["lm_text"]] if config["evaluation"].get("lm_text") else [],
    output:
        arpa="results/lm/words.arpa",
        stats="results/lm/stats.json",
    log:
        "logs/lm/language_model.log",
    benchmark:
        "benchmarks/lm/language_model.tsv"
    params:
        order=config["evaluation"]["lm_order"],
        corpus_source=config["corpus"]["source"],
        lm_text=config["evaluation"].get("lm_text"),
        definitions=config["evaluation"].get("lm_wordnet_definitions", False),
    threads: 1
    resources:
        mem_mb=3000,
        runtime=10,
    conda:
        "../envs/evaluation.yaml"
    script:
        f"{SCRIPTS}/language_model.py"


rule evaluate:
    input:
        model="results/train/{variant}/model.pt",
        manifest="results/prep/truncated.jsonl",
        noise="results/noise/manifest.jsonl",
        lm="results/lm/words.arpa",
    output:
        metrics="results/eval/{variant}/metrics.json",
        hyps="results/eval/{variant}/hypotheses.jsonl",
        # what it decoded with (dev-tuned blank penalty, LM search): asrflow-transcribe --decoding
        decoding="results/eval/{variant}/decoding.json",
        by_condition=report("results/eval/{variant}/by_condition.csv", category="Evaluation",
                            subcategory="{variant}", labels={"table": "WER/CER by SNR"}),
        per_dialect=report("results/eval/{variant}/per_dialect.csv", category="Evaluation",
                           subcategory="{variant}", labels={"table": "per dialect"}),
        per_group=report("results/eval/{variant}/per_speaker_group.csv", category="Evaluation",
                         subcategory="{variant}", labels={"table": "per speaker group"}),
        wer_vs_snr=report("results/eval/{variant}/wer_vs_snr.png", category="Evaluation",
                          subcategory="{variant}", labels={"figure": "WER vs SNR"}),
        dialect_plot=report("results/eval/{variant}/per_dialect.png", category="Evaluation",
                            subcategory="{variant}", labels={"figure": "per-dialect WER"}),
    log:
        "logs/eval/{variant}.log",
    benchmark:
        "benchmarks/eval/{variant}.tsv"
    params:
        snr_levels=config["evaluation"]["snr_levels"],
        beam_size=config["evaluation"]["beam_size"],
        beam_size_token=config["evaluation"]["beam_size_token"],
        lm_weights=config["evaluation"]["lm_weights"],
        word_scores=config["evaluation"]["word_scores"],
        dev_tune_utterances=config["evaluation"]["dev_tune_utterances"],
        lm_conditions=config["evaluation"]["lm_conditions"],
        lexicon=config["evaluation"].get("lexicon", "none"),
        cmudict_path=config["evaluation"].get("cmudict_path"),
        beam_sizes=config["evaluation"].get("beam_sizes"),
        blank_penalties=config["evaluation"].get("blank_penalties", [0.0]),
        test_time_adaptation=config["evaluation"].get("test_time_adaptation"),
        # the front end of models exported without a "frontend" entry: the prep settings
        sample_rate=config["prep"]["sample_rate"],
        target_rms_dbfs=config["prep"]["target_rms_dbfs"],
        peak_ceiling_dbfs=config["prep"]["peak_ceiling_dbfs"],
        seed=config["seed"],
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/evaluation.yaml"
    script:
        f"{SCRIPTS}/evaluate.py"


rule ablation_table:
    input:
        metrics=expand("results/eval/{variant}/metrics.json", variant=config["training"]["run_variants"]),
        summaries=expand("results/train/{variant}/train_summary.json", variant=config["training"]["run_variants"]),
    output:
        csv=report("results/report/ablations.csv", category="Ablations"),
        md="results/report/ablations.md",
        curves=report("results/report/training_curves.png", category="Training", labels={"figure": "dev loss and CER"}),
    log:
        "logs/report/ablation_table.log",
    benchmark:
        "benchmarks/report/ablation_table.tsv"
    params:
        variants=config["training"]["run_variants"],
        target_dev_cer=config["evaluation"]["target_dev_cer"],
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    conda:
        "../envs/tracking.yaml"
    script:
        f"{SCRIPTS}/ablation_table.py"


# The held-out voice family on many more utterances than test's ~33 (whose CER is known to about +-2.5
# points): evaluation.held_out_voice_utterances of them, embedded corpus only (asrflow.evaluate.held_out_voice).
if held_out_voice_enabled(config):

    rule held_out_voice_set:
        input:
            corpus="results/corpus/manifest.jsonl",
        output:
            manifest="results/held_out_voice/prep.jsonl",
            quarantined="results/held_out_voice/quarantined.json",
        log:
            "logs/eval/held_out_voice_set.log",
        benchmark:
            "benchmarks/eval/held_out_voice_set.tsv"
        params:
            utterances=config["evaluation"]["held_out_voice_utterances"],
            preset=embedded_corpus_preset(config["corpus"]),
            seed=config["seed"],
            sample_rate=config["prep"]["sample_rate"],
            target_rms_dbfs=config["prep"]["target_rms_dbfs"],
            peak_ceiling_dbfs=config["prep"]["peak_ceiling_dbfs"],
            silence_dbfs=config["prep"]["silence_dbfs"],
            min_dynamic_range_db=config["prep"]["min_dynamic_range_db"],
            clip_fraction=config["prep"]["clip_fraction"],
            min_duration=config["prep"]["min_duration"],
        threads: 2
        resources:
            mem_mb=2000,
            runtime=20,
        conda:
            "../envs/audio.yaml"
        script:
            f"{SCRIPTS}/held_out_voice_set.py"

    rule held_out_voice:
        input:
            set="results/held_out_voice/prep.jsonl",
            models=expand("results/train/{variant}/model.pt", variant=config["training"]["run_variants"]),
            # the blank penalty each evaluation chose on dev
            decodings=expand("results/eval/{variant}/decoding.json", variant=config["training"]["run_variants"]),
        output:
            report="results/held_out_voice/report.json",
            table=report("results/held_out_voice/report.md", category="Evaluation",
                         labels={"table": "held-out voice, many utterances"}),
            hyps="results/held_out_voice/hypotheses.jsonl",
        log:
            "logs/eval/held_out_voice.log",
        benchmark:
            "benchmarks/eval/held_out_voice.tsv"
        params:
            variants=config["training"]["run_variants"],
        threads: 2
        resources:
            mem_mb=4000,
            runtime=30,
        conda:
            "../envs/evaluation.yaml"
        script:
            f"{SCRIPTS}/held_out_voice.py"
