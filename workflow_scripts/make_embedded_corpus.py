"""Snakemake job: synthesize the embedded multi-dialect corpus (espeak-ng accents, flite, festival)."""
from pathlib import Path

from asrflow.corpus.synth import generate_corpus, resolve_preset
from asrflow.workflow import step_run

smk = snakemake  # noqa: F821
p = smk.params
with step_run(smk, "make_embedded_corpus") as run:
    preset = {**resolve_preset(p.preset), "defects": bool(p.defects)}
    summary = generate_corpus(Path(smk.output.manifest).parent, preset, seed=p.seed, jobs=smk.threads)
    run.metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    run.dataset(smk.output.manifest, "embedded_corpus", "source")
    run.artifact(smk.output.summary)
