"""Real services on 127.0.0.1 for the tests: an `mlflow server` with a SQLite store."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


class MlflowServer:
    """An `mlflow server` (SQLite backend, served artifacts) under ``workdir`` that a test can kill and
    start again on the same port and store, as a tracking server restarted for maintenance."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir = workdir
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 180.0) -> "MlflowServer":
        """Start it and wait until it answers (~30 s on 2 busy cores: mostly imports)."""
        self.launch()
        self.wait(timeout)
        return self

    def wait(self, timeout: float = 180.0) -> None:
        wait_http(f"{self.uri}/health", timeout=timeout, proc=self.proc)

    def launch(self) -> "MlflowServer":
        """Start it without waiting (``wait`` then waits)."""
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
               "--artifacts-destination", str(self.workdir / "artifacts"), "--workers", "1"]
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        # no huey job runner (trace rollups, prompt jobs): its worker processes double the start-up on 2 cores
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        with open(self.workdir / "server.log", "a") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """The whole process group at once (SIGKILL: no shutdown, as a crash or a killed container)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        self.proc = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


class TcpProxy:
    """127.0.0.1:``port`` forwarded to a backend port on 127.0.0.1, so that a client keeps one URI while
    the server behind it is killed and replaced: ``down()`` stops listening (connections are refused)
    and cuts the open ones; ``up(port)`` listens again on the same port, forwarding to ``port``."""

    def __init__(self, backend_port: int):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backend = backend_port
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.up()

    def up(self, backend_port: int | None = None) -> None:
        if backend_port is not None:
            self.backend = backend_port
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.2)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                backend = socket.create_connection(("127.0.0.1", self.backend), timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            backend.settimeout(None)
            with self._lock:
                self._conns |= {client, backend}
            for src, dst in ((client, backend), (backend, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def mlflow_server(workdir: Path) -> Iterator[str]:
    """Start `mlflow server` (SQLite backend, served artifacts) and yield its http URI."""
    server = MlflowServer(workdir).start()
    try:
        yield server.uri
    finally:
        server.stop()
