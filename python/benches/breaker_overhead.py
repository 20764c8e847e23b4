"""Cost per call of a circuit breaker in the closed state, from Python: palisade next to
pybreaker and circuitbreaker (those two are optional: `pip install pybreaker circuitbreaker`),
all wrapping the same no-op function, in one run.

    python python/benches/breaker_overhead.py [--calls N] [--repeat R]

Build palisade with `maturin develop --release` first: a debug build measures the debug build.
Prints one line per library: the best of R runs of N calls, in ns per call, minus the cost of
calling the bare function.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict


def noop() -> int:
    return 1


def per_call_ns(fn: Callable[[], object], calls: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter_ns() - start) / calls)
    return best


def contenders() -> Dict[str, Callable[[], object]]:
    import palisade

    out: Dict[str, Callable[[], object]] = {}
    b = palisade.CircuitBreaker("bench")
    out["palisade .call(fn)"] = lambda: b.call(noop)
    out["palisade @decorator"] = b(noop)
    try:
        import pybreaker

        pb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)
        out["pybreaker .call(fn)"] = lambda: pb.call(noop)
        out["pybreaker @decorator"] = pb(noop)
    except ImportError:
        print("pybreaker not installed: skipped")
    try:
        import circuitbreaker

        out["circuitbreaker @decorator"] = circuitbreaker.circuit(
            failure_threshold=5, recovery_timeout=60
        )(noop)
    except ImportError:
        print("circuitbreaker not installed: skipped")
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=200_000)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    base = per_call_ns(noop, a.calls, a.repeat)
    print(f"{'bare function call':<28} {base:8.1f} ns")
    for name, fn in contenders().items():
        ns = per_call_ns(fn, a.calls, a.repeat)
        print(f"{name:<28} {ns:8.1f} ns  (+{ns - base:.1f} ns over the bare call)")


if __name__ == "__main__":
    main()
