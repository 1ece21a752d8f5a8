"""
The dispatcher: workers that take due deliveries from the outbox and deliver them.

For each attempt it looks the notification up again, so that a deleted or changed
resource is honoured even for deliveries queued earlier: a changed URL is used, and
a delivery whose notification no longer matches its event (another repository,
event or filter), or is no longer routed (suspended, invalid), is dropped and
recorded as such (a deleted one has no status to record it in). It drops deliveries
of disabled notifications (recorded, never silently lost), calls the method, and
records the outcome in the status book. Failed attempts are retried on a
schedule with full jitter (``Retry-After`` is honoured when longer); Quay's
rule that 3 consecutive failed attempts disable the notification holds across
all of its deliveries.
"""
import asyncio
import collections
import dataclasses
import logging
import random
import re
import time
from collections.abc import Callable, Collection
from typing import Any

import aiohttp

from reponotify.delivery_processes import DeliveryProcesses, child_settings, process_count
from reponotify.methods import AttemptResult, DeliveryContext
from reponotify.inbox import Inbox
from reponotify.methods.base import DEFAULT_TIMEOUT, Announce, MethodSettings
from reponotify.metrics import Metrics
from reponotify.models import DeliveryOutcome
from reponotify.notifications import Notification, NotificationKey
from reponotify.outbox import Outbox, PendingDelivery
from reponotify.routing import RoutingTable
from reponotify.status import DeliveryRecord, StatusBook
from reponotify.targets import TargetPolicy, delivery_session

logger = logging.getLogger(__name__)

DEFAULT_RETRY_SCHEDULE: tuple[float, ...] = (5.0, 300.0, 1800.0, 7200.0)

UNEXPECTED_ERROR = "unexpected error (see the operator's log)"
FAILING_LANE = 'failing notification '  # the in-flight count of a failing notification, beside its target's


def failing_lane(key: NotificationKey) -> str:
    """Where a notification's attempts are counted (and its deliveries wait) while it is failing."""
    return f'{FAILING_LANE}{key}'
NO_LONGER_MATCHES = ("Dropped: the notification was changed and no longer matches this event "
                     "(repository, event or eventConfig)")

_DURATION = re.compile(r'^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$')
_UNITS = {'ms': 0.001, 's': 1.0, 'm': 60.0, 'h': 3600.0, None: 1.0}


def parse_schedule(text: str) -> tuple[float, ...]:
    """Parse a retry schedule like ``5s,5m,30m,2h`` (an empty string means: never retry)."""
    delays = []
    for part in filter(None, (piece.strip() for piece in text.split(','))):
        match = _DURATION.match(part)
        if not match:
            raise ValueError(f"{part!r} is not a duration (examples: 500ms, 5s, 5m, 2h)")
        delays.append(float(match.group(1)) * _UNITS[match.group(2)])
    return tuple(delays)


@dataclasses.dataclass(frozen=True)
class Hold:
    """A gate's answer that a delivery may not go now: postpone it ``delay`` seconds, or drop it."""
    message: str  # with ``drop``, the Dropped outcome's message
    delay: float = 0.0
    drop: bool = False


# Asked before each attempt whether the delivery may go now (None: go). The engine's e-mail
# verification is one: it holds mails to an address until that address is verified.
DeliveryGate = Callable[[Notification, PendingDelivery], Hold | None]


@dataclasses.dataclass(frozen=True)
class DispatcherSettings:
    workers: int = 64
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    timeout: float = DEFAULT_TIMEOUT
    methods: MethodSettings = MethodSettings()
    per_target: int = 16  # attempts in flight to one target (host), so a slow one cannot take every worker
    # The SSRF guard; None connects anywhere (the command line always sets one).
    target_policy: TargetPolicy | None = None
    # Child processes making the attempts of methods that allow it (0: all in this process; 'auto':
    # one per CPU, resolved when the dispatcher starts, see delivery_processes.process_count).
    delivery_processes: int | str = 0


