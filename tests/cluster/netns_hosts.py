"""Two "hosts" on one machine for multi-host Horovod: network namespaces joined by a veth pair, each
with its own sshd, host name and /etc/hosts.

``two_hosts(root)`` (root only) creates

* network namespaces ``asrflow-<pid>-a`` / ``-b``, a veth pair whose ends are both called ``asr0``
  inside them (horovodrun ``--network-interface`` wants one interface name on every host), addresses
  10.231.0.1/24 and 10.231.0.2/24 on that private link and nowhere else,
* in each namespace an ``sshd`` listening on the namespace's address only, with host keys and one
  client key generated under ``root`` (no file of the machine's own ssh setup is read or written),
* ``root/bin/on-host NETNS HOST CMD...``: runs CMD "on" a host: in its network namespace, a private
  mount namespace where ``root/hosts`` (nodeA, nodeB) is bind-mounted over /etc/hosts, and a private UTS
  namespace whose host name is nodeA / nodeB,
* ``root/bin/ssh``: the ssh client with ``-F root/ssh_config`` (the client key, no known_hosts file),
  first on the PATH of what runs on the hosts, so horovodrun's ``ssh -o StrictHostKeyChecking=no ...``
  uses it.

Everything is removed on exit: the processes in both namespaces (by pid, from ``ip netns pids``), then
the namespaces, which takes the veth pair with them.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

SUBNET = "10.231.0"        # only ever configured on the veth pair inside the two namespaces
IFACE = "asr0"
HOST_NAMES = ("nodeA", "nodeB")
TOOLS = ("ip", "unshare", "mount", "hostname", "ssh", "ssh-keygen")


class NetnsUnavailable(RuntimeError):
    """Network namespaces or sshd cannot be used here."""


@dataclass
class Host:
    name: str
    netns: str
    ip: str


@dataclass
class TwoHosts:
    root: Path
    hosts: list[Host]
    iface: str
    ssh_key: Path
    bin_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def on(self, host: Host, cmd: list[str]) -> list[str]:
        """The command line that runs ``cmd`` on ``host``."""
        return [str(self.bin_dir / "on-host"), host.netns, host.name, *cmd]

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def run(self, host: Host, cmd: list[str], timeout: float = 60, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.on(host, cmd), env=self.env(env), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{cmd} on {host.name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sshd_log(self, host: Host) -> str:
        path = self.root / f"sshd-{host.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def missing_requirements() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces, veth links and sshd need root"
    missing = [t for t in TOOLS if not shutil.which(t)]
    if not os.path.exists("/usr/sbin/sshd"):
        missing.append("sshd (/usr/sbin/sshd)")
    if missing:
        return f"not installed: {', '.join(missing)} (Debian: iproute2 openssh-server openssh-client util-linux)"
    return None


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetnsUnavailable(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def _keygen(path: Path) -> None:
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "asrflow-test", "-f", str(path))


@contextlib.contextmanager
def two_hosts(root: Path, subnet: str = SUBNET, iface: str = IFACE) -> Iterator[TwoHosts]:
    reason = missing_requirements()
    if reason:
        raise NetnsUnavailable(reason)
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}"
    hosts = [Host(name, f"asrflow-{tag}-{name[-1].lower()}", f"{subnet}.{i + 1}") for i, name in enumerate(HOST_NAMES)]
    created: list[str] = []
    procs: dict[str, subprocess.Popen] = {}
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    setup = TwoHosts(root=root, hosts=hosts, iface=iface, ssh_key=root / "id_ed25519", bin_dir=bin_dir, procs=procs)
    try:
        # -- the link
        for h in hosts:
            _sh("ip", "netns", "add", h.netns)
            created.append(h.netns)
        peer_a, peer_b = f"asr{tag[-8:]}a", f"asr{tag[-8:]}b"
        _sh("ip", "link", "add", peer_a, "type", "veth", "peer", "name", peer_b)
        for h, peer in zip(hosts, (peer_a, peer_b)):
            _sh("ip", "link", "set", peer, "netns", h.netns)
            _sh("ip", "-n", h.netns, "link", "set", peer, "name", iface)
            _sh("ip", "-n", h.netns, "addr", "add", f"{h.ip}/24", "dev", iface)
            _sh("ip", "-n", h.netns, "link", "set", iface, "up")
            _sh("ip", "-n", h.netns, "link", "set", "lo", "up")

        # -- names, and how to run something on a host
        etc_hosts = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else "127.0.0.1 localhost\n"
        hosts_file = _write(root / "hosts", etc_hosts.rstrip("\n") + "\n" + "".join(f"{h.ip} {h.name}\n" for h in hosts))
        _write(bin_dir / "on-host", f"""#!/bin/sh
