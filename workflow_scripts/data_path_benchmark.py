"""Snakemake job: the data-path benchmark (asrflow.benchmark.data_path) on the prepared data."""
import json
import logging
import sys
from pathlib import Path

from asrflow.benchmark import data_path

smk = snakemake  # noqa: F821
logging.basicConfig(level=logging.INFO, filename=smk.log[0], format="%(asctime)s %(levelname)s %(message)s")
out = Path(smk.output.json)
params_path = out.parent / "data_path.params.json"
params_path.parent.mkdir(parents=True, exist_ok=True)
params_path.write_text(json.dumps(smk.params.train))
s = smk.params.settings
argv = ["--manifest", smk.input.manifest, "--plan", smk.input.plan, "--vocab", smk.input.vocab, "--cmvn",
        smk.input.cmvn, "--noise", smk.input.noise, "--params", str(params_path), "--out", str(out),
        "--md", smk.output.md, "--steps", str(s.get("steps", 40)), "--scale", str(s.get("scale", 10)),
        "--ranks", str(s.get("ranks", 2)),
        "--startup-utterances", str(s.get("startup_utterances", data_path.LIBRISPEECH_UTTERANCES))]
if smk.input.phones:
    argv += ["--phones", smk.input.phones[0]]
if s.get("lhotse_large"):
    argv.append("--lhotse-large")
with open(smk.log[0], "a") as log_file:
    sys.stdout = log_file
    data_path.main(argv)
