"""Snakemake job: every run variant's greedy CER on the held-out voice set, with bootstrap intervals and
each variant's difference from the first, paired over the same utterances."""
from pathlib import Path

from asrflow.evaluate.held_out_voice import score_models, write_report
from asrflow.manifest import read_manifest
from asrflow.workflow import step_run

smk = snakemake  # noqa: F821
utts = read_manifest(smk.input.set)
models = [(variant, Path(model), Path(decoding))
          for variant, model, decoding in zip(smk.params.variants, smk.input.models, smk.input.decodings)]
with step_run(smk, "held_out_voice") as run:
    rep, scores = score_models(models, utts, smk.threads)
    write_report(Path(smk.output.report).parent, rep, scores, utts)
    base = rep["models"][0]["model"]
    for row in rep["models"]:
        run.metrics({f"{row['model']}.cer": row["cer"], f"{row['model']}.cer_95_low": row["cer_95"][0],
                     f"{row['model']}.cer_95_high": row["cer_95"][1],
                     f"{row['model']}.minus_{base}": row[f"minus_{base}"]})
    run.artifact(smk.output.table)
    run.artifact(smk.output.report)
