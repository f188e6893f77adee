"""Snakemake job: apply the max-duration cap, splitting only at known sentence boundaries."""
from pathlib import Path

from asrflow.manifest import read_manifest, write_json, write_manifest
from asrflow.prep.truncate import TruncateSettings, summarize, truncate
from asrflow.workflow import step_run

smk = snakemake  # noqa: F821
settings = TruncateSettings(max_duration=smk.params.max_duration, splits=tuple(smk.params.splits))
with step_run(smk, "truncate") as run:
    Path(smk.output.wavs).mkdir(parents=True, exist_ok=True)
    kept, report = truncate(read_manifest(smk.input.manifest), settings, Path(smk.output.wavs))
    write_manifest(smk.output.manifest, kept)
    write_manifest(smk.output.report, report, relative_audio=False)
    summary = summarize(report)
    write_json(smk.output.summary, summary)
    run.metrics(summary)
    run.dataset(smk.output.manifest, "truncated", "prep")
    run.artifact(smk.output.report, "truncation")
