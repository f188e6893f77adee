"""Snakemake job: global CMVN statistics of the training set's log-mel features."""
import torch

from asrflow.manifest import read_manifest
from asrflow.train.data import BatchReader, UtteranceIndex
from asrflow.train.features import LogMel, compute_cmvn_stats
from asrflow.text import CharVocab
from asrflow.workflow import step_run

smk = snakemake  # noqa: F821
torch.set_num_threads(smk.threads)
with step_run(smk, "cmvn") as run:
    train = sorted((u for u in read_manifest(smk.input.manifest) if u.split == "train"), key=lambda u: u.id)
    reader = BatchReader(CharVocab.load(smk.input.vocab), UtteranceIndex(train))  # one batch in memory at a time
    logmel = LogMel(smk.params.n_mels)
    ids = [u.id for u in train]
    batches = (reader[ids[i:i + 32]] for i in range(0, len(ids), 32))
    cmvn = compute_cmvn_stats(logmel(b.waves, b.wave_lens) for b in batches)
    cmvn.save(smk.output.cmvn)
    run.metrics({"frames": float(cmvn.count), "mean_of_means": float(cmvn.mean.mean())})
    run.artifact(smk.output.cmvn)
