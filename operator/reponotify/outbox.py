"""
The outbox: one pending delivery per (event, matching notification).

The receiver puts deliveries in; the dispatcher takes those that are due,
and either completes them or puts them back with a later due time. This
implementation keeps them in memory: a restart loses what is pending. The
interface is what a durable outbox must offer too.
"""
import asyncio
import dataclasses
import heapq
import itertools
import time
import uuid
from collections.abc import Callable, Iterable

from reponotify.events import Event
from reponotify.notifications import NotificationKey

Clock = Callable[[], float]


@dataclasses.dataclass
class PendingDelivery:
    """One event to deliver to one notification, with its retry bookkeeping."""
    event: Event
    key: NotificationKey
    id: str = dataclasses.field(default_factory=lambda: str(uuid.uuid4()))  # also the webhook-id
    attempts: int = 0
    due: float = 0.0


class MemoryOutbox:
    """Pending deliveries in a heap ordered by due time."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, PendingDelivery]] = []
        self._sequence = itertools.count()
        self._wakeup = asyncio.Condition()
        self._pending: dict[str, PendingDelivery] = {}

    def __len__(self) -> int:
        return len(self._pending)

    async def add(self, deliveries: Iterable[PendingDelivery]) -> None:
        """Queue new deliveries, due now."""
        async with self._wakeup:
            for delivery in deliveries:
                delivery.due = self._clock()
                self._push(delivery)
            self._wakeup.notify_all()

    async def take(self) -> PendingDelivery:
        """Wait for the next due delivery and hand it out (it stays pending until completed)."""
        async with self._wakeup:
            while True:
                if self._heap:
                    due, _, delivery = self._heap[0]
                    delay = due - self._clock()
                    if delay <= 0:
                        heapq.heappop(self._heap)
                        return delivery
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), timeout=delay)
                    except asyncio.TimeoutError:
                        pass
                else:
                    await self._wakeup.wait()

    async def retry_later(self, delivery: PendingDelivery, delay: float) -> None:
        async with self._wakeup:
            delivery.due = self._clock() + delay
            self._push(delivery)
            self._wakeup.notify_all()

    async def complete(self, delivery: PendingDelivery) -> None:
        """The delivery has its final outcome recorded: forget it."""
        self._pending.pop(delivery.id, None)

    def _push(self, delivery: PendingDelivery) -> None:
        self._pending[delivery.id] = delivery
        heapq.heappush(self._heap, (delivery.due, next(self._sequence), delivery))
