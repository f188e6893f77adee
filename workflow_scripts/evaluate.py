"""Snakemake job: WER/CER of one trained model, clean and at fixed SNRs, greedy and with the LM."""
from pathlib import Path

from asrflow.evaluate.adaptation import settings_grid
from asrflow.evaluate.run import EvalSettings, evaluate
from asrflow.loudness import Frontend
from asrflow.workflow import step_run

smk = snakemake  # noqa: F821
p = smk.params
settings = EvalSettings(snr_levels=tuple(p.snr_levels), beam_size=p.beam_size, beam_size_token=p.beam_size_token,
                        lm_weights=tuple(p.lm_weights), word_scores=tuple(p.word_scores),
                        dev_tune_utterances=p.dev_tune_utterances, lm_conditions=tuple(str(c) for c in p.lm_conditions),
                        seed=p.seed, threads=smk.threads, lexicon=p.lexicon, cmudict_path=p.cmudict_path,
                        beam_sizes=tuple(p.beam_sizes) if p.beam_sizes else None,
                        blank_penalties=tuple(p.blank_penalties), adaptation=settings_grid(p.test_time_adaptation),
                        frontend=Frontend(sample_rate=p.sample_rate, target_rms_dbfs=p.target_rms_dbfs,
                                          peak_ceiling_dbfs=p.peak_ceiling_dbfs))
out_dir = Path(smk.output.metrics).parent
with step_run(smk, "evaluate") as run:
    metrics = evaluate(Path(smk.input.model), Path(smk.input.manifest), Path(smk.input.noise),
                       Path(smk.input.lm), out_dir, settings)
    flat = {f"{dec}.{cond}.{k}": v for dec, conds in metrics["by_condition"].items()
            for cond, vals in conds.items() for k, v in vals.items() if k in ("wer", "cer")}
    run.metrics({**flat, **{f"headline.{k}": v for k, v in metrics["headline"].items()}})
    run.artifact(out_dir)
