"""
What each notification's status says, kept in memory and written out coalesced.

The :class:`StatusBook` is the single writer of every notification's status:
the front end tells it whether the spec was accepted, the dispatcher tells it
each delivery outcome, and it derives the ``Ready`` condition, Quay's failure
counting (3 consecutive failed attempts disable the notification), counters and
the bounded list of recent deliveries.

A :class:`StatusFlusher` writes changed statuses to a :class:`StatusSink` (the
Kubernetes status subresource, or the standalone JSON file) at most once per
``min_interval`` per notification, so a burst of 10,000 deliveries costs the
API server a handful of PATCH requests, and the last write is always exact.
"""
import asyncio
import collections
import dataclasses
import logging
import operator
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

from reponotify.models import RECENT_DELIVERIES, DeliveryOutcome
from reponotify.notifications import NotificationKey

logger = logging.getLogger(__name__)

DISABLE_AFTER_FAILURES = 3  # Quay's rule
COUNTERS = ('succeeded', 'failed', 'dropped')  # status.deliveries


_now_cache: tuple[int, str] = (-1, '')


def now_rfc3339() -> str:
    """The current UTC time to the second; one string per second, shared by everything stamped in it."""
    global _now_cache
    second = int(time.time())
    if _now_cache[0] != second:
        _now_cache = (second, time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(second)))
    return _now_cache[1]


@dataclasses.dataclass(frozen=True, slots=True)
class ReadyCondition:
    status: str  # "True" | "False"
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class DeliveryRecord:
    """One delivery outcome, as it appears in ``lastDelivery`` and ``recentDeliveries``."""
    event_id: str
    event: str
    outcome: DeliveryOutcome
    attempts: int
    message: str
    code: int | None = None
    duration_ms: int | None = None
    time: str = dataclasses.field(default_factory=now_rfc3339)

    def to_status(self) -> dict[str, Any]:
        return {
            'eventId': self.event_id, 'event': self.event, 'time': self.time,
            'outcome': self.outcome.value, 'attempts': self.attempts, 'code': self.code,
            'message': self.message, 'durationMs': self.duration_ms,
        }


@dataclasses.dataclass(slots=True)  # one per notification: kept small (slots, lazy members)
class _Entry:
    spec_condition: ReadyCondition = ReadyCondition('Unknown', 'Pending', 'Not processed yet')
    generation: int | None = None
    number_of_failures: int = 0
    last_delivery: dict[str, Any] | None = None
    counters: dict[str, int] | None = None  # COUNTERS, made on the first outcome
    recent: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # newest first, RECENT_DELIVERIES at most
    ready: ReadyCondition | None = None
    ready_since: str = dataclasses.field(default_factory=now_rfc3339)
    last_test: dict[str, Any] | None = None


TransitionListener = Callable[[NotificationKey, ReadyCondition | None, ReadyCondition], None]
# Told every delivery outcome as it is recorded (Retrying ones included): the operator's Warning Events.
DeliveryListener = Callable[[NotificationKey, DeliveryRecord], None]


