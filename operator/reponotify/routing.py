"""
The routing table: (repository, event kind) to the notifications that want it.

Lookup is one dict access whatever the number of notifications; the filters
(refRegex, level, days) then run only on the few notifications of that route.
The front ends (kopf handlers, the standalone loader) keep the table in step
with the resources through :meth:`RoutingTable.put` and :meth:`RoutingTable.remove`.
"""
from reponotify.events import Event
from reponotify.notifications import Notification, NotificationKey

Route = tuple[str, str]  # (repository, event kind)


class RoutingTable:
    """Compiled notifications indexed by route and by key."""

    def __init__(self) -> None:
        self._by_route: dict[Route, dict[NotificationKey, Notification]] = {}
        self._by_key: dict[NotificationKey, Notification] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: NotificationKey) -> Notification | None:
        return self._by_key.get(key)

    def put(self, notification: Notification) -> None:
        """Add a notification, or replace the one with the same key (its route may change)."""
        self.remove(notification.key)
        route = (notification.repository, notification.event)
        self._by_route.setdefault(route, {})[notification.key] = notification
        self._by_key[notification.key] = notification

    def remove(self, key: NotificationKey) -> None:
        old = self._by_key.pop(key, None)
        if old is not None:
            route = (old.repository, old.event)
            entries = self._by_route[route]
            del entries[key]
            if not entries:
                del self._by_route[route]

    def candidates(self, repository: str, kind: str) -> list[Notification]:
        """The notifications on a route, before filters."""
        return list(self._by_route.get((repository, kind), {}).values())

    def match(self, event: Event) -> list[Notification]:
        """The notifications that this event should be delivered to, filters applied."""
        return [n for n in self.candidates(event.repository, event.kind) if n.matches(event.payload)]
