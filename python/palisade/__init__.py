"""palisade for Python: circuit breakers, distributed locks with fencing tokens, exclusive jobs
and run-once keys, from the palisade Rust crates (nothing is reimplemented in Python).

Objects pickle as their configuration and connect lazily, once per process: they can be
captured in Spark closures and sent to ``multiprocessing`` workers, and they work after
``fork``. Every blocking call releases the GIL.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any, Callable, Dict, Optional, Tuple

from . import _palisade
from ._errors import (
    AuthError,
    BreakerOpen,
    ClaimLost,
    ConfigError,
    Conflict,
    Error,
    Fenced,
    FingerprintMismatch,
    InProgress,
    LeaseLost,
    LockError,
    LockHeld,
    LockTimeout,
    NotRecorded,
    OnceError,
    OwnershipLost,
    RateLimited,
    Unavailable,
)

Coordinator = _palisade.Coordinator
Guard = _palisade.Guard
Lock = _palisade.Lock
Ran = _palisade.Ran
Skipped = _palisade.Skipped
JobContext = _palisade.JobContext
current_job = _palisade.current_job
once = _palisade.once
publish = _palisade.publish
RateLimiter = _palisade.RateLimiter
Decision = _palisade.Decision
BreakerEvents = _palisade.BreakerEvents


class CircuitBreaker(_palisade.CircuitBreaker):
    __doc__ = _palisade.CircuitBreaker.__doc__

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Decorator form: ``@breaker`` makes every call of ``fn`` go through ``call``."""
        call = self.call

        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            return call(fn, *args, **kwargs)

        return guarded

    def __reduce__(self) -> Tuple[Any, ...]:
        # Pickled as its configuration; unpickled through the process-wide registry, so every
        # task of a process that receives it shares one breaker (and one memory of failures).
        return (_restore_breaker, (self.name, dict(self.options), self.record, self.ignore))


_registry: Dict[str, CircuitBreaker] = {}
_registry_lock = threading.Lock()


def _reset_registry_lock() -> None:
    # A fork while another thread held the lock would leave it locked in the child.
    global _registry_lock
    _registry_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_registry_lock)


def breaker(name: str, **options: Any) -> CircuitBreaker:
    """The process-wide breaker called ``name``, made with ``options`` on first use.

    Every caller in the process (every task of a Spark executor, every thread) gets the same
    breaker, so failures seen by one task open it for all. A later call with different options
    raises ``ConfigError`` rather than silently returning a breaker configured otherwise.
    """
    with _registry_lock:
        existing = _registry.get(name)
        if existing is None:
            existing = CircuitBreaker(name, **options)
            _registry[name] = existing
            return existing
    wanted = CircuitBreaker(name, **options)
    if (dict(wanted.options), wanted.record, wanted.ignore) != (
        dict(existing.options),
        existing.record,
        existing.ignore,
    ):
        raise ConfigError(
            f"breaker {name!r} already exists in this process with options "
            f"{dict(existing.options)!r}; got {dict(wanted.options)!r}"
        )
    return existing


def _restore_breaker(
    name: str, options: Dict[str, Any], record: Optional[tuple], ignore: Optional[tuple]
) -> CircuitBreaker:
    if record is not None:
        options["record"] = record
    if ignore is not None:
        options["ignore"] = ignore
    return breaker(name, **options)


__all__ = [
    "AuthError",
    "BreakerEvents",
    "BreakerOpen",
    "CircuitBreaker",
    "Decision",
    "ClaimLost",
    "ConfigError",
    "Conflict",
    "Coordinator",
    "Error",
    "Fenced",
    "FingerprintMismatch",
    "Guard",
    "InProgress",
    "JobContext",
    "Lock",
    "LeaseLost",
    "LockError",
    "LockHeld",
    "LockTimeout",
    "NotRecorded",
    "OnceError",
    "OwnershipLost",
    "Ran",
    "RateLimited",
    "RateLimiter",
    "Skipped",
    "Unavailable",
    "breaker",
    "current_job",
    "once",
    "publish",
]
