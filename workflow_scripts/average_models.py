"""Snakemake job: a variant with `average_of`, the mean of its parent variants' weights, and with
`pretrained_share`, mixed back towards the pretrained encoder by the share with the lowest dev CER
(asrflow.train.averaging)."""
import json
import logging
import tempfile
from pathlib import Path

import torch

from asrflow.evaluate.run import dev_greedy_tuning
from asrflow.loudness import Frontend
from asrflow.train.averaging import average_models, averaged_summary, choose_pretrained_share
from asrflow.workflow import step_run

smk = snakemake  # noqa: F821
p = smk.params
shares = [float(x) for x in p.pretrained_share]
blocks = [int(k) for k in p.pretrained_share_blocks] or None  # None: the whole encoder
frontend = Frontend(sample_rate=p.sample_rate, target_rms_dbfs=p.target_rms_dbfs, peak_ceiling_dbfs=p.peak_ceiling_dbfs)
torch.set_num_threads(max(1, smk.threads))
out = Path(smk.output.model)
out.parent.mkdir(parents=True, exist_ok=True)


def dev_score(candidate: dict) -> dict:
    """Greedy dev CER of a candidate mix (blank penalty chosen on dev, as evaluation does)."""
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        path = Path(tmp) / "model.pt"
        torch.save(candidate, path)
        tuning = dev_greedy_tuning(path, Path(smk.input.manifest[0]), p.blank_penalties, frontend)
    logging.getLogger("asrflow.average_models").info(
        "dev CER %.4f at blank penalty %s; by speaker group %s", tuning["cer"], tuning["blank_penalty"], tuning["by_group"])
    return {"cer": tuning["cer"], "blank_penalty": tuning["blank_penalty"], "by_group": tuning["by_group"]}


with step_run(smk, "average_models") as run:
    averaged = average_models(list(smk.input.models), min_parents=1 if shares else 2)
    grid = []
    if shares:
        averaged, grid = choose_pretrained_share(averaged, shares, dev_score, blocks)
    averaged["mlflow_run_id"] = run.run.info.run_id if run.run is not None else None
    tmp = out.with_suffix(".pt.tmp")
    torch.save(averaged, tmp)
    tmp.replace(out)  # never a half-written model.pt for evaluate or transcribe to read
    summary = averaged_summary(smk.wildcards.variant, list(smk.input.summaries))
    if grid:
        summary["pretrained_share"] = averaged["pretrained_share"]
    Path(smk.output.summary).write_text(json.dumps(summary, indent=2))
    run.params({f"average_of.{i}": parent["path"] for i, parent in enumerate(averaged["averaged_from"])})
    run.params({f"average_of.{i}.sha256": parent["sha256"] for i, parent in enumerate(averaged["averaged_from"])})
    run.tags({f"average_of.{i}.parent_run_id": parent["mlflow_run_id"] or ""
              for i, parent in enumerate(averaged["averaged_from"])})
    if grid:
        chosen = averaged["pretrained_share"]
        run.params({"pretrained_share.grid": ",".join(f"{share:g}" for share in sorted(set(shares))),
                    "pretrained_share.blocks_grid": ",".join(sorted({str(row["blocks"]) for row in grid}, key=int)),
                    "pretrained_share.chosen": chosen["chosen"], "pretrained_share.blocks": chosen["blocks"]})
        run.metrics({f"pretrained_share.{row['share']:g}.blocks{row['blocks']}.dev_cer": row["cer"] for row in grid})
    run.metrics({"global_step": summary["global_step"], "train_seconds": summary["train_seconds"]})
    run.artifact(out, "model")