class Dispatcher:
    """Delivers what the outbox holds, with retries, recording every outcome."""

    def __init__(
            self,
            outbox: Outbox,
            routing: RoutingTable,
            book: StatusBook,
            settings: DispatcherSettings = DispatcherSettings(),
            inbox: Inbox | None = None,
    ) -> None:
        self._inbox = inbox
        self.announce: Announce | None = None  # set by the operator front end
        self.gate: DeliveryGate | None = None  # set by the engine (e-mail verification)
        self.metrics: Metrics | None = None  # set by the engine
        self._outbox = outbox
        self._routing = routing
        self._book = book
        self._settings = settings
        self._http: aiohttp.ClientSession | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._busy: set[asyncio.Task[Any]] = set()  # workers in the middle of an attempt
        self._per_target: collections.Counter[str] = collections.Counter()  # attempts in flight per target
        # Deliveries to a target at its limit, oldest first: each attempt to it that ends sends one back to
        # the schedule. (Put back into the schedule with a delay instead, every delivery to a busy target
        # would be taken and put back again at every delay: CPU in proportion to the backlog.)
        self._parked: dict[str, collections.deque[PendingDelivery]] = {}
        self._processes: DeliveryProcesses | None = None
        self._closing = False
        # Notifications not handled yet by the front end (after a restart), with the deliveries that wait
        # for each, set aside (see hold()).
        self._held: dict[NotificationKey, list[PendingDelivery]] = {}
        self._hold_timer: asyncio.TimerHandle | None = None

    @property
    def parked(self) -> int:
        """How many due deliveries wait for their target to have an attempt less in flight."""
        return sum(len(parked) for parked in self._parked.values())

    @property
    def processes(self) -> DeliveryProcesses | None:
        """The delivery processes, if attempts are made in child processes."""
        return self._processes

    async def start(self) -> None:
        self._http = delivery_session(self._settings.target_policy, self._settings.workers)
        count = process_count(self._settings.delivery_processes)
        if count:
            self._processes = DeliveryProcesses(count, child_settings(
                self._settings.methods, self._settings.target_policy, connections=self._settings.workers))
            await self._processes.start()
        self._workers = [asyncio.create_task(self._work(), name=f'dispatcher-{i}')
                         for i in range(self._settings.workers)]

    async def stop(self, grace: float = 0.0) -> None:
        """Stop taking deliveries; give attempts in flight ``grace`` seconds, then cancel them.

        A cancelled attempt's delivery is not completed, so it stays in the outbox for the next start.
        """
        self._closing = True
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        busy = [worker for worker in self._workers if worker in self._busy]
        for worker in self._workers:
            if worker not in self._busy:
                worker.cancel()
        if busy and grace > 0:
            await asyncio.wait(busy, timeout=grace)
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        if self._processes is not None:
            await self._processes.stop()
            self._processes = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    def hold(self, keys: Collection[NotificationKey], seconds: float) -> None:
        """
        Deliveries of these notifications wait until the front end has handled each (``release``), or at
        most ``seconds``: after a restart, the outbox holds deliveries before the routing table holds their
        notifications. Without this, one already due found its notification unknown and was removed as a
        deleted one's is. After ``seconds``, a notification still unknown was deleted meanwhile.
        """
        self._held = {key: [] for key in keys}
        if self._hold_timer is not None:
            self._hold_timer.cancel()
        self._hold_timer = asyncio.get_running_loop().call_later(seconds, self._release_all)

    def release(self, key: NotificationKey) -> None:
        """The front end has handled this notification (routed it, recorded why not, or it was deleted)."""
        waiting = self._held.pop(key, None)
        if waiting:
            self._outbox.put_back(waiting)

    def _release_all(self) -> None:
        self._hold_timer = None
        held, self._held = self._held, {}
        self._outbox.put_back([delivery for waiting in held.values() for delivery in waiting])

    def forget(self, key: NotificationKey) -> None:
        """A notification was deleted: delivery processes drop what they hold of it."""
        if self._processes is not None:
            self._processes.forget(key)

    async def _work(self) -> None:
        worker = asyncio.current_task()
        assert worker is not None
        while not self._closing:
            delivery = await self._outbox.take()
            self._busy.add(worker)
            try:
                await self.process(delivery)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not kill the worker, nor be retried for ever
                logger.exception("Unexpected error delivering %s to %s", delivery.id, delivery.key)
                await self._failed_unexpectedly(delivery)
            finally:
                self._busy.discard(worker)

    async def process(self, delivery: PendingDelivery) -> None:
        """Make one attempt of one delivery and record what happened."""
        notification = self._routing.get(delivery.key)
        if notification is None and delivery.key in self._held:  # not handled yet since the restart
            self._held[delivery.key].append(delivery)  # set aside (still on disk) until release()
            return
        if notification is None:  # deleted, suspended or made invalid since the event was accepted
            # Still there, not routed: say what became of the event. Deleted: there is no status to say it in.
            ready = self._book.ready_condition(delivery.key)
            dropped = None if ready is None else \
                f"Dropped: the notification is not ready ({ready.reason}: {ready.message})"
            await self._went_without_attempt(delivery, None, dropped)
            return
        target = notification.method.target_key(notification.target) or str(notification.key)
        if not self._routing.routes(notification, delivery.event):  # changed since: the event is not for it now
            await self._went_without_attempt(delivery, target, NO_LONGER_MATCHES)
            return
        if self._book.is_disabled(delivery.key):
            await self._went_without_attempt(delivery, target,
                                             "Dropped: the notification is disabled after repeated failures")
            return
        hold = self.gate(notification, delivery) if self.gate is not None else None
        if hold is not None:
            if hold.drop:
                await self._went_without_attempt(delivery, target, hold.message)
            else:
                await self._outbox.postpone(delivery, hold.delay)  # no attempt: nothing to count or write
                await self._let_next_out(target, delivery.key)
            return

        # A notification whose last attempt failed makes one attempt at a time: Quay's three failures
        # then mean three attempts, not as many as were in flight when the third one failed.
        lanes = (target, failing_lane(delivery.key)) if self._book.failures(delivery.key) else (target,)
        full = target if self._per_target[target] >= self._settings.per_target else \
            lanes[1] if len(lanes) > 1 and self._per_target[lanes[1]] else None
        if full is not None:
            self._parked.setdefault(full, collections.deque()).append(delivery)  # this worker goes on
            return
        for each in lanes:
            self._per_target[each] += 1
        try:
            result, duration_ms = await self._attempt(notification, delivery)
        finally:
            for each in lanes:
                self._per_target[each] -= 1
                if not self._per_target[each]:
                    del self._per_target[each]
                await self._unpark(each)
        delivery.attempts += 1
        if self._routing.get(delivery.key) is None:  # deleted during the attempt: it has no status to update
            await self._outbox.complete(delivery)
            return
        disabled = self._book.record_attempt(delivery.key, result.ok)
        if result.ok:  # not failing any more: what waited for its one attempt at a time goes now
            self._let_all_out(delivery.key)

        if result.ok:
            self._record(delivery, DeliveryOutcome.SUCCEEDED, result.message, result, duration_ms)
            await self._outbox.complete(delivery)
        elif disabled or not result.retryable or delivery.attempts > len(self._settings.retry_schedule):
            why = ("; the notification is now disabled" if disabled else
                   "" if not result.retryable else f"; gave up after {delivery.attempts} attempts")
            self._record(delivery, DeliveryOutcome.FAILED, result.message + why, result, duration_ms)
            await self._outbox.complete(delivery)
        else:
            delay = self._delay(delivery.attempts, result.retry_after)
            self._record(delivery, DeliveryOutcome.RETRYING, f"{result.message}; retrying in {delay:.1f}s",
                         result, duration_ms)
            await self._outbox.retry_later(delivery, delay)

    async def _failed_unexpectedly(self, delivery: PendingDelivery) -> None:
        """
        An exception from reponotify's own code: a failed attempt, retried on the schedule, then Failed.

        Not counted towards disabling the notification (its target did not fail), and the status names
        no exception: the log has it (a message could quote a secret).
        """
        delivery.attempts += 1
        routed = self._routing.get(delivery.key) is not None  # else: no status to record it in
        if delivery.attempts > len(self._settings.retry_schedule):
            if routed:
                self._record(delivery, DeliveryOutcome.FAILED,
                             f"{UNEXPECTED_ERROR}; gave up after {delivery.attempts} attempts")
            await self._outbox.complete(delivery)
        else:
            delay = self._delay(delivery.attempts, None)
            if routed:
                self._record(delivery, DeliveryOutcome.RETRYING, f"{UNEXPECTED_ERROR}; retrying in {delay:.1f}s")
            await self._outbox.retry_later(delivery, delay)

    async def _went_without_attempt(self, delivery: PendingDelivery, target: str | None,
                                    dropped: str | None) -> None:
        """Record the delivery as Dropped with this message (None: nothing to record it in) and remove it."""
        if dropped is not None:
            self._record(delivery, DeliveryOutcome.DROPPED, dropped)
        await self._outbox.complete(delivery)
        await self._let_next_out(target, delivery.key)

    async def _let_next_out(self, target: str | None, key: NotificationKey) -> None:
        """
        A delivery went without an attempt. It may have been let out of a lane's queue (its target's or its
        failing notification's) by an attempt that ended, to go next: if nothing is in flight there now,
        nothing else would let the next one out.
        """
        if not self._parked:  # nothing waits anywhere (the usual case)
            return
        for lane in (target, failing_lane(key)):
            if lane is not None and self._parked.get(lane) and not self._per_target[lane]:
                await self._unpark(lane)

    def _let_all_out(self, key: NotificationKey) -> None:
        """The notification is not failing: every delivery that waited for its one attempt at a time goes."""
        parked = self._parked.pop(failing_lane(key), None) if self._parked else None
        if parked:
            self._outbox.put_back(parked)

    async def _unpark(self, target: str) -> None:
        """An attempt to ``target`` ended: the delivery parked longest for it is due again, now."""
        parked = self._parked.get(target)
        if parked:
            delivery = parked.popleft()
            if not parked:
                del self._parked[target]
            await self._outbox.postpone(delivery, 0.0)

    async def _attempt(self, notification: Notification, delivery: PendingDelivery) -> tuple[AttemptResult, int]:
        assert self._http is not None, "the dispatcher is not started"
        if self._processes is not None and notification.method.runs_in_delivery_process:
            result, elapsed = await self._processes.attempt(notification, delivery, self._settings.timeout)
        else:
            context = DeliveryContext(
                http=self._http, delivery_id=delivery.id, timeout=self._settings.timeout,
                settings=self._settings.methods, notification=(delivery.key.namespace, delivery.key.name),
                inbox=self._inbox, announce=self.announce)
            started = time.monotonic()
            result = await notification.method.deliver(notification.target, delivery.event, context)
            elapsed = time.monotonic() - started
        if self.metrics is not None:
            self.metrics.attempted(notification.method.name, elapsed)
        return result, int(elapsed * 1000)

    def _delay(self, attempts: int, retry_after: float | None) -> float:
        schedule = self._settings.retry_schedule or (0.0,)
        base = schedule[min(attempts, len(schedule)) - 1]
        delay = random.uniform(0, base)  # full jitter
        return max(delay, retry_after or 0.0)

    def _record(self, delivery: PendingDelivery, outcome: DeliveryOutcome, message: str,
                result: AttemptResult | None = None, duration_ms: int | None = None) -> None:
        self._book.record_delivery(delivery.key, DeliveryRecord(
            event_id=delivery.event.id, event=delivery.event.kind, outcome=outcome,
            attempts=delivery.attempts, message=message, code=result.code if result else None,
            duration_ms=duration_ms))
        notification = self._routing.get(delivery.key)  # not routed (suspended, invalid): its method is not known
        method = notification.method.name if notification is not None else 'unknown'
        if self.metrics is not None:
            self.metrics.outcome(method, outcome, delivery.event.received_at)
        level = _LOG_LEVELS[outcome]
        if not logger.isEnabledFor(level):  # a Succeeded is DEBUG: most records are not built at all
            return
        # Messages name the target's answer, never its URL or credentials (see methods.base.post_json).
        named = message if message.startswith(f'{outcome.value}: ') else f'{outcome.value}: {message}'
        logger.log(level, "Delivery %s of %s event %s to %s: %s", delivery.id,
                   delivery.event.kind, delivery.event.id, delivery.key, named,
                   extra={'notification': str(delivery.key), 'method': method, 'event_id': delivery.event.id,
                          'event': delivery.event.kind, 'delivery_id': delivery.id, 'outcome': outcome.value,
                          'attempts': delivery.attempts, 'code': result.code if result else None})


_LOG_LEVELS = {DeliveryOutcome.SUCCEEDED: logging.DEBUG, DeliveryOutcome.RETRYING: logging.INFO,
               DeliveryOutcome.DROPPED: logging.INFO, DeliveryOutcome.FAILED: logging.WARNING}
