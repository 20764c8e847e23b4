"""Rate-limiter decisions per second from Python against one local Redis, side by side in one
run: palisade (one atomic script per decision), the `limits` library's Redis moving window, and
the naive limiter most teams write (three round trips: ZREMRANGEBYSCORE, ZCARD, ZADD).

    python python/benches/limiter_decisions.py [--decisions N] [--threads T]

Starts its own redis-server on a free loopback port. `limits` and `redis` are optional
(`pip install 'limits[redis]'`). Build palisade with `maturin develop --release` first.
Every decision is admitted (the limit is far above N), so each one writes, as a busy API does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from typing import Callable, Dict


def start_redis() -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", tempfile.mkdtemp()],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                c.sendall(b"PING\r\n")
                if c.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not start within 20 s")


def contenders(url: str) -> Dict[str, Callable[[str], bool]]:
    import palisade

    out: Dict[str, Callable[[str], bool]] = {}
    limit = "1000000/min"
    for algorithm in ("sliding_log", "sliding_window", "gcra"):
        lim = palisade.RateLimiter.redis(url, limit, algorithm=algorithm,
                                         prefix=f"bench-{uuid.uuid4().hex}:")
        out[f"palisade {algorithm}"] = lambda key, lim=lim: lim.check(key).allowed
    try:
        import redis
        from limits import parse
        from limits.storage import RedisStorage
        from limits.strategies import MovingWindowRateLimiter

        storage = RedisStorage(url)
        moving = MovingWindowRateLimiter(storage)
        item = parse("1000000/minute")
        out["limits moving window"] = lambda key: moving.hit(item, key)

        client = redis.Redis.from_url(url)

        def naive(key: str) -> bool:
            now = time.time()
            client.zremrangebyscore(key, 0, now - 60)
            if client.zcard(key) >= 1_000_000:
                return False
            client.zadd(key, {f"{now}-{uuid.uuid4().hex}": now})
            return True

        out["naive sorted set (3 round trips)"] = naive
    except ImportError:
        print("limits or redis not installed: only palisade measured")
    return out


def rate(fn: Callable[[str], bool], decisions: int, threads: int) -> float:
    per_thread = decisions // threads
    keys = [f"k-{uuid.uuid4().hex}" for _ in range(threads)]
    barrier = threading.Barrier(threads + 1)

    def work(key: str) -> None:
        barrier.wait()
        for _ in range(per_thread):
            fn(key)

    ts = [threading.Thread(target=work, args=(k,)) for k in keys]
    for t in ts:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in ts:
        t.join()
    return per_thread * threads / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--decisions", type=int, default=20_000)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    proc, port = start_redis()
    try:
        url = f"redis://127.0.0.1:{port}/0"
        results = {}
        for name, fn in contenders(url).items():
            fn("warm-up")
            results[name] = rate(fn, a.decisions, a.threads)
        base = results.get("limits moving window")
        for name, r in results.items():
            ratio = f"  ({r / base:.1f}x limits)" if base else ""
            print(f"{name:<34} {r:10,.0f} decisions/s{ratio}")
    finally:
        proc.kill()


if __name__ == "__main__":
    main()
