"""Real servers for the tests: redis-server and etcd on free loopback ports, started the way
palisade-testkit starts them (same binaries, same flags that matter), each with a bounded wait
until it answers and a clear message if it does not."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from typing import Callable, Iterator, List, Optional, Tuple

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


def redis_server(workdir: str, port: int, *extra: str, name: str = "redis",
                 ready: Optional[Callable[[], bool]] = None) -> Server:
    """A redis-server on 127.0.0.1:`port` without persistence, with `extra` arguments; `url` is
    its URL. Ready when it answers PING (or when `ready` says so)."""
    argv = [find("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--protected-mode", "no", "--dir", workdir, *extra]
    server = Server(argv, ready or (lambda: redis_ping(port)), f"{name} on port {port}",
                    os.path.join(workdir, f"{name}-{port}.log"))
    server.url = f"redis://127.0.0.1:{port}/0"  # type: ignore[attr-defined]
    return server


def run_threads(work: Callable[[int], None], count: int, what: str,
                timeout: float = 120.0) -> None:
    """Runs `work(i)` for i in range(count) on as many threads and waits (bounded) for all of
    them; a thread still running after `timeout` seconds fails the test, named with `what`."""
    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"threads still {what} after {timeout:.0f}s: {stuck}"


@pytest.fixture(scope="session")
def redis_url(workdir: str) -> Iterator[str]:
    server = start(lambda: redis_server(workdir, free_port()))
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


def free_port_pair(offset: int) -> int:
    """A free port whose port + `offset` is free too (a cluster node's bus port)."""
    for _ in range(50):
        port = free_port()
        if port + offset < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + offset))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no free port pair")


def redis_cluster_ok(port: int, password: Optional[str] = None) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        if password:
            s.sendall(f"AUTH {password}\r\n".encode())
            if not s.recv(64).startswith(b"+OK"):
                return False
        s.sendall(b"CLUSTER INFO\r\n")
        return b"cluster_state:ok" in s.recv(4096)


def start_redis_cluster(workdir: str, name: str, password: Optional[str] = None
                        ) -> Tuple[List[Server], List[str]]:
    """Three cluster-enabled redis-servers joined by `redis-cli --cluster create` (with
    `password` required by every node, if given); the servers and their URLs (no password)."""
    binary, cli = find("redis-server"), find("redis-cli")
    auth = ["--requirepass", password, "--masterauth", password] if password else []
    servers: List[Server] = []

    def node() -> Server:
        port = free_port_pair(10000)
        d = os.path.join(workdir, f"{name}-{port}")
        os.makedirs(d, exist_ok=True)
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--protected-mode", "no", "--dir", d,
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000", *auth]
        ready = (lambda: redis_ping_refused(port)) if password else (lambda: redis_ping(port))
        server = Server(argv, ready, f"{name} node on port {port}",
                        os.path.join(d, "redis.log"))
        server.port = port  # type: ignore[attr-defined]
        return server

    try:
        for _ in range(3):
            servers.append(start(node))
        ports = [s.port for s in servers]  # type: ignore[attr-defined]
        subprocess.run([cli, *(["-a", password, "--no-auth-warning"] if password else []),
                        "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                       timeout=60)
        wait_until(lambda: all(redis_cluster_ok(p, password) for p in ports),
                   "cluster_state:ok", 60)
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers, [f"redis://127.0.0.1:{p}/" for p in ports]


@pytest.fixture(scope="session")
def redis_cluster(workdir: str) -> Iterator[List[str]]:
    """A Redis Cluster of three masters; their URLs."""
    servers, urls = start_redis_cluster(workdir, "cluster")
    try:
        yield urls
    finally:
        for s in servers:
            s.stop()


def redis_ping_refused(port: int) -> bool:
    """Ready: the server answers PING, asking for a password."""
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"-NOAUTH")


@pytest.fixture(scope="session")
def redis_tls(workdir: str) -> Iterator[dict]:
    """A redis-server on a TLS port with a certificate from a CA made here (openssl)."""
    openssl = find("openssl")
    d = os.path.join(workdir, "tls")
    os.makedirs(d, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, cwd=d, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=palisade test CA",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
        "-out", "server.csr")
    with open(os.path.join(d, "san.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", "san.ext", "-out", "server.pem")
    binary = find("redis-server")

    def make() -> Server:
        port = free_port()
        argv = [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--protected-mode", "no", "--dir", d,
                "--tls-cert-file", os.path.join(d, "server.pem"),
                "--tls-key-file", os.path.join(d, "server.key"),
                "--tls-ca-cert-file", os.path.join(d, "ca.pem"), "--tls-auth-clients", "no"]

        def ready() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True

        server = Server(argv, ready, f"TLS redis-server on port {port}",
                        os.path.join(d, f"redis-{port}.log"))
        server.url = f"rediss://127.0.0.1:{port}/0"  # type: ignore[attr-defined]
        return server

    server = start(make)
    yield {"url": server.url, "ca": os.path.join(d, "ca.pem")}  # type: ignore[attr-defined]
    server.stop()
