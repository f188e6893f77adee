# The input corpus: the embedded synthetic one, or an importer for a real corpus layout.

if config["corpus"]["source"] == "embedded":

    rule make_embedded_corpus:
        output:
            manifest="results/corpus/manifest.jsonl",
            summary="results/corpus/summary.json",
        log:
            "logs/corpus/make_embedded_corpus.log",
        benchmark:
            "benchmarks/corpus/make_embedded_corpus.tsv"
        params:
            # a preset name, or overrides on top of it when corpus.extra_train or corpus.held_out_dev asks for
            # more utterances (a plain name otherwise, so existing corpora are not planned again)
            preset=embedded_corpus_preset(config["corpus"]),
            defects=config["corpus"].get("defects", False),
            seed=config["seed"],
        threads: 2
        resources:
            mem_mb=2000,
            runtime=30,
        conda:
            "../envs/audio.yaml"
        script:
            f"{SCRIPTS}/make_embedded_corpus.py"

else:

    rule import_corpus:
        output:
            manifest="results/corpus/manifest.jsonl",
            summary="results/corpus/summary.json",
            rejects="results/corpus/rejects.jsonl",
        log:
            "logs/corpus/import_corpus.log",
        benchmark:
            "benchmarks/corpus/import_corpus.tsv"
        params:
            kind=config["corpus"]["source"],
            path=config["corpus"].get("path"),
            split=config["corpus"].get("split"),
        threads: 1
        resources:
            mem_mb=2000,
            runtime=60,
        conda:
            "../envs/audio.yaml"
        script:
            f"{SCRIPTS}/import_corpus.py"
