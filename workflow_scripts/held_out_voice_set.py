"""Snakemake job: many more utterances of the held-out voice family than test has, made as the corpus makes
them (sentences the corpus never speaks, speakers dev lacks) and prepared as prep prepares them."""
from pathlib import Path

from asrflow.evaluate.held_out_voice import make_held_out_voice_set
from asrflow.prep.resample import ResampleSettings
from asrflow.workflow import step_run

smk = snakemake  # noqa: F821
p = smk.params
settings = ResampleSettings(sample_rate=p.sample_rate, target_rms_dbfs=p.target_rms_dbfs,
                            peak_ceiling_dbfs=p.peak_ceiling_dbfs, silence_dbfs=p.silence_dbfs,
                            min_dynamic_range_db=p.min_dynamic_range_db, clip_fraction=p.clip_fraction,
                            min_duration=p.min_duration)
with step_run(smk, "held_out_voice_set") as run:
    utts, quarantined = make_held_out_voice_set(Path(smk.output.manifest).parent, [Path(smk.input.corpus)],
                                                p.utterances, p.seed, p.preset, settings, jobs=smk.threads)
    run.metrics({"utterances": len(utts), "quarantined": len(quarantined),
                 "hours": sum(u.duration for u in utts) / 3600})
