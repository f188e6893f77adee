"""Snakemake job: a variant with `average_of`, the mean of its parent variants' weights (asrflow.train.averaging)."""
import json
from pathlib import Path

import torch

from asrflow.train.averaging import average_models, averaged_summary
from asrflow.workflow import step_run

smk = snakemake  # noqa: F821
with step_run(smk, "average_models") as run:
    averaged = average_models(list(smk.input.models))
    averaged["mlflow_run_id"] = run.run.info.run_id if run.run is not None else None
    out = Path(smk.output.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".pt.tmp")
    torch.save(averaged, tmp)
    tmp.replace(out)  # never a half-written model.pt for evaluate or transcribe to read
    summary = averaged_summary(smk.wildcards.variant, list(smk.input.summaries))
    Path(smk.output.summary).write_text(json.dumps(summary, indent=2))
    run.params({f"average_of.{i}": parent["path"] for i, parent in enumerate(averaged["averaged_from"])})
    run.params({f"average_of.{i}.sha256": parent["sha256"] for i, parent in enumerate(averaged["averaged_from"])})
    run.tags({f"average_of.{i}.parent_run_id": parent["mlflow_run_id"] or ""
              for i, parent in enumerate(averaged["averaged_from"])})
    run.metrics({"global_step": summary["global_step"], "train_seconds": summary["train_seconds"]})
    run.artifact(out, "model")
