"""Snakemake job: one JSON report of the whole data preparation, also logged to MLflow."""
from asrflow.manifest import write_json
from asrflow.prep.report import build_data_report
from asrflow.workflow import step_run

smk = snakemake  # noqa: F821
i = smk.input
with step_run(smk, "data_report") as run:
    report = build_data_report(i.corpus, i.quarantine, i.truncation, i.bucketing, i.manifest, i.noise)
    write_json(smk.output.report, report)
    run.metrics({"quarantined": report["quarantine"]["count"], "noise_recordings": report["noise"]["recordings"],
                 **{f"hours.{s}": sum(d["hours"] for d in t.values()) for s, t in report["prepared"].items()}})
    run.artifact(smk.output.report)
