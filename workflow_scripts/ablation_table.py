"""Snakemake job: the training variants side by side (clean and 5 dB WER, dialect spread, time to a dev CER)."""
from asrflow.evaluate.ablation import ablation_rows, plot_training_curves, write_ablation_table
from asrflow.workflow import step_run

smk = snakemake  # noqa: F821
with step_run(smk, "ablation_table") as run:
    rows = ablation_rows(smk.params.variants, smk.input.metrics, smk.input.summaries, smk.params.target_dev_cer)
    write_ablation_table(rows, smk.output.csv, smk.output.md, smk.params.target_dev_cer)
    plot_training_curves(smk.params.variants, smk.input.summaries, smk.output.curves)
    for row in rows:
        run.metrics({f"{row['variant']}.{k}": v for k, v in row.items() if isinstance(v, (int, float))})
    run.artifact(smk.output.md)
    run.artifact(smk.output.curves)
