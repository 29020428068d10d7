"""A TaskGroup for helper tasks that live exactly as long as a `with` body.

asyncio's TaskGroup (3.11) wraps an exception raised by its own body in an ExceptionGroup;
for a connection's reader task that turns every NodeUnreachable a caller should catch into a
group. `background_tasks` runs the body outside that wrapping: helper tasks are cancelled when
the body ends, their own failures still surface, and the body's exception comes out as itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any


class Scope:
    def __init__(self, tg: asyncio.TaskGroup) -> None:
        self._tg = tg
        self._tasks: list[asyncio.Task[Any]] = []

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = self._tg.create_task(coro)
        self._tasks.append(task)
        return task

    def cancel_all(self) -> None:
        for task in self._tasks:
            task.cancel()


@contextlib.asynccontextmanager
async def background_tasks() -> AsyncIterator[Scope]:
    body_error: BaseException | None = None
    async with asyncio.TaskGroup() as tg:
        scope = Scope(tg)
        try:
            yield scope
        except BaseException as exc:  # re-raised below, once the helpers are gone
            body_error = exc
        finally:
            scope.cancel_all()
    if body_error is not None:
        raise body_error
