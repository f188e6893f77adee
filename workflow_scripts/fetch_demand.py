"""Snakemake job: one DEMAND environment's 16 kHz zip, md5-verified (Zenodo or a mirror), safely extracted."""
from pathlib import Path

from asrflow.data.demand import archive_name, download_environment, md5_of, parse_md5sums, safe_extract
from asrflow.workflow import step_run

smk = snakemake  # noqa: F821
out = Path(smk.output.archive)
target = Path(smk.output.env_dir)
env = smk.wildcards.env
md5 = None
if smk.params.synthetic:
    # The synthetic set shares DEMAND's names but not its bytes: its own MD5SUMS is the pin, said
    # explicitly, since the downloader rightly never lets a mirror override a pinned Zenodo md5.
    md5 = parse_md5sums((Path(smk.params.mirror) / "MD5SUMS").read_text())[archive_name(env)]
with step_run(smk, "fetch_demand") as run:
    path = download_environment(env, out.parent, mirror=smk.params.mirror, md5=md5)
    if path != out:
        raise RuntimeError(f"downloader wrote {path}, the rule expects {out}")
    files = safe_extract(path, target.parent, members_prefix=f"{env}/")
    if not target.is_dir():
        raise RuntimeError(f"{path} holds no {env}/ folder")
    run.params({"source": smk.params.mirror or "zenodo", "md5": md5_of(path)})
    run.metrics({"bytes": path.stat().st_size, "files": len(files)})
