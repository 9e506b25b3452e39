"""Waits that a ``close()`` cuts short (the limiter and the circuit breaker hold callers so)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable
from typing import Any, TypeVar

from .errors import ShuttingDown

__all__ = ["ShutdownGuard"]

T = TypeVar("T")


class ShutdownGuard:
    """Runs waits as tasks that :meth:`close` cancels, turning that into ShuttingDown."""

    __slots__ = ("_pending", "_what", "closed")

    def __init__(self, what: str) -> None:
        self._what = what
        self._pending: set[asyncio.Future[Any]] = set()
        self.closed = False

    def close(self) -> None:
        """Make every pending and later :meth:`run` raise ShuttingDown."""
        self.closed = True
        for future in list(self._pending):
            future.cancel()

    def check(self) -> None:
        """Raise ShuttingDown if the guard is closed (for steps not worth a task of their own)."""
        if self.closed:
            raise ShuttingDown(f"the {self._what} is closed")

    async def run(self, step: Awaitable[T]) -> T:
        """Await ``step``; ShuttingDown if the guard is (or gets) closed meanwhile."""
        if self.closed:
            if inspect.iscoroutine(step):
                step.close()
            raise ShuttingDown(f"the {self._what} is closed")
        task = asyncio.ensure_future(step)
        self._pending.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            # Our own task being cancelled is not a shutdown: let that propagate unchanged.
            if not self.closed or (current is not None and current.cancelling()):
                raise
            raise ShuttingDown(f"the {self._what} was closed while waiting") from None
        finally:
            self._pending.discard(task)
