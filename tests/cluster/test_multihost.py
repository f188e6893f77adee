"""Horovod across two hosts: ``horovodrun -H nodeA:1,nodeB:1`` over ssh, between two network namespaces.

nodeA and nodeB (tests/cluster/netns_hosts.py) share this machine's file system but not its network:
each has its own network namespace, address on a private veth link, host name and sshd. horovodrun
runs on nodeA, starts the local rank itself and the rank on nodeB over ssh, and the ranks talk Gloo over
the veth link (``--network-interface asr0``).
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from ..train.trainer_fixtures import PYTHON, REPO, VENV_BIN, build_setup, clean_env, train_command
from .netns_hosts import NetnsUnavailable, two_hosts

PROBE = Path(__file__).with_name("multihost_probe.py")
pytestmark = [pytest.mark.slow, pytest.mark.netns]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    try:
        with two_hosts(tmp_path_factory.mktemp("netns")) as setup:
            yield setup
    except NetnsUnavailable as exc:
        pytest.skip(f"no network namespaces: {exc}")


def horovodrun(hosts, *command: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """horovodrun on nodeA with one rank on each host."""
    node_a = hosts.hosts[0]
    cmd = [str(VENV_BIN / "horovodrun"), "-np", "2", "-H", ",".join(f"{h.name}:1" for h in hosts.hosts), "--gloo",
           "--network-interface", hosts.iface, "--ssh-identity-file", str(hosts.ssh_key), "--disable-cache",
           "--start-timeout", "90", *command]
    t0 = time.time()
    proc = subprocess.run(hosts.on(node_a, cmd), cwd=REPO, env=hosts.env(clean_env()), capture_output=True, text=True,
                          timeout=timeout)
    proc.seconds = time.time() - t0
    return proc


def test_ranks_run_on_two_hosts_and_average_gradients(hosts, tmp_path):
    proc = horovodrun(hosts, PYTHON, str(PROBE), str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["size"] for r in ranks] == [2, 2] and [r["local_size"] for r in ranks] == [1, 1]
    # two hosts: own host names, own network namespaces (neither is the test's), own link addresses
    assert {r["hostname"] for r in ranks} == {"nodeA", "nodeB"}
    assert {r["horovod_hostname"] for r in ranks} == {"nodeA", "nodeB"}
    own_netns = Path("/proc/self/ns/net").readlink().as_posix()
    assert len({r["netns"] for r in ranks}) == 2 and own_netns not in {r["netns"] for r in ranks}
    by_host = {r["hostname"]: r for r in ranks}
    for h in hosts.hosts:
        assert by_host[h.name]["addresses"].get(hosts.iface) == [h.ip]
    # the rank on nodeB came in over ssh, from nodeA's address
    assert f"Accepted publickey for root from {hosts.hosts[0].ip}" in hosts.sshd_log(hosts.hosts[1])
    # one DistributedOptimizer step: local gradients differ, the applied gradient is their mean
    local = [r["local_grad"][0] for r in ranks]
    assert local[0] != local[1]
    mean = [(a + b) / 2 for a, b in zip(*local)]
    for r in ranks:
        assert r["averaged_grad"][0] == pytest.approx(mean)
        assert r["initial_weight"] == ranks[0]["initial_weight"], "rank 0's weights were broadcast"
        expected = [w - g for w, g in zip(ranks[0]["initial_weight"][0], mean)]
        assert r["weight_after_step"][0] == pytest.approx(expected)
        assert r["rank_sum"] == 1


def test_two_host_training_smoke_run(hosts, tmp_path):
    setup = build_setup(tmp_path / "data")
    params = setup.params_file("multihost", epochs=1, checkpoint_every_steps=0)
    out_dir, log_dir = tmp_path / "out", tmp_path / "ranks"
    proc = horovodrun(hosts, *train_command(setup, params, out_dir, log_dir))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out_dir / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 1 and summary["global_step"] > 0
    assert (out_dir / "model.pt").stat().st_size > 10_000
    assert sorted(p.name for p in log_dir.iterdir()) == ["rank0.log", "rank1.log"]
    assert "world: 2 rank(s) over horovod" in (log_dir / "rank0.log").read_text()
