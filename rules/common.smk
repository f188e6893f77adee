# Shared helpers for the rule files.
import json
import re
import shlex
import sys

NOISE_ENVS = config["noise"]["train_environments"] + config["noise"]["heldout_environments"]
SHARDS = list(range(config["prep"]["shards"]))
SCRIPTS = "../workflow_scripts"  # script: paths are relative to this rules/ folder
WORKFLOW_SCRIPTS = os.path.join(workflow.basedir, "workflow_scripts")  # for shell: rules
# The environment Snakemake runs from; shell: rules fall back to its tools (horovodrun, python) when
# the job's own environment lacks them, e.g. `.venv/bin/snakemake` from a shell without the venv.
SNAKEMAKE_ENV_BIN = shlex.quote(os.path.dirname(sys.executable))

# Seconds-long steps (and the downloads, which need the login node's internet) run where Snakemake runs,
# not as cluster jobs.
localrules: synthesize_noise_mirror, fetch_demand, merge_resampled, vocab, phone_lexicon, data_report, noise_manifest


def data_prep_outputs():
    return [
        "results/prep/buckets.json",
        "results/prep/vocab.json",
        "results/noise/manifest.jsonl",
        "results/prep/data_report.json",
    ]


def embedded_corpus_preset(corpus):
    """The embedded generator's preset: its name, or a dict of overrides on top of it where the config asks
    for more utterances than the preset plans (corpus.extra_train, corpus.held_out_dev, corpus.extra_voice_train)."""
    name = corpus.get("preset", "default")
    overrides = {key: corpus[option] for option, key in (("extra_train", "n_train_extra"), ("held_out_dev", "n_dev_held_out"),
                                                        ("extra_voice_train", "n_extra_voice_train"))
                 if corpus.get(option)}
    if corpus.get("extra_voice_train"):
        overrides["extra_voices"] = list(corpus.get("extra_voices") or [])
    return {"base": name, **overrides} if overrides else name


def held_out_voice_enabled(config):
    """The held-out voice set needs the embedded generator (it synthesizes the family) and a count."""
    return config["corpus"]["source"] == "embedded" and config["evaluation"].get("held_out_voice_utterances", 0) > 0


def held_out_voice_outputs():
    return ["results/held_out_voice/report.md"] if held_out_voice_enabled(config) else []


def evaluations():
    return expand("results/eval/{variant}/metrics.json", variant=config["training"]["run_variants"])


def trained_models():
    return expand("results/train/{variant}/model.pt", variant=config["training"]["run_variants"])


# -- noise
SYNTHETIC_MIRROR = "resources/demand_synthetic"


def demand_mirror(wildcards=None):
    src = config["noise"]["source"]
    if src == "synthetic":
        return SYNTHETIC_MIRROR
    if src == "mirror":
        return config["noise"]["mirror"]
    return None


# -- training
def variant_params(variant):
    """The base recipe with the variant's overrides (one level deep merge for dict options)."""
    if variant not in config["training"]["variants"]:
        raise ValueError(f"training variant {variant!r} is not defined under training.variants")
    merged = json.loads(json.dumps(config["training"]["base"]))
    for key, value in config["training"]["variants"][variant].items():
        if key == "model" and value.get("name", merged["model"].get("name")) != merged["model"].get("name"):
            merged[key] = value  # another kind of model: the base model's options do not apply to it
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    merged["variant"] = variant
    merged.setdefault("seed", config["seed"])
    return merged


LAUNCH_KEYS = ("np", "hosts")  # per-variant process layout; not training params


def variant_train_params(variant):
    return {k: v for k, v in variant_params(variant).items() if k not in LAUNCH_KEYS}


def variant_np(variant):
    return int(variant_params(variant).get("np", config["horovod"]["np"]))


def variant_hosts(variant):
    """The variant's host list; a variant that only changes the process count runs on this machine."""
    v = variant_params(variant)
    if "hosts" in v:
        return v["hosts"]
    return f"localhost:{v['np']}" if "np" in v else config["horovod"]["hosts"]

