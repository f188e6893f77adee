"""A real one-node SLURM cluster on this machine, for the cluster tests.

``slurm_cluster(root)`` starts, as root and with every file under ``root``:

* ``munged`` with its own key and socket (SLURM's authentication),
* a private ``mariadbd`` on 127.0.0.1 and ``slurmdbd`` on top of it, so that ``sacct`` works: SLURM
  22.05 (Debian 12) has no file-based accounting storage any more (``accounting_storage/filetxt`` is
  gone); ``sacct`` needs ``AccountingStorageType=accounting_storage/slurmdbd``, and slurmdbd stores
  only in MySQL/MariaDB,
* ``slurmctld`` and ``slurmd`` (``NodeName=localhost``, partition ``debug``) with ``SLURM_CONF`` pointing
  at the generated ``slurm.conf``.

It waits until ``sinfo`` reports the node idle, yields a :class:`SlurmCluster` (its ``env`` is what a
client such as ``sbatch``, ``sacct`` or Snakemake's SLURM executor needs), and on exit cancels what is
left in the queue and stops every daemon it started, by process id.

Where slurmdbd or mariadbd is not installed, ``accounting="auto"`` (the default) falls back to a
cluster without accounting: ``sacct`` then refuses to work, and the job-completion log
(``JobCompType=jobcomp/filetxt``, :meth:`SlurmCluster.completed_jobs`) is the record of what ran.
Anything that prevents the cluster from starting raises :class:`SlurmUnavailable`, which the tests turn
into a skip with the reason.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

CLUSTER = "asrflow"
PARTITION = "debug"
NODE = "localhost"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "salloc", "scancel", "scontrol", "sinfo", "squeue", "sacct", "sacctmgr", "sshare", "sstat")
ACCOUNTING_DAEMONS = ("slurmdbd", "mariadbd")
SACCT_FIELDS = ("JobIDRaw", "JobName", "Comment", "State", "ExitCode", "Partition", "NNodes", "NTasks",
                "AllocCPUS", "NodeList")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run here (not root, a daemon missing, or it did not come up)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_requirements(accounting: bool = True) -> str | None:
    """Why a cluster cannot be started here, or None."""
    if os.geteuid() != 0:
        return "the test SLURM cluster runs its daemons as root"
    names = list(DAEMONS) + ["sbatch", "sinfo", "squeue", "scontrol", "sacct", "sacctmgr", "srun"]
    if accounting:
        names += list(ACCOUNTING_DAEMONS)
    missing = [n for n in names if not _which(n)]
    if missing:
        return f"not installed: {', '.join(missing)} (Debian: slurm-wlm munge slurmdbd mariadb-server-core)"
    return None


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    env: dict[str, str]
    accounting: bool
    jobcomp_log: Path
    cluster: str = CLUSTER
    partition: str = PARTITION
    node: str = NODE
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
        return proc

    def sacct(self, *extra: str, fields: tuple[str, ...] = SACCT_FIELDS) -> list[dict[str, str]]:
        """Every allocation (``-X``: no steps) the accounting database knows, as dicts."""
        out = self.run("sacct", "-X", "-a", "--parsable2", "--noheader", "--starttime", "2000-01-01",
                       "--format", ",".join(f"{f}%300" if f == "Comment" else f for f in fields), *extra).stdout
        return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]

    def completed_jobs(self) -> list[dict[str, str]]:
        """The job-completion log (jobcomp/filetxt): one dict of KEY=value per finished job."""
        if not self.jobcomp_log.exists():
            return []
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in self.jobcomp_log.read_text().splitlines() if line]

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-N", "-n", self.node, "-o", "%T", check=False).stdout.strip()

    def log(self, name: str) -> str:
        path = self.root / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def _node_hardware() -> str:
    """CPUs/sockets/cores/threads/memory of this machine as slurmd sees it (so the node never drains
    for a mismatch), under the node name the cluster uses."""
    out = subprocess.run([_which("slurmd") or "slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("NodeName=")), "")
    if not line:
        raise SlurmUnavailable(f"slurmd -C printed no node line: {out!r}")
    keys = dict(re.findall(r"(\w+)=(\S+)", line))
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    return " ".join(f"{k}={keys[k]}" for k in keep if k in keys)


def _wait(predicate, timeout: float, what: str, procs: dict[str, subprocess.Popen], root: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise SlurmUnavailable(f"{name} exited with {proc.returncode} while waiting for {what}:\n"
                                       f"{_tail(root / 'log' / f'{name}.log')}")
        try:
            if predicate():
                return
        except (OSError, subprocess.SubprocessError):
            pass
        time.sleep(0.3)
    logs = "\n".join(f"--- {n}\n{_tail(root / 'log' / f'{n}.log')}" for n in procs)
    raise SlurmUnavailable(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")


def _tail(path: Path, n: int = 30) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _start(name: str, cmd: list[str], env: dict[str, str], root: Path, procs: dict[str, subprocess.Popen]) -> None:
    out = open(root / "log" / f"{name}.out", "w")
    procs[name] = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    out.close()


def _stop(procs: dict[str, subprocess.Popen]) -> None:
    for name in reversed(list(procs)):
        proc = procs[name]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _own_stepds(conf: Path) -> list[int]:
    """slurmstepd processes of this cluster (they carry its SLURM_CONF; slurmd daemonizes them)."""
    pids = []
    marker = f"SLURM_CONF={conf}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "slurmstepd":
                continue
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@contextlib.contextmanager
def slurm_cluster(root: Path, accounting: str | bool = "auto", timeout: float = 90) -> Iterator[SlurmCluster]:
    """Start the cluster under ``root`` and yield it; see the module docstring."""
    if accounting == "auto":
        accounting = missing_requirements(accounting=True) is None
    reason = missing_requirements(accounting=bool(accounting))
    if reason:
        raise SlurmUnavailable(reason)
    root = Path(root).resolve()
    for sub in ("log", "run", "state", "spool", "munge", "db"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o700)
    ports = {k: free_port() for k in ("ctld", "slurmd", "dbd", "mysql")}
    munge_socket = root / "munge" / "munge.socket.2"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env["SLURM_CONF"] = str(root / "slurm.conf")
    # Client shims first on PATH: the SLURM executor's job step drops SLURM_* variables (SLURM_CONF too)
    # before its `srun`, which on a real cluster finds /etc/slurm/slurm.conf; here the config lives in root.
    shims = root / "bin"
    shims.mkdir(exist_ok=True)
    for name in CLIENTS:
        real = _which(name)
        if real:
            _write(shims / name, f'#!/bin/sh\nexport SLURM_CONF="{root / "slurm.conf"}"\nexec {real} "$@"\n', 0o755)
    env["PATH"] = os.pathsep.join([str(shims), env.get("PATH", ""), "/usr/sbin", "/sbin"])
    jobcomp = root / "log" / "jobcomp.txt"
    procs: dict[str, subprocess.Popen] = {}

    if accounting:
        acct = f"""AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={ports['dbd']}
