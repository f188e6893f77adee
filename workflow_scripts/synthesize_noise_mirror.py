"""Snakemake job: a DEMAND-like noise set made with sox, published as a local mirror (zips + MD5SUMS)."""
import tempfile
from pathlib import Path

from asrflow.corpus.noise import make_demand_zip, synthesize_demand_like
from asrflow.data.demand import archive_name, md5_of
from asrflow.workflow import step_run

smk = snakemake  # noqa: F821
p = smk.params
mirror = Path(smk.output.mirror)
with step_run(smk, "synthesize_noise") as run, tempfile.TemporaryDirectory() as tmp:
    levels = synthesize_demand_like(tmp, list(p.environments), p.seconds, p.channels, p.seed)
    sums = []
    for env in p.environments:
        archive = make_demand_zip(Path(tmp) / env, mirror / archive_name(env))
        sums.append(f"{md5_of(archive)}  {archive.name}\n")
    (mirror / "MD5SUMS").write_text("".join(sums))
    run.metrics({f"rms_dbfs.{env}.{ch}": v for env, chans in levels.items() for ch, v in chans.items()})
    run.artifact(mirror / "MD5SUMS")
