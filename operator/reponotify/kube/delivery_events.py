"""
Warning Events for failed deliveries, rate-limited per notification.

The status book tells every delivery outcome (``StatusBook.on_delivery``); the
failed ones (final ``Failed``, and ``Retrying``) become ``Warning`` Events on the
RepositoryNotification, as ``kubectl describe`` shows them, but at most one per
notification per ``interval`` (a minute by default): a target that is down makes
one Event a minute, not one per attempt. The failures in between are counted,
and the next Event says so ("3 more failures since the last event"); if no
failure follows, that Event is posted at the end of the interval anyway, so a
count is never lost while the operator runs.

Each Event describes the latest failure: ``DeliveryFailed`` (a final failure) or
``DeliveryRetrying`` (it will be tried again); its ``count`` is the number of
failures it stands for. Messages say what the target answered, never its URL.
"""
import asyncio
import dataclasses
from collections.abc import Callable

from reponotify.models import DeliveryOutcome
from reponotify.notifications import NotificationKey
from reponotify.status import DeliveryRecord

DEFAULT_INTERVAL = 60.0  # seconds between Warning Events about one notification's failed deliveries

# Posts an Event: (key, type, reason, message, count); must not block or raise (the operator posts it later).
PostEvent = Callable[[NotificationKey, str, str, str, int], None]

REASONS = {DeliveryOutcome.FAILED: 'DeliveryFailed', DeliveryOutcome.RETRYING: 'DeliveryRetrying'}


@dataclasses.dataclass
class _Held:
    count: int  # failures not posted since the last Event, the latest included
    latest: DeliveryRecord
    timer: asyncio.TimerHandle | None = None


class DeliveryWarnings:
    """The status book's delivery listener that posts rate-limited Warning Events."""

    def __init__(self, post: PostEvent, interval: float = DEFAULT_INTERVAL) -> None:
        self._post = post
        self.interval = interval
        self._last_posted: dict[NotificationKey, float] = {}  # loop time of the last Event per notification
        self._held: dict[NotificationKey, _Held] = {}

    def __call__(self, key: NotificationKey, record: DeliveryRecord) -> None:
        if record.outcome not in REASONS:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        last = self._last_posted.get(key)
        held = self._held.get(key)
        if last is None or now - last >= self.interval:
            if held is not None:  # its timer is due but has not run yet: this Event tells the count instead
                self.forget_held(key)
            self._emit(key, record, held.count if held is not None else 0, now)
        elif held is None:
            self._held[key] = _Held(count=1, latest=record, timer=loop.call_at(last + self.interval, self._flush, key))
        else:
            held.count += 1
            held.latest = record

    def forget(self, key: NotificationKey) -> None:
        """The notification is gone: nothing more to post about it."""
        self.forget_held(key)
        self._last_posted.pop(key, None)

    def forget_held(self, key: NotificationKey) -> None:
        held = self._held.pop(key, None)
        if held is not None and held.timer is not None:
            held.timer.cancel()

    def close(self) -> None:
        for key in list(self._held):
            self.forget(key)

    def _flush(self, key: NotificationKey) -> None:
        held = self._held.pop(key, None)
        if held is not None:
            self._emit(key, held.latest, held.count - 1, asyncio.get_running_loop().time())

    def _emit(self, key: NotificationKey, record: DeliveryRecord, others: int, now: float) -> None:
        self._last_posted[key] = now
        message = f"{record.event} event {record.event_id}, attempt {record.attempts}: {record.message}"
        if others:
            message += f" ({others} more failure{'s' if others > 1 else ''} since the last event)"
        self._post(key, 'Warning', REASONS[record.outcome], message, others + 1)
