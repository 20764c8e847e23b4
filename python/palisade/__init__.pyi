"""Type stubs of palisade (the Rust extension palisade._palisade and its Python half)."""

from typing import Any, Callable, Dict, Iterator, List, Literal, Optional, Tuple, Type, TypeVar, Union

from ._errors import (
    AuthError as AuthError,
    BreakerOpen as BreakerOpen,
    ClaimLost as ClaimLost,
    ConfigError as ConfigError,
    Conflict as Conflict,
    Error as Error,
    Fenced as Fenced,
    FingerprintMismatch as FingerprintMismatch,
    InProgress as InProgress,
    LeaseLost as LeaseLost,
    LockError as LockError,
    LockHeld as LockHeld,
    LockTimeout as LockTimeout,
    NotRecorded as NotRecorded,
    OnceError as OnceError,
    OwnershipLost as OwnershipLost,
    RateLimited as RateLimited,
    Unavailable as Unavailable,
)

_F = TypeVar("_F", bound=Callable[..., Any])
_ExcClasses = Union[Type[BaseException], Tuple[Type[BaseException], ...], List[Type[BaseException]]]
BreakerState = Literal["closed", "open", "half_open", "forced_open", "disabled", "metrics_only"]

class BreakerEvents:
    """A breaker's events from the moment ``CircuitBreaker.events()`` was called. Each is a
    dict with a ``type``: ``state_transition`` (``from``, ``to``), ``rejected`` (``state``),
    ``success`` / ``error`` (``elapsed`` seconds), ``ignored_error``, ``slow_call``
    (``elapsed``, ``failed``), ``reset``, ``lagged`` (``missed``)."""
    def get(self, timeout: Optional[float] = None) -> Optional[Dict[str, Any]]:
        """The next event, waiting at most ``timeout`` seconds (None: for ever); None when
        the wait ran out. Releases the GIL while waiting."""
    def drain(self) -> List[Dict[str, Any]]:
        """Every event waiting now, without blocking."""
    def __iter__(self) -> Iterator[Dict[str, Any]]: ...
    def __next__(self) -> Dict[str, Any]: ...

class CircuitBreaker:
    """A circuit breaker (palisade-breaker). Durations are seconds; see the Rust builder for
    each option's meaning and default (resilience4j's)."""

    def __init__(
        self,
        name: str,
        *,
        failure_rate_threshold: Optional[float] = None,
        slow_call_rate_threshold: Optional[float] = None,
        slow_call_duration: Optional[float] = None,
        slow_call_detection: Optional[bool] = None,
        sliding_window: Optional[int] = None,
        sliding_window_time: Optional[float] = None,
        minimum_calls: Optional[int] = None,
        wait_in_open: Optional[float] = None,
        open_backoff_max: Optional[float] = None,
        open_backoff_multiplier: Optional[float] = None,
        open_backoff_jitter: Optional[float] = None,
        half_open_permits: Optional[int] = None,
        max_wait_in_half_open: Optional[float] = None,
        automatic_half_open: Optional[bool] = None,
        event_capacity: Optional[int] = None,
        record: Optional[_ExcClasses] = None,
        ignore: Optional[_ExcClasses] = None,
    ) -> None: ...
    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Calls ``fn`` if permitted (else raises ``BreakerOpen``) and records how it ended."""
    def __call__(self, fn: _F) -> _F:
        """Decorator form of ``call``."""
    def events(self) -> BreakerEvents:
        """A subscription to this breaker's events from now on."""
    @property
    def name(self) -> str:
        """The breaker's name."""
    @property
    def state(self) -> BreakerState:
        """The current state: "closed", "open", "half_open", "forced_open", "disabled" or
        "metrics_only"."""
    @property
    def metrics(self) -> Dict[str, Any]:
        """state, failure_rate, slow_call_rate, buffered_calls, failed_buffered_calls,
        slow_buffered_calls, successful_calls, failed_calls, slow_calls, ignored_calls,
        not_permitted_calls."""
    @property
    def options(self) -> Dict[str, Any]:
        """The keyword options the breaker was built with (for pickling and logs)."""
    @property
    def record(self) -> Optional[Tuple[Type[BaseException], ...]]:
        """The exception classes counted as failures (None: every exception)."""
    @property
    def ignore(self) -> Optional[Tuple[Type[BaseException], ...]]:
        """The exception classes counted as neither success nor failure (None: none)."""
    def force_open(self) -> None:
        """Rejects every call until ``reset()``, ``disable()`` or ``metrics_only()``."""
    def disable(self) -> None:
        """Permits every call and records nothing until another state is set."""
    def metrics_only(self) -> None:
        """Permits every call and records outcomes, never changing state by itself."""
    def reset(self) -> None:
        """Back to closed with an empty window."""

