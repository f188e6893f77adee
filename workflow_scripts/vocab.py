"""Snakemake job: the character vocabulary of the training transcripts (an artifact of data prep)."""
from asrflow.manifest import read_manifest
from asrflow.text import CharVocab
from asrflow.workflow import step_run

smk = snakemake  # noqa: F821
with step_run(smk, "vocab") as run:
    vocab = CharVocab.build(u.text for u in read_manifest(smk.input.manifest) if u.split == "train")
    vocab.save(smk.output.vocab)
    run.metrics({"vocab_size": len(vocab)})
    run.artifact(smk.output.vocab)
