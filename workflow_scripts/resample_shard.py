"""Snakemake job: resample one shard of the corpus to 16 kHz mono with loudness normalization."""
from pathlib import Path

from asrflow.prep.resample import ResampleSettings, run_resample_shard
from asrflow.workflow import step_run

smk = snakemake  # noqa: F821 (injected by Snakemake)
p = smk.params
settings = ResampleSettings(sample_rate=p.sample_rate, target_rms_dbfs=p.target_rms_dbfs,
                            peak_ceiling_dbfs=p.peak_ceiling_dbfs, silence_dbfs=p.silence_dbfs,
                            min_dynamic_range_db=p.min_dynamic_range_db,
                            clip_fraction=p.clip_fraction, min_duration=p.min_duration)
with step_run(smk, "resample") as run:
    stats = run_resample_shard(Path(smk.input.manifest), int(smk.wildcards.shard), p.num_shards,
                               Path(smk.output.manifest), Path(smk.output.quarantine), Path(smk.output.wavs), settings)
    run.metrics(stats)
    run.artifact(smk.output.quarantine, "quarantine")
