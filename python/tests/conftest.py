"""Real servers for the tests: redis-server and etcd on free loopback ports, started the way
palisade-testkit starts them (same binaries, same flags that matter), each with a bounded wait
until it answers and a clear message if it does not."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from typing import Callable, Iterator, List

import pytest

START_TIMEOUT = 30.0  # seconds; generous for a busy CI machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find(binary: str) -> str:
    for path in (shutil.which(binary), f"/usr/sbin/{binary}", f"/usr/bin/{binary}"):
        if path and os.access(path, os.X_OK):
            return path
    pytest.fail(f"{binary} is not installed: run scripts/setup")


class Server:
    def __init__(self, argv: List[str], ready: Callable[[], bool], what: str, log: str):
        self.what = what
        self.log = log
        self.proc = subprocess.Popen(
            argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {self.proc.returncode}: {self.tail()}")
            try:
                if ready():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{what} did not answer within {START_TIMEOUT}s: {self.tail()}")

    def tail(self) -> str:
        try:
            with open(self.log, "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def redis_ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")


def start(make: Callable[[], Server], attempts: int = 3) -> Server:
    # A free port can be taken by someone else between our probe and the server's bind.
    last: Exception = RuntimeError("not started")
    for _ in range(attempts):
        try:
            return make()
        except RuntimeError as e:
            last = e
    raise last


@pytest.fixture(scope="session")
def workdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="palisade-py-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url(workdir: str) -> Iterator[str]:
    binary = find("redis-server")

    def make() -> Server:
        port = free_port()
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--protected-mode", "no", "--dir", workdir]
        server = Server(argv, lambda: redis_ping(port), f"redis-server on port {port}",
                        os.path.join(workdir, f"redis-{port}.log"))
        server.url = f"redis://127.0.0.1:{port}/0"  # type: ignore[attr-defined]
        return server

    server = start(make)
    yield server.url  # type: ignore[attr-defined]
    server.stop()


@pytest.fixture(scope="session")
def etcd(workdir: str) -> Iterator[str]:
    binary = find("etcd")

    def make() -> Server:
        client, peer = free_port(), free_port()
        client_url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
        data = tempfile.mkdtemp(dir=workdir)
        argv = [binary, "--name=py", f"--data-dir={data}",
                f"--listen-client-urls={client_url}", f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=py={peer_url}", "--initial-cluster-state=new",
                "--heartbeat-interval=50", "--election-timeout=500"]

        def ready() -> bool:
            with urllib.request.urlopen(f"{client_url}/health", timeout=1) as r:
                return b'"health":"true"' in r.read()

        server = Server(argv, ready, f"etcd on port {client}",
                        os.path.join(workdir, f"etcd-{client}.log"))
        server.url = client_url  # type: ignore[attr-defined]
        return server

    server = start(make)
    yield server.url  # type: ignore[attr-defined]
    server.stop()


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Waits for `check()` to hold, up to `timeout` seconds, or fails naming `what`."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
