"""
The event loop reponotify's processes run on: uvloop, or asyncio's own.

uvloop (libuv under asyncio's interface) makes the receiver and the delivery
client cheaper per request; measured here (2 cores, loopback, small JSON POSTs,
a bare aiohttp client at concurrency 64): about 7,700 POSTs/s on asyncio's
loop and 12,900/s on uvloop. Everything reponotify does is plain asyncio, so
``--event-loop asyncio`` runs the same code on the standard loop.

Delivery processes run on the loop their parent runs on (:func:`running_loop_name`).

Once a process has started, :func:`freeze_startup_objects` takes what start-up made
out of the garbage collector's sight.
"""
import asyncio
import gc
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar('T')

EVENT_LOOPS = ('uvloop', 'asyncio')
DEFAULT_EVENT_LOOP = 'uvloop'


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory making a loop of this name (None: asyncio's default)."""
    if name not in EVENT_LOOPS:
        raise ValueError(f"unknown event loop {name!r}; one of {', '.join(EVENT_LOOPS)}")
    return uvloop.new_event_loop if name == 'uvloop' else None


def run(main: Coroutine[Any, Any, T], loop: str = DEFAULT_EVENT_LOOP) -> T:
    """Run a coroutine to completion on a new loop of this kind, as ``asyncio.run`` does."""
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(main)


def running_loop_name() -> str:
    """The kind of the running loop: 'uvloop' or 'asyncio'."""
    return 'uvloop' if isinstance(asyncio.get_running_loop(), uvloop.Loop) else 'asyncio'


def freeze_startup_objects() -> None:
    """
    Collect once, then leave every object alive now out of later garbage collections.

    What start-up made (modules, models, compiled notifications) lives as long as the
    process, yet each full collection walked all of it: measured here, a pause of 28 ms
    that every request in flight waited for (the receiver's p99 latency). Called once
    the process is serving; objects made later are collected as before.
    """
    gc.collect()
    gc.freeze()
