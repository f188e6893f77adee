"""Snakemake job: a word n-gram LM (ARPA, modified Kneser-Ney) from the training transcripts only."""
from asrflow.evaluate.ngram_lm import build_lm
from asrflow.manifest import write_json
from asrflow.workflow import step_run

smk = snakemake  # noqa: F821
with step_run(smk, "language_model") as run:
    stats = build_lm(smk.input.manifest, smk.output.arpa, order=smk.params.order, split="train")
    write_json(smk.output.stats, stats.to_dict())
    run.metrics({"vocab_size": stats.vocab_size, "sentences": stats.sentences, "tokens": stats.tokens})
    run.artifact(smk.output.arpa, "lm")
