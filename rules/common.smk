# Shared helpers for the rule files.

NOISE_ENVS = config["noise"]["train_environments"] + config["noise"]["heldout_environments"]
SHARDS = list(range(config["prep"]["shards"]))
SCRIPTS = "../workflow_scripts"  # script: paths are relative to this rules/ folder
WORKFLOW_SCRIPTS = os.path.join(workflow.basedir, "workflow_scripts")  # for shell: rules


def data_prep_outputs():
    return [
        "results/prep/buckets.json",
        "results/prep/vocab.json",
        "results/noise/manifest.jsonl",
        "results/prep/data_report.json",
    ]


def trained_models():
    return expand("results/train/{variant}/model.pt", variant=config["training"]["run_variants"])
