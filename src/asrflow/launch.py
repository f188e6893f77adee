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


def count_cpu_ids(spec: str) -> int:
    """Number of CPUs in an scontrol CPU_IDs list such as 0-3,8,10-11."""
    n = 0
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def allocation_from_scontrol(job_id: str) -> tuple[list[str], list[int]] | None:
    """Hosts and tasks per host of a running job (`scontrol show job -d`): Snakemake's slurm-jobstep
    clears every SLURM_* variable but the job id, and inside `srun -n1` SLURM_TASKS_PER_NODE is the step's."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-d", "-o", job_id], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"\bCPUs/Task=(\d+)", out)
    cpus_per_task = int(m.group(1)) if m else 1
    hosts, slots = [], []
    for nodes, cpu_ids in re.findall(r"\bNodes=(\S+) CPU_IDs=([0-9,-]+)", out):
        for host in expand_nodelist(nodes):
            hosts.append(host)
            slots.append(max(1, count_cpu_ids(cpu_ids) // cpus_per_task))
    if not hosts:
        return None
    m = re.search(r"\bNumTasks=(\d+)", out)
    if m:  # whole cores (hyperthreads) can give a node more CPUs than its tasks use
        extra = sum(slots) - int(m.group(1))
        for i in reversed(range(len(slots))):
            take = min(max(0, extra), slots[i] - 1)
            slots[i] -= take
            extra -= take
    return hosts, slots


def horovod_host_args(np_config: str | int, hosts_config: str, env: dict[str, str] | None = None) -> str:
    env = dict(os.environ if env is None else env)
    if env.get("ASRFLOW_IGNORE_SLURM") != "1":
        alloc = allocation_from_scontrol(env["SLURM_JOB_ID"]) if env.get("SLURM_JOB_ID") else None
        if alloc is None and env.get("SLURM_JOB_NODELIST"):
            hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
            alloc = hosts, slots_per_node(env, len(hosts))
        if alloc is not None:
            hosts, slots = alloc
            return f"-np {sum(slots)} -H " + ",".join(f"{h}:{s}" for h, s in zip(hosts, slots))
    return f"-np {int(np_config)} -H {hosts_config}"