def breaker(name: str, **options: Any) -> CircuitBreaker:
    """The process-wide breaker ``name`` (made with ``options`` on first use)."""

class Guard:
    """A held lock."""

    @property
    def name(self) -> str:
        """The lock name."""
    @property
    def fencing_token(self) -> int:
        """Strictly increasing per lock name: pass it to the storage you write."""
    @property
    def lost(self) -> bool:
        """Whether the lease behind the lock is lost."""
    def release(self) -> None:
        """Releases the lock now (leaving the ``with`` block does it too). Idempotent."""

class Lock:
    """``coordinator.lock(name)``: a context manager that takes the lock on enter."""

    def __enter__(self) -> Guard: ...
    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool: ...

class Ran:
    """``run_exclusive``: the function ran under the lock."""

    value: Any
    fencing_token: int
    @property
    def ran(self) -> Literal[True]:
        """Always True."""

class Skipped:
    """``run_exclusive``: the lock was held; ``holder`` is the running job's info, if known."""

    holder: Optional[Dict[str, Any]]
    @property
    def ran(self) -> Literal[False]:
        """Always False."""

class JobContext:
    """What a function running under ``run_exclusive`` sees of its lock."""

    @property
    def name(self) -> str:
        """The lock name."""
    @property
    def fencing_token(self) -> int:
        """The fencing token to pass to the storage the job writes."""
    @property
    def lost(self) -> bool:
        """Whether the lease is lost: stop writing; ``run_exclusive`` raises ``LeaseLost`` at
        the end."""
    def check(self) -> None:
        """Raises ``LeaseLost`` if the lease is lost."""

def current_job() -> Optional[JobContext]:
    """The job ``run_exclusive`` is running on this thread, or ``None``."""

class Coordinator:
    """Locks and exclusive jobs on etcd (many hosts) or lock files (one host). Pickles as its
    configuration; connects once per process."""

    @staticmethod
    def etcd(
        endpoints: Union[str, List[str]],
        *,
        ttl: int = 10,
        user: Optional[str] = None,
        password: Optional[str] = None,
        tls: Union[None, bool, Dict[str, str]] = None,
        namespace: str = "palisade/",
    ) -> Coordinator:
        """A coordinator on etcd; connects now, so a wrong endpoint fails here. ``ttl``: the
        session lease in whole seconds (>= 2); ``tls``: True (system roots) or a dict of PEM
        file paths ``ca``, ``cert`` + ``key``."""
    @staticmethod
    def file(dir: str) -> Coordinator:
        """A coordinator for the processes of one host: ``flock`` files under ``dir`` (created
        if missing). The kernel releases a lock when its holder's process dies."""
    def lock(self, name: str, timeout: Optional[float] = None) -> Lock:
        """None: wait until free; 0: raise LockHeld if held; seconds: raise LockTimeout."""
    def semaphore(self, name: str, permits: int, timeout: Optional[float] = None) -> Lock:
        """One of ``permits`` slots of ``name`` (at most ``permits`` holders at once); the
        same context manager as ``lock``. Another ``permits`` than a holder's: ConfigError."""
    def run_exclusive(
        self,
        name: str,
        fn: Callable[..., Any],
        /,
        *args: Any,
        wait: Union[None, float, Literal["forever"]] = None,
        **kwargs: Any,
    ) -> Union[Ran, Skipped]:
        """Runs ``fn`` holding the lock ``name``, registered as a running job. ``wait``: None
        skips at once if held, seconds waits that long, "forever" until free. Raises
        ``LeaseLost`` if the lease was lost while ``fn`` ran; re-raises what ``fn`` raises."""
    def run_limited(
        self,
        name: str,
        permits: int,
        fn: Callable[..., Any],
        /,
        *args: Any,
        wait: Union[None, float, Literal["forever"]] = None,
        **kwargs: Any,
    ) -> Union[Ran, Skipped]:
        """``run_exclusive`` on one of ``permits`` slots of the semaphore ``name``."""
    def running_jobs(self) -> List[Dict[str, Any]]:
        """The jobs running under ``run_exclusive`` (on files: this host's), as dicts: name,
        lock, host, pid, started_at (Unix seconds), command, metadata, fencing_token."""

def once(
    key: str,
    fn: Callable[..., Any],
    /,
    *args: Any,
    store: str,
    ttl: float = 86400.0,
    in_progress_ttl: float = 300.0,
    wait: Optional[float] = None,
    fingerprint: Optional[str] = None,
    **kwargs: Any,
) -> Any:
    """Runs ``fn`` once per ``key`` (store: file:///dir, redis://..., memory://) and returns
    its JSON result; later calls replay it."""

