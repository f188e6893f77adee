"""Elastic Horovod: one of two workers is SIGKILLed mid-training and training finishes on the other, with the
running mean of its weights (``training.weight_average``) intact.

``horovodrun --gloo --min-np 1 --max-np 2 --host-discovery-script workflow_scripts/discover_hosts.sh``
runs ``python -m asrflow.train.elastic`` with one slot on each of two host names of this machine
(``localhost`` and ``127.0.0.1``: both local, so no ssh, but two hosts to Horovod, which blacklists the
host of a failed worker, not the machine).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from asrflow.train.checkpoint import latest_checkpoint

from ..train.trainer_fixtures import PYTHON, REPO, VENV_BIN, build_setup, clean_env

DISCOVER = REPO / "workflow_scripts" / "discover_hosts.sh"
EPOCHS = 12
KILL_AT_STEP = 8
COMMIT_EVERY = 5  # commits at steps 5 and 10: the survivor redoes the steps after 5 (the mean must not count them twice)
pytestmark = [pytest.mark.slow]


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (by the parent links in /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


class Output:
    """horovodrun's merged stdout/stderr, read line by line in a thread."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc):
        for line in proc.stdout:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, proc: subprocess.Popen, timeout: float) -> re.Match:
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(pattern, self.text(), re.M)
            if m:
                return m
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} in horovodrun's output:\n{self.text()[-5000:]}")


def test_training_goes_on_after_a_worker_is_killed(tmp_path):
    setup = build_setup(tmp_path / "data", n_train=24, n_dev=4)
    params = setup.params_file("elastic", epochs=EPOCHS, checkpoint_every_steps=0, log_every=1,
                               weight_average={"enabled": True, "start_step": 1, "every": 1})
    out_dir, log_dir = tmp_path / "out", tmp_path / "workers"
    hosts_file = tmp_path / "hosts"
    hosts_file.write_text("# host:slots, read by workflow_scripts/discover_hosts.sh\nlocalhost:1\n127.0.0.1:1\n")
    env = {**clean_env(), "ASRFLOW_HOSTS_FILE": str(hosts_file)}
    cmd = [str(VENV_BIN / "horovodrun"), "--gloo", "-np", "2", "--min-np", "1", "--max-np", "2",
           "--host-discovery-script", str(DISCOVER), "--start-timeout", "90", "--elastic-timeout", "90",
           PYTHON, "-m", "asrflow.train.elastic", "--commit-every", str(COMMIT_EVERY), *setup.args(params, out_dir, log_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    output = Output(proc)
    try:
        output.wait_for(rf"step {KILL_AT_STEP} loss \S+ lr \S+ workers 2", proc, timeout=240)
        workers = {int(rank): int(pid) for pid, rank in
                   re.findall(r"worker pid (\d+) on \S+: rank (\d+) of 2", output.text())}
        assert sorted(workers) == [0, 1], output.text()[-4000:]
        victim = workers[0]  # rank 0, the one that writes checkpoints
        assert victim in descendants(proc.pid), "only a worker of this horovodrun is killed"
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        rc = proc.wait(timeout=300)
        output.thread.join(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    log = output.text()
    assert rc == 0, log[-6000:]
    # the survivor noticed, reset to one worker, rescaled the learning rate, and went on
    assert re.search(r"reset 1: 2 -> 1 worker\(s\), now rank 0; lr rescaled", log), log[-6000:]
    after = log[log.index("reset 1: 2 -> 1"):]
    assert re.search(r"step \d+ loss \S+ lr \S+ workers 1", after)
    summary = json.loads((out_dir / "train_summary.json").read_text())
    assert summary["elastic"] == {"resets": 1, "world_sizes": [2, 1], "commit_every": COMMIT_EVERY}
    assert summary["world_size"] == 1 and summary["epochs"] == EPOCHS
    assert summary["stop_reason"] == f"{EPOCHS} epochs done"
    workers_per_epoch = [h["workers"] for h in summary["history"]]
    assert workers_per_epoch[0] == 2 and workers_per_epoch[-1] == 1, workers_per_epoch
    assert (out_dir / "model.pt").stat().st_size > 10_000
    assert time.time() - killed_at < 240
    # the weight mean: the killed rank 0 held it; the survivor, rank 0 now, kept its own, rolled back with the
    # weights to the last commit, so the steps it redid are averaged once: one entry per step of the run
    final = torch.load(latest_checkpoint(out_dir / "checkpoints"), map_location="cpu", weights_only=False)
    steps = final["state"]["global_step"]
    assert summary["weight_average"] == {"steps_averaged": steps, "start_step": 1, "every": 1}
    assert final["weight_average"]["count"] == steps
    exported = torch.load(out_dir / "model.pt", map_location="cpu", weights_only=False)["model"]
    mean = final["weight_average"]["weights"]
    assert all(torch.equal(exported[k], mean[k].to(exported[k].dtype)) for k in exported)
    assert any(not torch.equal(exported[k], final["model"][k]) for k in exported if torch.is_floating_point(exported[k]))
