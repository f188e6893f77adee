"""Where the Horovod ranks run: SLURM's allocation when inside one, else the configured host list."""
from __future__ import annotations

import os
import re
import subprocess


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM_JOB_NODELIST to host names, through `scontrol show hostnames` (it knows every bracket form)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        return [h for h in out.split() if h]
    except (OSError, subprocess.SubprocessError):
        # Without scontrol (a login node), handle the simple forms: a,b and name[1-3,5]
        hosts = []
        for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", nodelist):
            m = re.fullmatch(r"(.*)\[(.*)\]", part)
            if not m:
                hosts.append(part)
                continue
            for rng in m.group(2).split(","):
                lo, _, hi = rng.partition("-")
                for i in range(int(lo), int(hi or lo) + 1):
                    hosts.append(f"{m.group(1)}{i:0{len(lo)}d}")
        return hosts


def slots_per_node(env: dict[str, str], n_nodes: int) -> list[int]:
    """Tasks per node from SLURM_TASKS_PER_NODE ("4(x2),2"), else NTASKS / nodes."""
    spec = env.get("SLURM_TASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE")
    if spec:
        slots: list[int] = []
        for item in spec.split(","):
            m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
            if m:
                slots += [int(m.group(1))] * int(m.group(2) or 1)
        if len(slots) == n_nodes:
            return slots
    ntasks = int(env.get("SLURM_NTASKS", n_nodes))
    return [max(1, ntasks // n_nodes)] * n_nodes


def horovod_host_args(np_config: str | int, hosts_config: str, env: dict[str, str] | None = None) -> str:
    env = dict(os.environ if env is None else env)
    nodelist = env.get("SLURM_JOB_NODELIST")
    if nodelist and env.get("ASRFLOW_IGNORE_SLURM") != "1":
        hosts = expand_nodelist(nodelist)
        slots = slots_per_node(env, len(hosts))
        return f"-np {sum(slots)} -H " + ",".join(f"{h}:{s}" for h, s in zip(hosts, slots))
    return f"-np {int(np_config)} -H {hosts_config}"
