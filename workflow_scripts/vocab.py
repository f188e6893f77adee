"""Snakemake job: the output units (characters or BPE) of the training transcripts, an artifact of data prep."""
from asrflow.manifest import read_manifest
from asrflow.text import build_vocab
from asrflow.workflow import step_run

smk = snakemake  # noqa: F821
with step_run(smk, "vocab") as run:
    texts = [u.text for u in read_manifest(smk.input.manifest) if u.split == "train"]
    vocab = build_vocab(texts, smk.params.units, smk.params.bpe_vocab_size)
    vocab.save(smk.output.vocab)
    run.params({"units": vocab.units, "bpe_vocab_size": smk.params.bpe_vocab_size})
    run.metrics({"vocab_size": len(vocab)})
    run.artifact(smk.output.vocab)