AccountingStoragePass={munge_socket}
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"""
    else:
        acct = "AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none"
    _write(root / "plugstack.conf", "")
    # read next to slurm.conf; nothing here uses cgroups (proctrack/linuxproc, task/none), and without
    # systemd (a container) slurmd must not try to create a systemd scope should a plugin load them
    _write(root / "cgroup.conf", "CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")
    _write(root / "slurm.conf", f"""# generated by tests/cluster/slurm_cluster.py
ClusterName={CLUSTER}
SlurmctldHost=localhost
SlurmctldPort={ports['ctld']}
SlurmdPort={ports['slurmd']}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}
SlurmdPidFile={root / 'run' / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={root / 'plugstack.conf'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
{acct}
JobCompType=jobcomp/filetxt
JobCompLoc={jobcomp}
NodeName={NODE} NodeAddr=127.0.0.1 {_node_hardware()} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
""")
    conf = root / "slurm.conf"
    cluster = SlurmCluster(root=root, conf=conf, env=env, accounting=bool(accounting), jobcomp_log=jobcomp,
                           procs=procs)
    try:
        # munge: a fresh key, a private socket; -f because the socket's parents include /tmp (sticky, world-writable)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        _start("munged", [_which("munged"), "-F", "-f", f"--key-file={key}", f"--socket={munge_socket}",
                          f"--pid-file={root / 'run' / 'munged.pid'}", f"--seed-file={root / 'munge' / 'seed'}",
                          f"--log-file={root / 'log' / 'munged.log'}"], env, root, procs)
        _wait(lambda: subprocess.run(f"munge -n -S {munge_socket} | unmunge -S {munge_socket}", shell=True,
                                     capture_output=True, timeout=10).returncode == 0, 30, "munged", procs, root)

        if accounting:
            # An empty data dir and no grant tables: a throwaway server for slurmdbd alone, on loopback
            # (no mariadb-install-db, which would need the client package too).
            datadir = root / "db" / "data"
            datadir.mkdir(parents=True, exist_ok=True)
            _start("mariadbd", [_which("mariadbd"), "--no-defaults", f"--datadir={datadir}", "--user=root",
                                f"--socket={root / 'db' / 'mysqld.sock'}", f"--pid-file={root / 'run' / 'mariadbd.pid'}",
                                "--bind-address=127.0.0.1", f"--port={ports['mysql']}", "--skip-name-resolve", "--skip-grant-tables",
                                f"--log-error={root / 'log' / 'mariadbd.log'}", "--innodb-buffer-pool-size=64M",
                                "--innodb-log-file-size=16M", "--performance-schema=OFF"], env, root, procs)
            _wait(lambda: _port_open(ports["mysql"]), 60, "mariadbd", procs, root)
            _write(root / "slurmdbd.conf", f"""# generated by tests/cluster/slurm_cluster.py
AuthType=auth/munge
AuthInfo=socket={munge_socket}
DbdHost=localhost
DbdPort={ports['dbd']}
SlurmUser=root
PidFile={root / 'run' / 'slurmdbd.pid'}
LogFile={root / 'log' / 'slurmdbd.log'}
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports['mysql']}
StorageUser=root
StorageLoc=slurm_acct_db
""", mode=0o600)
            _start("slurmdbd", [_which("slurmdbd"), "-D"], env, root, procs)
            _wait(lambda: _port_open(ports["dbd"]), 60, "slurmdbd", procs, root)
            cluster.run("sacctmgr", "-i", "add", "cluster", CLUSTER, timeout=60)

        _start("slurmctld", [_which("slurmctld"), "-D", "-c", "-i"], env, root, procs)
        _wait(lambda: cluster.run("scontrol", "ping", check=False, timeout=10).stdout.count("is UP") >= 1,
              timeout, "slurmctld", procs, root)
        _start("slurmd", [_which("slurmd"), "-D", "-N", NODE], env, root, procs)
        _wait(lambda: cluster.node_state() == "idle", timeout, "the node to be idle", procs, root)
        yield cluster
    finally:
        _teardown(cluster, procs)


def _teardown(cluster: SlurmCluster, procs: dict[str, subprocess.Popen]) -> None:
    if procs.get("slurmctld") is not None and procs["slurmctld"].poll() is None:
        with contextlib.suppress(Exception):
            cluster.run("scancel", "--full", "-u", "root", check=False, timeout=20)
            deadline = time.time() + 30
            while time.time() < deadline and cluster.run("squeue", "-h", check=False, timeout=10).stdout.strip():
                time.sleep(0.5)
    _stop(procs)
    for pid in _own_stepds(cluster.conf):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
