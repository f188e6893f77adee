"""Snakemake job: duration-quantile buckets and the frame-budget batch plan for the training split."""
from asrflow.manifest import read_manifest, write_json
from asrflow.prep.bucketing import build_plan, plan_report
from asrflow.workflow import step_run

smk = snakemake  # noqa: F821
p = smk.params
with step_run(smk, "bucketing") as run:
    train = [u for u in read_manifest(smk.input.manifest) if u.split == "train"]
    plan = build_plan({u.id: u.duration for u in train}, {u.id: u.dialect for u in train},
                      p.num_buckets, p.frame_budget, p.max_batch_size)
    report = plan_report(plan, p.seed)
    write_json(smk.output.plan, plan.to_dict())
    write_json(smk.output.report, report)
    run.metrics({f"{kind}.{k}": v for kind, stats in report.items() for k, v in stats.items()})
    run.artifact(smk.output.plan)
    run.artifact(smk.output.report)
