"""The workflow on a real (one-node) SLURM cluster through ``--profile profiles/slurm``.

A private cluster (munged, mariadbd + slurmdbd, slurmctld, slurmd; tests/cluster/slurm_cluster.py) runs
the small DAG up to the trained model. ``sacct`` then has to list every non-local rule as a completed
SLURM job of this run, and the Horovod world of the training rule has to come from the allocation
(src/asrflow/launch.py), not from the config's host list.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .slurm_cluster import SlurmUnavailable, slurm_cluster

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SNAKEMAKE = str(VENV_BIN / "snakemake")
TARGETS = ["results/train/full/model.pt"]
# Rules the profile sends to SLURM for TARGETS (the others are `localrules:`), as the plugin's job
# comment: rule_<name>[_wildcards_<values>].
CLUSTER_JOBS = {"rule_make_embedded_corpus", "rule_resample_shard_wildcards_0", "rule_resample_shard_wildcards_1",
                "rule_truncate", "rule_bucketing", "rule_cmvn", "rule_train_wildcards_full"}
LOCAL_RULES = {"synthesize_noise_mirror", "fetch_demand", "merge_resampled", "vocab", "noise_manifest"}

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def snakemake_cmd(workdir: Path, *extra: str) -> list[str]:
    return [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--profile", str(REPO / "profiles" / "slurm"),
            "--configfile", str(REPO / "config" / "small.yaml"), str(Path(__file__).with_name("tiny.yaml")), *extra]


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    with contextlib.ExitStack() as stack:
        try:
            cluster = stack.enter_context(slurm_cluster(root / "cluster"))
        except SlurmUnavailable as exc:
            pytest.skip(f"no SLURM test cluster: {exc}")
        work = root / "work"
        work.mkdir()
        env = {**cluster.env, "PATH": f"{VENV_BIN}{os.pathsep}{cluster.env['PATH']}",
               "ASRFLOW_SLURM_PARTITION": cluster.partition, "ASRFLOW_INVOCATION": "slurm-test",
               "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        # The profile as users run it, with faster polling for a test whose jobs take seconds.
        cmd = snakemake_cmd(work, "--jobs", "4", "--slurm-init-seconds-before-status-checks", "1",
                            "--max-status-checks-per-second", "10", "--latency-wait", "5",
                            "--slurm-keep-successful-logs", "--retries", "0",
                            # without slurmdbd sacct refuses ("accounting storage is disabled"): squeue,
                            # which keeps finished jobs for the cluster's MinJobAge (600 s)
                            *([] if cluster.accounting else ["--slurm-status-command", "squeue"]), *TARGETS)
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=900)
        seconds = time.time() - t0
        (root / "snakemake.log").write_text(proc.stdout + "\n" + proc.stderr)
        yield {"cluster": cluster, "work": work, "proc": proc, "seconds": seconds, "env": env,
               "log": proc.stdout + proc.stderr, "sacct": cluster.sacct() if cluster.accounting else []}


def require_success(run):
    proc = run["proc"]
    train_log = run["work"] / "logs/train/full.log"
    assert proc.returncode == 0, (f"snakemake --profile profiles/slurm failed ({proc.returncode}) after "
                                  f"{run['seconds']:.0f}s:\n{run['log'][-6000:]}\n"
                                  f"logs/train/full.log:\n{train_log.read_text()[-2000:] if train_log.exists() else '-'}\n"
                                  f"slurmctld:\n{run['cluster'].log('slurmctld')[-3000:]}")


def test_workflow_finishes_on_slurm(slurm_run):
    require_success(slurm_run)
    work = slurm_run["work"]
    assert (work / "results/train/full/model.pt").stat().st_size > 10_000
    assert json.loads((work / "results/train/full/train_summary.json").read_text())["epochs"] == 1


def ctld_jobs(cluster) -> dict[str, dict[str, str]]:
    """The jobs slurmctld still holds (MinJobAge=600 s), by comment: `scontrol show job -o`."""
    out = cluster.run("scontrol", "show", "job", "-o").stdout
    jobs = [dict(re.findall(r"(\S+?)=(\S*)", line)) for line in out.splitlines() if line.startswith("JobId=")]
    return {j.get("Comment", ""): j for j in jobs}


def test_sacct_reports_every_cluster_rule_as_completed(slurm_run):
    require_success(slurm_run)
    if not slurm_run["cluster"].accounting:
        pytest.skip("slurmdbd/mariadbd not installed: no sacct (the job-completion log test covers the jobs)")
    rows = slurm_run["sacct"]
    by_comment = {r["Comment"]: r for r in rows}
    assert set(by_comment) == CLUSTER_JOBS, rows
    assert all(r["State"] == "COMPLETED" and r["ExitCode"] == "0:0" for r in rows), rows
    assert all(r["Partition"] == "debug" and r["NodeList"] == "localhost" for r in rows), rows
    # one Snakemake run: the plugin names every job <prefix>_<run uuid>
    names = {r["JobName"] for r in rows}
    assert len(names) == 1 and re.fullmatch(r"asrflow_[0-9a-f-]{36}", names.pop()), rows
    # localrules ran in the Snakemake process, not as SLURM jobs
    assert not any(rule in comment for comment in by_comment for rule in LOCAL_RULES)
    assert re.search(r"localrule vocab:", slurm_run["log"])
    # CPUs follow the rules' threads (cpus_per_task: threads), the shards are one-CPU jobs
    assert by_comment["rule_make_embedded_corpus"]["AllocCPUS"] == "2"
    assert by_comment["rule_resample_shard_wildcards_0"]["AllocCPUS"] == "1"


def test_the_job_completion_log_lists_every_cluster_job(slurm_run):
    require_success(slurm_run)
    done = slurm_run["cluster"].completed_jobs()
    assert len(done) == len(CLUSTER_JOBS) and all(j["JobState"] == "COMPLETED" for j in done), done
    assert {j["Name"] for j in done} == {r["JobName"] for r in slurm_run["sacct"]} or not slurm_run["sacct"]
    if slurm_run["cluster"].accounting:
        assert {j["JobId"] for j in done} == {r["JobIDRaw"] for r in slurm_run["sacct"]}


def test_horovod_world_comes_from_the_allocation(slurm_run):
    require_success(slurm_run)
    cluster, work = slurm_run["cluster"], slurm_run["work"]
    train = ctld_jobs(cluster)["rule_train_wildcards_full"]
    tasks = int(train["NumTasks"])
    assert tasks == 2 and train["NumCPUs"] == "2" and train["NumNodes"] == "1" and train["NodeList"] == "localhost", train
    log = (work / "logs/train/full.log").read_text()
    # the config's host list (tests/cluster/tiny.yaml) names a host that does not exist: training ran,
    # so horovodrun got `-np 2 -H localhost:2` from SLURM_JOB_NODELIST / SLURM_TASKS_PER_NODE
    assert re.search(rf"world: {tasks} rank\(s\) over horovod", log), log[-3000:]
    assert json.loads((work / "results/train/full/train_summary.json").read_text())["world_size"] == tasks
    assert sorted(p.name for p in (work / "logs/train/full.ranks").iterdir()) == ["rank0.log", "rank1.log"]
    # the job ran the rule's command itself in the allocation (resources: mpi), not inside `srun -n1`
    slurm_log = next((work / "logs/slurm/rule_train/full").glob("*.log")).read_text()
    assert "horovod_hosts.py" in slurm_log and "srun: error" not in slurm_log


def test_profile_dry_run_shows_the_resources_of_the_training_job(slurm_run, tmp_path):
    """A dry run in a fresh working directory: the profile's resources (and the partition from
    $ASRFLOW_SLURM_PARTITION) as the training job would get them."""
    proc = subprocess.run(snakemake_cmd(tmp_path, "-n", "--cores", "2", *TARGETS), env=slurm_run["env"], capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    resources = re.search(r"^rule train:.*?^\s+resources: (.*?)$", out, re.M | re.S).group(1)
    for item in ("slurm_partition=debug", "mem_mb=6000", "runtime=180", "cpus_per_task=1", "nodes=1", "tasks=2",
                 "mpi=horovodrun"):
        assert item in resources.split(", "), resources
