"""Snakemake job: gather the resampled shards and their quarantine lists, sorted by id."""
from asrflow.manifest import read_manifest, read_records, write_manifest
from asrflow.workflow import step_run

smk = snakemake  # noqa: F821
with step_run(smk, "merge_resampled") as run:
    utts = sorted((u for m in smk.input.manifests for u in read_manifest(m)), key=lambda u: u.id)
    bad = sorted((r for m in smk.input.quarantines for r in read_records(m)), key=lambda r: r["id"])
    write_manifest(smk.output.manifest, utts)
    write_manifest(smk.output.quarantine, bad, relative_audio=False)
    run.metrics({"utterances": len(utts), "quarantined": len(bad), "hours": sum(u.duration for u in utts) / 3600})
    run.dataset(smk.output.manifest, "resampled", "prep")
    run.artifact(smk.output.quarantine, "quarantine")
