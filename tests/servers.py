"""Real services on 127.0.0.1 for the tests: an `mlflow server` with a SQLite store."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
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

    def start(self, timeout: float = 90.0) -> "MlflowServer":
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
               "--artifacts-destination", str(self.workdir / "artifacts"), "--workers", "1"]
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        with open(self.workdir / "server.log", "a") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_http(f"{self.uri}/health", timeout=timeout, proc=self.proc)
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


@contextlib.contextmanager
def mlflow_server(workdir: Path) -> Iterator[str]:
    """Start `mlflow server` (SQLite backend, served artifacts) and yield its http URI."""
    server = MlflowServer(workdir).start()
    try:
        yield server.uri
    finally:
        server.stop()
