"""Snakemake job: a frozen pretrained encoder's outputs for one training variant, cached once."""
import json
from pathlib import Path

import torch

from asrflow.train.pretrained.encoder_cache import build_cache
from asrflow.workflow import step_run

smk = snakemake  # noqa: F821
torch.set_num_threads(smk.threads)
with step_run(smk, "encoder_cache") as run:
    meta = build_cache(smk.input.manifest, smk.input.plan, smk.input.vocab, json.loads(smk.params.train_json),
                       Path(smk.output.index).parent)
    run.metrics({"utterances": float(len(meta["utterances"])), "dev_utterances": float(meta["dev_utterances"]),
                 "frames": float(meta["n_frames"]), "d_model": float(meta["d_model"])})
