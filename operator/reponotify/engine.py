"""
The engine: the core wired together, independent of any front end.

One :class:`Engine` owns the routing table, the outbox, the dispatcher and
the status book. Front ends (the kopf operator, the standalone mode) feed it
notifications and give it a status sink; the receiver feeds it events.
"""
import asyncio
import collections
import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from reponotify.dispatcher import Dispatcher, DispatcherSettings
from reponotify.events import Event, new_event
from reponotify.notifications import Notification, NotificationKey
from reponotify.outbox import MemoryOutbox, PendingDelivery
from reponotify.routing import RoutingTable
from reponotify.status import StatusBook, StatusFlusher, StatusSink, TransitionListener


@dataclasses.dataclass(frozen=True)
class Accepted:
    """What the receiver answers for an accepted event."""
    id: str
    matched: int
    replayed: bool = False


class IdempotencyKeys:
    """Remembers recent ``Idempotency-Key`` values and what they were answered."""

    def __init__(self, ttl: float = 24 * 3600, max_keys: int = 100_000) -> None:
        self._ttl = ttl
        self._max_keys = max_keys
        self._seen: collections.OrderedDict[str, tuple[float, Accepted]] = collections.OrderedDict()

    def get(self, key: str) -> Accepted | None:
        self._expire()
        found = self._seen.get(key)
        return found[1] if found else None

    def put(self, key: str, accepted: Accepted) -> None:
        self._seen[key] = (time.monotonic(), accepted)
        while len(self._seen) > self._max_keys:
            self._seen.popitem(last=False)

    def _expire(self) -> None:
        limit = time.monotonic() - self._ttl
        while self._seen and next(iter(self._seen.values()))[0] < limit:
            self._seen.popitem(last=False)


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    dispatcher: DispatcherSettings = DispatcherSettings()
    status_interval: float = 1.0  # at most one status write per notification per this many seconds


class Engine:
    """Routing, queueing, delivering and recording, for one process."""

    def __init__(self, settings: EngineSettings = EngineSettings(),
                 on_transition: TransitionListener | None = None) -> None:
        self.settings = settings
        self.routing = RoutingTable()
        self.book = StatusBook(on_transition=on_transition)
        self.outbox = MemoryOutbox()
        self.dispatcher = Dispatcher(self.outbox, self.routing, self.book, settings.dispatcher)
        self._idempotency = IdempotencyKeys()
        self._ingest_lock = asyncio.Lock()
        self._flusher: StatusFlusher | None = None
        self._flusher_task: asyncio.Task[None] | None = None

    async def start(self, sink: StatusSink) -> None:
        self._flusher = StatusFlusher(self.book, sink, min_interval=self.settings.status_interval)
        self._flusher_task = asyncio.create_task(self._flusher.run(), name='status-flusher')
        await self.dispatcher.start()

    async def stop(self) -> None:
        await self.dispatcher.stop()
        if self._flusher_task is not None:
            self._flusher_task.cancel()
            await asyncio.gather(self._flusher_task, return_exceptions=True)
        if self._flusher is not None:
            await self._flusher.flush(force=True)

    async def flush_status(self) -> None:
        """Write every pending status change now (front ends use it after accepting a spec)."""
        if self._flusher is not None:
            await self._flusher.flush(force=True)

    # -- notifications ---------------------------------------------------------------------------

    def put_notification(self, notification: Notification) -> None:
        self.routing.put(notification)

    def remove_notification(self, key: NotificationKey) -> None:
        self.routing.remove(key)

    # -- events ----------------------------------------------------------------------------------

    async def ingest(self, kind: str, payload: Mapping[str, Any], *, idempotency_key: str | None = None) -> Accepted:
        """Route an event and queue one delivery per matching notification."""
        async with self._ingest_lock:  # check-then-put on the idempotency key must be atomic
            if idempotency_key is not None:
                previous = self._idempotency.get(idempotency_key)
                if previous is not None:
                    return dataclasses.replace(previous, replayed=True)
            event = new_event(kind, payload)
            accepted = Accepted(id=event.id, matched=await self.enqueue(event))
            if idempotency_key is not None:
                self._idempotency.put(idempotency_key, accepted)
            return accepted

    async def enqueue(self, event: Event, only: NotificationKey | None = None) -> int:
        """Queue deliveries of an event to its matching notifications (or to one of them)."""
        matching = [n for n in self.routing.match(event) if only is None or n.key == only]
        await self.outbox.add(PendingDelivery(event=event, key=n.key) for n in matching)
        return len(matching)
