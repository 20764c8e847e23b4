"""The exceptions of palisade, each with the meaning of a Rust error of the crates."""

from __future__ import annotations

from typing import Any, Optional


class Error(Exception):
    """Base class of every palisade error."""


class ConfigError(Error, ValueError):
    """A bad argument: an option out of range, a bad URL, a bad lock name."""


class Unavailable(Error, ConnectionError):
    """A server (etcd, Redis) could not be reached or refused us; retry later."""


class AuthError(Error, PermissionError):
    """A server refused our credentials or our permissions (wrong password, missing role or ACL
    permission), or a TLS certificate was refused (by us or by the server). Retrying does not
    help: fix the configuration."""


class BreakerOpen(Error):
    """The circuit breaker did not permit the call; the function was not called.

    ``retry_after`` is the number of seconds until a call may be permitted (``None`` when the
    breaker cannot tell: forced open, or half-open with every probe taken); ``state`` is the
    breaker's state and ``breaker`` its name.
    """

    retry_after: Optional[float] = None
    state: str = "open"
    breaker: str = ""


class RateLimited(Error):
    """``acquire(..., timeout=)`` could not be admitted in time. ``retry_after``: seconds until
    the request would be admitted, if nobody else used the key meanwhile."""

    retry_after: Optional[float] = None


class LockError(Error):
    """A lock could not be taken, held or released."""


class LockHeld(LockError):
    """The lock is held by someone else (a try with ``timeout=0``). ``holder``: the holder's
    job info (a dict) when it registered one."""

    holder: Optional[dict[str, Any]] = None


class LockTimeout(LockError, TimeoutError):
    """The lock was not free within the timeout."""


class LeaseLost(LockError):
    """The lease behind the lock was lost (expired, revoked, not renewed in time): someone else
    may hold the lock now. Work done after this is not protected; re-acquire before writing."""


class OnceError(Error):
    """A run-once key could not be run or recorded."""


class InProgress(OnceError):
    """Another call with this key is still running; retry later (or pass ``wait=``)."""


class FingerprintMismatch(OnceError):
    """The key was already used with a different request (fingerprint)."""


class OwnershipLost(OnceError):
    """The job ran, but its claim expired and another runner took the key over."""


class ClaimLost(OnceError):
    """The claim on the key was lost while the job ran; nothing was recorded."""


class NotRecorded(OnceError):
    """The job ran but its result could not be recorded; a retry runs it again."""


class Fenced(Error):
    """A writer with a newer fencing token has already committed (or a token is required)."""


class Conflict(Error):
    """Another writer committed to the same dataset meanwhile; run again."""