# on-host NETNS HOSTNAME CMD...: run CMD in the network namespace, with its own host name and /etc/hosts
ns=$1; name=$2; shift 2
exec ip netns exec "$ns" unshare --uts sh -c 'hostname "$0" && mount --bind "{hosts_file}" /etc/hosts && exec "$@"' "$name" "$@"
""", 0o755)

        # -- ssh: one client key, one host key per host, a client config that never touches ~/.ssh
        _keygen(setup.ssh_key)
        _write(root / "authorized_keys", (root / "id_ed25519.pub").read_text(), 0o600)
        _write(root / "ssh_config", f"""Host *
  User root
  IdentityFile {setup.ssh_key}
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  GlobalKnownHostsFile /dev/null
  BatchMode yes
  ConnectTimeout 10
  LogLevel ERROR
""")
        _write(bin_dir / "ssh", f'#!/bin/sh\nexec /usr/bin/ssh -F "{root / "ssh_config"}" "$@"\n', 0o755)
        # sshd's privilege-separation directory (compiled in; the openssh-server package's tmpfiles.d
        # creates it at boot, which a container may not have done)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        for h in hosts:
            key = root / f"host_key_{h.name}"
            _keygen(key)
            conf = _write(root / f"sshd_config_{h.name}", f"""ListenAddress {h.ip}
Port 22
HostKey {key}
PidFile {root / f'sshd-{h.name}.pid'}
AuthorizedKeysFile {root / 'authorized_keys'}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
StrictModes no
PrintMotd no
LogLevel VERBOSE
""")
            log = open(root / f"sshd-{h.name}.log", "w")
            procs[f"sshd-{h.name}"] = subprocess.Popen(setup.on(h, ["/usr/sbin/sshd", "-D", "-e", "-f", str(conf)]),
                                                       stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                       start_new_session=True)
            log.close()
        deadline = time.time() + 30
        for h in hosts:
            while "Server listening" not in setup.sshd_log(h):
                if procs[f"sshd-{h.name}"].poll() is not None or time.time() > deadline:
                    raise NetnsUnavailable(f"sshd on {h.name} did not start:\n{setup.sshd_log(h)[-2000:]}")
                time.sleep(0.2)
        # every host reaches every other one by name, over the link
        for src in hosts:
            for dst in hosts:
                if src is not dst:
                    out = setup.run(src, ["ssh", dst.name, "hostname"], timeout=30, check=False)
                    if out.returncode != 0 or out.stdout.strip() != dst.name:
                        raise NetnsUnavailable(f"ssh {src.name} -> {dst.name} failed: {out.stdout} {out.stderr}")
        yield setup
    finally:
        _cleanup(created, procs)


def _cleanup(namespaces: list[str], procs: dict[str, subprocess.Popen]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs.values():
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    # whatever still lives in our namespaces (ssh sessions, ranks) was started by this fixture
    for ns in namespaces:
        for _ in range(2):
            pids = [int(p) for p in _sh("ip", "netns", "pids", ns, check=False).stdout.split()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
    for ns in namespaces:
        _sh("ip", "netns", "del", ns, check=False)
