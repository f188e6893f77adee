# asrflow: robust CTC speech recognition, end to end. `snakemake --cores N` runs the whole DAG.
import os
import uuid
from snakemake.utils import min_version, validate

min_version("9.0")

# Absolute so the workflow runs from any working directory (snakemake -d DIR), as the tests do.
report: "report/workflow.rst"


configfile: os.path.join(workflow.basedir, "config", "config.yaml")
validate(config, os.path.join(workflow.basedir, "config", "schema.yaml"))

# Links the MLflow runs of one invocation. Passed through the environment, never as a rule param,
# so it cannot trigger reruns.
os.environ.setdefault("ASRFLOW_INVOCATION", uuid.uuid4().hex[:12])
# What a job's MLflow run does when the tracking server does not answer at its start (asrflow.tracking).
os.environ.update(ASRFLOW_MLFLOW_ON_UNREACHABLE=config["mlflow"].get("on_unreachable", "fail"))

# Jobs import the asrflow package from this checkout whatever their environment (venv, --sdm conda,
# container), so the code that runs is the code of this commit.
os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [os.path.join(workflow.basedir, "src"), os.getenv("PYTHONPATH")])))

# --sdm apptainer runs every job in this image (build it from the Dockerfile and push it somewhere
# the cluster can pull from, then set `container:` in the config).
if config.get("container"):

    container: config["container"]


onstart:
    # Before any job runs: an http(s) tracking server that does not answer stops the workflow here, in a
    # few seconds, instead of failing every job after MLflow's retries (on_unreachable: local goes on).
    import sys
    from snakemake.exceptions import WorkflowError
    from snakemake.logging import logger

    sys.path.insert(0, os.path.join(workflow.basedir, "src"))
    from asrflow.tracking import TrackingUnreachable, check_at_start

    try:
        warning = check_at_start(config["mlflow"].get("tracking_uri"), config["mlflow"].get("on_unreachable", "fail"))
    except TrackingUnreachable as e:
        raise WorkflowError(str(e)) from None
    if warning:
        logger.warning(warning)


include: "rules/common.smk"
include: "rules/corpus.smk"
include: "rules/noise.smk"
include: "rules/prep.smk"
include: "rules/train.smk"
include: "rules/eval.smk"
include: "rules/benchmark.smk"


rule all:
    default_target: True
    input:
        data_prep_outputs(),
        trained_models(),
        evaluations(),
        held_out_voice_outputs(),
        "results/report/ablations.md",
        "results/benchmark/benchmark.md",
