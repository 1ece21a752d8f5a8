"""
The in-product inbox: what Quay shows its users as notifications.

The ``quay_notification`` method delivers here (and, in the operator, as a
Kubernetes Event on the resource). Each audience (``user``, ``team`` or
``org`` and a name) keeps its latest entries, newest first, bounded, served by
the receiver on ``GET /v1/inbox?kind=team&name=NAME``.
"""
import collections
import dataclasses
import datetime
from typing import Any

INBOX_SIZE = 50
TARGET_KINDS = ('user', 'team', 'org')


@dataclasses.dataclass(frozen=True)
class InboxEntry:
    event_id: str
    event: str
    repository: str
    summary: str
    level: str
    notification: str  # "namespace/name" of the notification that delivered it
    time: str = dataclasses.field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc)
                                  .strftime('%Y-%m-%dT%H:%M:%SZ'))

    def to_json(self) -> dict[str, Any]:
        return {'eventId': self.event_id, 'event': self.event, 'repository': self.repository,
                'summary': self.summary, 'level': self.level, 'notification': self.notification,
                'time': self.time}


class Inbox:
    """Latest entries per audience, newest first."""

    def __init__(self, size: int = INBOX_SIZE) -> None:
        self._size = size
        self._entries: dict[tuple[str, str], collections.deque[InboxEntry]] = {}

    def add(self, kind: str, name: str, entry: InboxEntry) -> None:
        entries = self._entries.setdefault((kind, name), collections.deque(maxlen=self._size))
        if not any(existing.event_id == entry.event_id and existing.notification == entry.notification
                   for existing in entries):  # a retried delivery is one notification, not two
            entries.appendleft(entry)

    def latest(self, kind: str, name: str) -> list[InboxEntry]:
        return list(self._entries.get((kind, name), ()))
