"""
The routing table: (repository, event kind) to the notifications that want it.

``spec.repository`` is either one repository (``acme/web``) or a glob
(``acme/*``, ``*/web``, ``acme/web-*``). In a glob, ``*`` stands for any run of
characters inside one path component: it never crosses a ``/``, so ``acme/*``
matches ``acme/web`` but not ``acme/team/web`` (write ``acme/*/*`` for that).

Exact notifications are found with one dict access whatever their number.
Glob notifications are kept apart, per event kind and per literal first path
component: since ``*`` never crosses a ``/``, ``acme/*`` can only match
repositories in ``acme``, so it is checked (a precompiled regular expression)
only against those; a glob whose first component has a ``*`` (``*/web``) is
checked against every repository. Routing therefore costs the same with 100
or 100,000 notifications, as long as each organization has few globs. The
filters (refRegex, level, days) then run only on the notifications found.

Precedence: there is none. An event goes to *every* notification that matches
it, exact or glob, each exactly once: an exact ``acme/web`` notification and an
``acme/*`` notification on the same event are both delivered to, once each
(they are different resources with their own targets and status). A more
specific notification never hides a more general one; to stop one of them,
suspend it or narrow its pattern.

The front ends (kopf handlers, the standalone loader) keep the table in step
with the resources through :meth:`RoutingTable.put` and :meth:`RoutingTable.remove`.
"""
import re

from reponotify.events import Event
from reponotify.models import is_glob
from reponotify.notifications import Notification, NotificationKey

Route = tuple[str, str]  # (repository, event kind)
GlobBucket = tuple[str, str | None]  # (event kind, the glob's literal first path component, or None)
# A route's notifications, in the order they were put: a tuple while there are few (most routes have
# one, and a tuple is the smallest container: memory per notification), a dict by key past SMALL_ROUTE,
# so that putting or removing one on a route with thousands (a popular repository) costs what it does
# on a route with one. Measured with tuples only: 40,000 notifications on one route took 11 s to put,
# and removing 2,000 of them 21 s, all on the event loop.
RouteEntries = tuple[Notification, ...] | dict[NotificationKey, Notification]
SMALL_ROUTE = 8


def glob_regex(pattern: str) -> re.Pattern[str]:
    """The regular expression of a repository glob: ``*`` is any run of characters except ``/``."""
    return re.compile('[^/]*'.join(re.escape(part) for part in pattern.split('*')))


def glob_bucket(pattern: str, kind: str) -> GlobBucket:
    """Where a glob is kept: with its literal first path component, if it has one (``acme/*``: ``acme``)."""
    first = pattern.split('/', 1)[0]
    return kind, (None if '*' in first else first)


class RoutingTable:
    """Compiled notifications indexed by route (exact repositories), by glob bucket and by key."""

    def __init__(self) -> None:
        self._by_route: dict[Route, RouteEntries] = {}
        self._globs: dict[GlobBucket, dict[NotificationKey, tuple[re.Pattern[str], Notification]]] = {}
        self._by_key: dict[NotificationKey, Notification] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: NotificationKey) -> Notification | None:
        return self._by_key.get(key)

    def put(self, notification: Notification) -> None:
        """Add a notification, or replace the one with the same key (its route may change)."""
        self.remove(notification.key)
        if is_glob(notification.repository):
            entry = (glob_regex(notification.repository), notification)
            bucket = glob_bucket(notification.repository, notification.event)
            self._globs.setdefault(bucket, {})[notification.key] = entry
        else:
            self._add_to_route((notification.repository, notification.event), notification)
        self._by_key[notification.key] = notification

    def remove(self, key: NotificationKey) -> None:
        old = self._by_key.pop(key, None)
        if old is None:
            return
        if is_glob(old.repository):
            bucket = glob_bucket(old.repository, old.event)
            globs = self._globs[bucket]
            del globs[key]
            if not globs:
                del self._globs[bucket]
        else:
            self._remove_from_route((old.repository, old.event), key)

    def _add_to_route(self, route: Route, notification: Notification) -> None:
        entries = self._by_route.get(route, ())
        if isinstance(entries, dict):
            entries[notification.key] = notification
        elif len(entries) < SMALL_ROUTE:
            self._by_route[route] = (*entries, notification)
        else:
            self._by_route[route] = {entry.key: entry for entry in (*entries, notification)}

    def _remove_from_route(self, route: Route, key: NotificationKey) -> None:
        entries = self._by_route[route]
        if isinstance(entries, dict):
            del entries[key]
        else:
            entries = tuple(entry for entry in entries if entry.key != key)
            self._by_route[route] = entries
        if not entries:
            del self._by_route[route]

    def candidates(self, repository: str, kind: str) -> list[Notification]:
        """The notifications on a route, exact ones first, then matching globs; before filters."""
        entries = self._by_route.get((repository, kind), ())
        found = list(entries.values() if isinstance(entries, dict) else entries)
        if self._globs:
            for bucket in ((kind, repository.split('/', 1)[0]), (kind, None)):
                globs = self._globs.get(bucket)
                if globs:
                    found.extend(notification for regex, notification in globs.values()
                                 if regex.fullmatch(repository))
        return found

    def match(self, event: Event) -> list[Notification]:
        """The notifications that this event should be delivered to, filters applied."""
        return [n for n in self.candidates(event.repository, event.kind) if n.matches(event.payload)]

    def routes(self, notification: Notification, event: Event) -> bool:
        """Whether ``match(event)`` would give this notification (a routed one): its route and its filter."""
        if notification.event != event.kind:
            return False
        if is_glob(notification.repository):
            bucket = self._globs.get(glob_bucket(notification.repository, notification.event), {})
            entry = bucket.get(notification.key)
            if entry is None or not entry[0].fullmatch(event.repository):
                return False
        elif notification.repository != event.repository:
            return False
        return notification.matches(event.payload)
