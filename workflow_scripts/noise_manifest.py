"""Snakemake job: the noise manifest, environments split into training and held-out (evaluation) sets."""
from pathlib import Path

from asrflow.data.demand import build_noise_manifest, write_noise_manifest
from asrflow.workflow import step_run

smk = snakemake  # noqa: F821
p = smk.params
with step_run(smk, "noise_manifest") as run:
    env_dirs = {Path(d).name: d for d in smk.input.env_dirs}
    records = build_noise_manifest(env_dirs, p.train, p.heldout, p.channels)
    write_noise_manifest(smk.output.manifest, records)
    run.metrics({"recordings": len(records), "minutes": sum(r["duration"] for r in records) / 60})
    run.dataset(smk.output.manifest, "noise", "noise")