def horovod_launch(variant):
    """horovodrun's process arguments and the per-rank program: static, or elastic with host discovery."""
    np_ = variant_np(variant)
    elastic = config["horovod"].get("elastic", {})
    if elastic.get("enabled"):
        max_np = elastic.get("max_np") or np_
        launch = (f"-np {np_} --min-np {elastic.get('min_np', 1)} --max-np {max_np} "
                  f"--host-discovery-script {WORKFLOW_SCRIPTS}/discover_hosts.sh")
        program = f"python -m asrflow.train.elastic --commit-every {elastic.get('commit_every_steps', 20)}"
        return launch, program
    launch = f"$(python {WORKFLOW_SCRIPTS}/horovod_hosts.py {np_} {variant_hosts(variant)})"
    return launch, f"python {WORKFLOW_SCRIPTS}/train.py"


def hosts_file_env():
    hosts_file = config["horovod"].get("elastic", {}).get("hosts_file")
    return f"ASRFLOW_HOSTS_FILE={shlex.quote(os.path.abspath(hosts_file))}" if hosts_file else ""


def is_averaged(variant):
    return bool((config["training"]["variants"].get(variant) or {}).get("average_of"))


def first_trained_variant():
    """The first of run_variants that is trained (an averaged one has no recipe to time: then its first parent)."""
    run = config["training"]["run_variants"]
    return next((v for v in run if not is_averaged(v)), None) or averaged_parents(run[0])[0]


def benchmark_variant():
    """The variant whose recipe the benchmark measures: `benchmark.variant`, default the first trained one."""
    return config.get("benchmark", {}).get("variant") or first_trained_variant()


def benchmark_models():
    """(variant, recipe) of each model the per-model table compares: `benchmark.models`, default every trained
    variant. Only the recipes are read (a fresh model per row), so the rule needs no trained model."""
    # an averaged variant has no recipe of its own to time: its parents' rows are its cost
    variants = config.get("benchmark", {}).get("models") or [
        v for v in config["training"]["run_variants"] if not is_averaged(v)]
    return [{"label": v, "params": variant_train_params(v),
             "encoder_cache": next((os.path.dirname(p) for p in encoder_cache_index(v)), None)} for v in variants]


def encoder_cache_index(variant):
    """The frozen-encoder cache a variant with ``encoder_cache: true`` trains from (rule encoder_cache)."""
    return [f"results/train/{variant}/encoder_cache/index.json"] if variant_params(variant).get("encoder_cache") else []


def phone_lexicon_input(variant):
    """The phone lexicon (rule phone_lexicon) a variant with an auxiliary phone CTC head trains with."""
    return ["results/prep/phones.json"] if variant_params(variant).get("model", {}).get("phone_ctc_layer") else []


def averaged_parents(variant):
    """The variants whose weights an `average_of` variant averages (each must be defined, and not itself
    the variant)."""
    recipe = config["training"]["variants"][variant]
    parents = recipe.get("average_of") or []
    unknown = [p for p in parents if p not in config["training"]["variants"] or p == variant]
    if unknown:
        raise ValueError(f"training.variants.{variant}.average_of names {unknown}: not other variants under "
                         "training.variants")
    if len(parents) < 2 and not recipe.get("pretrained_share"):
        raise ValueError(f"training.variants.{variant}.average_of names one variant ({parents[0]}): a mean needs two "
                         "at least (one is enough with pretrained_share)")
    return parents


def _variants_pattern(averaged):
    """A wildcard regex matching exactly the trained (or the averaged) variants' names, so each
    results/train/<variant>/model.pt has one producing rule; matches nothing when there are none."""
    names = [v for v in config["training"]["variants"] if is_averaged(v) == averaged]
    return "|".join(re.escape(v) for v in sorted(names, key=len, reverse=True)) or "(?!)"


def trained_variants_pattern():
    return _variants_pattern(averaged=False)


def averaged_variants_pattern():
    return _variants_pattern(averaged=True)


def init_from_input(variant):
    """The parent model a variant starts from (``init_from``), as an input: another variant's
    results/train/<name>/model.pt is trained first, in the same DAG; a missing file stops the DAG at once."""
    path = variant_params(variant).get("init_from")
    return [path] if path else []


def train_run_config(variant):
    """The part of the config a training run depends on (recorded as its MLflow params)."""
    return {"experiment": config["experiment"], "seed": config["seed"], "horovod": config["horovod"],
            "bucketing": config["bucketing"], "training": {"variant": variant, **variant_params(variant)}}