class StatusBook:
    """Every notification's status, and the rules that derive it."""

    def __init__(self, on_transition: TransitionListener | None = None) -> None:
        self._entries: dict[NotificationKey, _Entry] = {}
        self._dirty: set[NotificationKey] = set()
        self._changed = asyncio.Event()
        self.on_transition = on_transition
        self.on_delivery: DeliveryListener | None = None

    # -- what the front end says ---------------------------------------------------------------

    def seed(self, key: NotificationKey, status: Mapping[str, Any] | None) -> None:
        """Take over counters and failures from a status written before (restart, resume)."""
        if key in self._entries or not status:
            return
        entry = self._entry(key)
        entry.number_of_failures = int(status.get('numberOfFailures') or 0)
        entry.last_delivery = status.get('lastDelivery') or None
        entry.counters = {name: int((status.get('deliveries') or {}).get(name) or 0) for name in COUNTERS}
        entry.recent = list(status.get('recentDeliveries') or [])[:RECENT_DELIVERIES]
        entry.last_test = status.get('lastTest') or None
        for condition in status.get('conditions') or []:
            if condition.get('type') == 'Ready':
                entry.ready = ReadyCondition(condition.get('status', 'Unknown'), condition.get('reason', ''),
                                             condition.get('message', ''))
                entry.ready_since = condition.get('lastTransitionTime') or entry.ready_since

    def set_spec_condition(self, key: NotificationKey, condition: ReadyCondition,
                           generation: int | None = None) -> None:
        """Record whether the current spec was accepted (Accepted, InvalidSpec, Suspended, ...)."""
        entry = self._entry(key)
        entry.spec_condition = condition
        entry.generation = generation
        self._update_ready(key, entry)
        self._mark(key)

    def forget(self, key: NotificationKey) -> None:
        self._entries.pop(key, None)
        self._dirty.discard(key)

    def reset(self, key: NotificationKey) -> None:
        """Zero the failure count, re-enabling a disabled notification (Quay's "re-enable")."""
        entry = self._entry(key)
        entry.number_of_failures = 0
        self._update_ready(key, entry)
        self._mark(key)

    def start_test(self, key: NotificationKey, value: str, event_id: str | None, outcome: str,
                   message: str) -> None:
        """Record a test request (the reponotify.dev/test annotation's value); its delivery updates it."""
        entry = self._entry(key)
        entry.last_test = {'value': value, 'eventId': event_id, 'time': now_rfc3339(), 'outcome': outcome,
                           'message': message}
        self._mark(key)

    def last_test_value(self, key: NotificationKey) -> str | None:
        entry = self._entries.get(key)
        return entry.last_test.get('value') if entry is not None and entry.last_test else None

    # -- what the dispatcher says --------------------------------------------------------------

    def failures(self, key: NotificationKey) -> int:
        """Consecutive failed attempts (numberOfFailures)."""
        entry = self._entries.get(key)
        return 0 if entry is None else entry.number_of_failures

    def is_disabled(self, key: NotificationKey) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.number_of_failures >= DISABLE_AFTER_FAILURES

    def record_attempt(self, key: NotificationKey, ok: bool) -> bool:
        """Count one attempt (success resets, failure increments); returns True if now disabled."""
        entry = self._entry(key)
        entry.number_of_failures = 0 if ok else entry.number_of_failures + 1
        self._update_ready(key, entry)
        self._mark(key)
        return entry.number_of_failures >= DISABLE_AFTER_FAILURES

    def record_delivery(self, key: NotificationKey, record: DeliveryRecord) -> None:
        """Record an outcome: final ones are counted and listed in recentDeliveries."""
        entry = self._entry(key)
        status = record.to_status()
        entry.last_delivery = status
        if entry.last_test is not None and entry.last_test.get('eventId') == record.event_id:
            entry.last_test.update(outcome=record.outcome.value, message=record.message, time=record.time)
        counter = {
            DeliveryOutcome.SUCCEEDED: 'succeeded',
            DeliveryOutcome.FAILED: 'failed',
            DeliveryOutcome.DROPPED: 'dropped',
        }.get(record.outcome)
        if counter is not None:
            if entry.counters is None:
                entry.counters = dict.fromkeys(COUNTERS, 0)
            entry.counters[counter] += 1
            entry.recent.insert(0, status)
            del entry.recent[RECENT_DELIVERIES:]
        self._mark(key)
        if self.on_delivery is not None:
            self.on_delivery(key, record)

    # -- reading -------------------------------------------------------------------------------

    def keys(self) -> list[NotificationKey]:
        return sorted(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def ready_condition(self, key: NotificationKey) -> ReadyCondition | None:
        """The Ready condition as the status shows it, or None for a notification the book does not hold."""
        entry = self._entries.get(key)
        return None if entry is None else entry.ready or entry.spec_condition

    def ready_reasons(self) -> collections.Counter[str]:
        """How many notifications have each Ready reason (Accepted, Disabled, ...), for metrics."""
        return collections.Counter((entry.ready or entry.spec_condition).reason for entry in self._entries.values())

    def status(self, key: NotificationKey) -> dict[str, Any]:
        """The status as the resource shows it (camelCase, as in the CRD)."""
        entry = self._entry(key)
        ready = entry.ready or entry.spec_condition
        return {
            'observedGeneration': entry.generation,
            'conditions': [{
                'type': 'Ready', 'status': ready.status, 'reason': ready.reason, 'message': ready.message,
                'lastTransitionTime': entry.ready_since, 'observedGeneration': entry.generation,
            }],
            'numberOfFailures': entry.number_of_failures,
            'lastDelivery': entry.last_delivery,
            'deliveries': dict(entry.counters or dict.fromkeys(COUNTERS, 0)),
            'recentDeliveries': list(entry.recent),
            **({'lastTest': dict(entry.last_test)} if entry.last_test else {}),
        }

    # -- dirty tracking for the flusher --------------------------------------------------------

    def take_dirty(self) -> set[NotificationKey]:
        dirty, self._dirty = self._dirty, set()
        self._changed.clear()
        return dirty

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def _mark(self, key: NotificationKey) -> None:
        self._dirty.add(key)
        self._changed.set()

    def _entry(self, key: NotificationKey) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
        return entry

    def _update_ready(self, key: NotificationKey, entry: _Entry) -> None:
        condition = entry.spec_condition
        if condition.reason == 'Accepted' and entry.number_of_failures >= DISABLE_AFTER_FAILURES:
            condition = ReadyCondition(
                'False', 'Disabled',
                f"Disabled after {entry.number_of_failures} consecutive failed deliveries; "
                f"events are dropped until it is reset (annotate reponotify.dev/reset)")
        previous = entry.ready
        if previous != condition:
            if previous is None or previous.status != condition.status:
                entry.ready_since = now_rfc3339()
            entry.ready = condition
            if self.on_transition is not None:
                self.on_transition(key, previous, condition)


class StatusSink(Protocol):
    """Where statuses are written: the Kubernetes API, or a file."""

    async def write(self, key: NotificationKey, status: dict[str, Any]) -> None: ...


_in_order = operator.attrgetter('namespace', 'name')


FLUSH_SLICE = 64  # statuses written between two yields to the event loop


class StatusFlusher:
    """Writes changed statuses, each at most once per ``min_interval`` seconds."""

    def __init__(self, book: StatusBook, sink: StatusSink, *, min_interval: float = 1.0) -> None:
        self._book = book
        self._sink = sink
        self._min_interval = min_interval
        self._last_write: dict[NotificationKey, float] = {}
        self._pending: set[NotificationKey] = set()

    async def run(self) -> None:
        while True:
            if self._pending:
                # Some were written too recently: come back when the earliest is due. Changes meanwhile
                # wait for that pass too: waking for each would walk every pending status per delivery
                # (thousands of notifications, each changed by a burst, made that most of the work).
                await asyncio.sleep(self._delay_until_due())
            else:
                await self._book.wait_changed()
            await self.flush(force=False)

    async def flush(self, *, force: bool = True, now: Collection[NotificationKey] = ()) -> None:
        """
        Write what is due: everything with ``force`` (at shutdown), else the statuses whose interval
        has passed, and those of ``now`` whatever their interval (the resources a front end just
        handled: their Ready condition shows at once, and the others' writes stay coalesced).
        """
        self._pending |= self._book.take_dirty()
        time_now = time.monotonic()
        written = 0
        for key in sorted(self._pending, key=_in_order):  # by name, compared as tuples (C), not via __lt__
            if not force and key not in now and time_now - self._last_write.get(key, -1e9) < self._min_interval:
                continue
            if written and not written % FLUSH_SLICE:
                # A sink that answers at once (a file, a test's) would otherwise hold the event loop for
                # the whole pass: with thousands of changed statuses, receiving and delivering stalled.
                await asyncio.sleep(0)
            self._pending.discard(key)
            if key not in self._book:  # deleted meanwhile (also during this pass): nothing to write, and
                continue               # status() would make its entry again
            written += 1
            self._last_write[key] = time_now
            try:
                await self._sink.write(key, self._book.status(key))
            except asyncio.CancelledError:  # stopping: the final flush writes it
                self._pending.add(key)
                raise
            except Exception as exc:  # keep flushing others; retry this one later
                logger.warning("Could not write the status of %s: %s", key, exc)
                self._pending.add(key)

    def _delay_until_due(self) -> float:
        now = time.monotonic()
        due = min(self._last_write.get(key, now) + self._min_interval for key in self._pending)
        return max(0.01, due - now)
