# Shared helpers for the rule files.

NOISE_ENVS = config["noise"]["train_environments"] + config["noise"]["heldout_environments"]
SHARDS = list(range(config["prep"]["shards"]))
SCRIPTS = "../workflow_scripts"


def data_prep_outputs():
    return [
        "results/prep/buckets.json",
        "results/prep/vocab.json",
        "results/noise/manifest.jsonl",
        "results/prep/data_report.json",
    ]
