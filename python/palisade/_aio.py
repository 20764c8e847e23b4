"""The asyncio side of palisade's awaitables: results set on the event loop's thread."""

from __future__ import annotations

import asyncio
from typing import Any


def complete(future: "asyncio.Future[Any]", ok: bool, value: Any) -> None:
    """Sets `future`'s result (or exception) unless it was cancelled meanwhile."""
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