class Decision:
    """A limiter's answer (truthy when allowed)."""

    @property
    def allowed(self) -> bool:
        """Whether the request was admitted (and its cost recorded)."""
    @property
    def remaining(self) -> int:
        """Units still available in the window after this decision."""
    @property
    def retry_after(self) -> Optional[float]:
        """Seconds until the same request would be admitted; None if allowed."""
    @property
    def reset_after(self) -> float:
        """Seconds until the limit is fully replenished."""
    @property
    def limit(self) -> int:
        """The units the limit admits per window."""
    @property
    def window(self) -> float:
        """The window of the limit this decision describes, in seconds."""
    def headers(self, name: str = "default") -> Dict[str, str]:
        """RateLimit-Policy, RateLimit and (when denied) Retry-After."""
    def __bool__(self) -> bool: ...

_Limits = Union[str, List[str]]

class RateLimiter:
    """A rate limiter on Redis, on files (one host) or in this process. Limits are strings such
    as "100/min", "10/s", "5000/h", "3/10s". Pickles as its configuration."""

    @staticmethod
    def redis(
        url: Union[str, List[str]],
        limits: _Limits,
        *,
        algorithm: Literal["sliding_log", "sliding_window", "gcra"] = "sliding_log",
        burst: Optional[int] = None,
        prefix: str = "palisade:rl:",
        on_unavailable: Literal["closed", "open", "local"] = "closed",
        timeout: float = 1.0,
        cluster: bool = False,
        tls_ca: Optional[str] = None,
    ) -> RateLimiter:
        """A limiter on Redis; every decision is one atomic script timed by Redis's clock.
        ``url``: redis:// or rediss:// (``tls_ca``: a PEM CA file to trust instead of the
        system's roots); with ``cluster=True``, one node's URL or a list of them.
        ``on_unavailable``: "closed" connects now and raises Unavailable if Redis is down;
        "open" (admit) and "local" (decide in this process) connect at the first decision, so
        the policy answers from the start while Redis is down (with ``cluster=True`` it waits up
        to a second for the cluster, then connects in the background). A refused password
        raises AuthError whatever the policy."""
    @staticmethod
    def file(dir: str, limits: _Limits) -> RateLimiter:
        """A limiter shared by the processes of one host: an exact sliding log per key in a
        file under ``dir``, updated under an exclusive lock."""
    @staticmethod
    def local(limits: _Limits, *, burst: Optional[int] = None) -> RateLimiter:
        """A limiter for this process only (GCRA): one limit, ``burst`` units back to back
        (default: the limit's count)."""
    def check(self, key: str, cost: int = 1) -> Decision:
        """Decides now: admits ``cost`` units for ``key`` or denies with ``retry_after``.
        ``cost=0`` peeks (remaining, reset_after) without consuming."""
    def acquire(self, key: str, cost: int = 1, timeout: Optional[float] = None) -> Decision:
        """Waits (GIL released) until admitted; raises RateLimited after timeout."""
    async def acquire_async(
        self, key: str, cost: int = 1, timeout: Optional[float] = None
    ) -> Decision:
        """``acquire`` for asyncio: awaits until admitted; raises RateLimited after timeout."""
    def reset(self, key: str) -> None:
        """Forgets ``key``'s history on every limit (the next decision starts empty)."""

def publish(
    src: str,
    dest: str,
    *,
    content: Literal["bytes", "rows"] = "bytes",
    unit: Literal["dir", "file"] = "dir",
    names: bool = False,
    format: Literal["auto", "parquet", "csv", "jsonl"] = "auto",
    include: List[str] = ...,
    exclude: List[str] = ...,
    threads: Optional[int] = None,
    fencing_token: Optional[int] = None,
    remove_missing: bool = False,
    allow_unfenced: bool = False,
    allow_empty: bool = False,
    retain: float = 3600.0,
    lock_timeout: float = 30.0,
    dry_run: bool = False,
) -> Dict[str, Any]:
    """Publishes the partitions under ``src`` to ``dest``, writing only changed ones; returns
    the report ``palisade publish --json`` prints. The options are the command's flags
    (``--content``, ``--unit``, ``--names``, ``--format``, ``--include``, ``--exclude``,
    ``--threads``, ``--dry-run``), and the identities are the command's: a dataset published by
    either is unchanged when the other publishes the same ``src``. With ``dry_run=True``
    nothing is written and the report (with its ``plan``) is what would be done."""
