"""
The engine: the core wired together, independent of any front end.

One :class:`Engine` owns the routing table, the outbox, the dispatcher and
the status book. Front ends (the kopf operator, the standalone mode) feed it
notifications and give it a status sink; the receiver feeds it events.
Unless turned off, it also holds e-mail to addresses not verified yet for
their repository (:mod:`reponotify.email_verification`).
"""
import asyncio
import dataclasses
import logging
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from reponotify.dispatcher import Dispatcher, DispatcherSettings
from reponotify.email_verification import EmailVerification, VerificationSettings, verification_page
from reponotify.events import PRIORITIES, Event, new_event, sample_payload
from reponotify.inbox import Inbox
from reponotify.metrics import Metrics
from reponotify.models import priority_level
from reponotify.notifications import Notification, NotificationKey
from reponotify.outbox import Accepted, Outbox, OutboxError
from reponotify.routing import RoutingTable
from reponotify.status import ReadyCondition, StatusBook, StatusFlusher, StatusSink, TransitionListener
from reponotify.verification import VerificationStoreError

logger = logging.getLogger(__name__)

__all__ = ['Accepted', 'Engine', 'EngineSettings']


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    dispatcher: DispatcherSettings = DispatcherSettings()
    status_interval: float = 1.0  # at most one status write per notification per this many seconds
    idempotency_window: float = 24 * 3600.0  # seconds an Idempotency-Key is remembered
    verification: VerificationSettings = VerificationSettings()  # of e-mail addresses


def accepted_condition(notification: Notification) -> ReadyCondition:
    return ReadyCondition('True', 'Accepted', f"Routing {notification.event} events of {notification.repository} "
                                              f"to {notification.method.name}")


def test_payload(notification: Notification) -> dict[str, Any]:
    """The sample payload for a notification's test, aimed at its repository (and level or days, as Quay does).

    For a glob notification (``acme/*``) the sample names a repository the glob matches (``acme/example``).
    """
    repository = notification.repository.replace('*', 'example').replace('?', 'x')
    payload = sample_payload(notification.event, repository)
    config = notification.spec.eventConfig
    if notification.event == 'vulnerability_found':
        level = priority_level(config.level) if config and config.level is not None else 0
        payload['vulnerability'] = {**payload['vulnerability'], 'priority': PRIORITIES[level or 0]}
    elif notification.event == 'repo_image_expiry' and config and config.days is not None:
        payload['expiring_in'] = f"{config.days} days"  # as Quay writes it, also for 1
    return payload


class Engine:
    """Routing, queueing, delivering and recording, for one process."""

    def __init__(self, settings: EngineSettings = EngineSettings(),
                 on_transition: TransitionListener | None = None,
                 outbox_path: pathlib.Path | str = ':memory:',
                 state_dir: pathlib.Path | str | None = None) -> None:
        """
        ``outbox_path``: the SQLite file of the durable outbox (front ends put it in the state folder).
        ``state_dir``: where other state (verified e-mail addresses) is kept; by default the outbox's
        folder, or nowhere (memory only) with an in-memory outbox.
        """
        self.settings = settings
        self.routing = RoutingTable()
        self.book = StatusBook(on_transition=on_transition)
        self.outbox = Outbox(outbox_path, idempotency_window=settings.idempotency_window)
        self.inbox = Inbox()
        self.dispatcher = Dispatcher(self.outbox, self.routing, self.book, settings.dispatcher, inbox=self.inbox)
        self.metrics = Metrics(pending=lambda: len(self.outbox), oldest_due=self.outbox.oldest_due,
                               states=self.book.ready_reasons)  # served on GET /metrics by the receiver
        self.dispatcher.metrics = self.metrics
        self.verification: EmailVerification | None = None
        if settings.verification.enabled:
            if state_dir is None and str(outbox_path) != ':memory:':
                state_dir = pathlib.Path(outbox_path).parent
            self.verification = EmailVerification(
                settings.verification, state_dir=state_dir, routing=self.routing, book=self.book,
                smtp=settings.dispatcher.methods.smtp, timeout=settings.dispatcher.timeout,
                on_verified=self._address_verified)
            self.dispatcher.gate = self.verification.gate
        self._flusher: StatusFlusher | None = None
        self._flusher_task: asyncio.Task[None] | None = None

    async def start(self, sink: StatusSink, *, hold_unhandled: float = 0.0) -> None:
        """
        Open the outbox and start delivering. ``hold_unhandled``: a front end that handles its
        notifications after this (the operator: kopf resumes the resources once it watches them)
        says for how long, at most, their pending deliveries wait for that (``Dispatcher.hold``).
        """
        if self.verification is not None:
            try:
                self.verification.open()
            except VerificationStoreError as exc:  # front ends report unusable state as they do the outbox's
                raise OutboxError(str(exc)) from None
        pending = await self.outbox.open()
        if pending:
            logger.info("Resuming %d pending deliveries from the outbox", pending)
            if hold_unhandled > 0:
                self.dispatcher.hold(self.outbox.pending_keys(), hold_unhandled)
        self._flusher = StatusFlusher(self.book, sink, min_interval=self.settings.status_interval)
        self._flusher_task = asyncio.create_task(self._flusher.run(), name='status-flusher')
        await self.dispatcher.start()
        if self.verification is not None:
            await self.verification.start()

    async def stop(self, grace: float = 0.0) -> None:
        """Stop delivering (in-flight attempts get ``grace`` seconds), write statuses, close the outbox."""
        if self.verification is not None:
            await self.verification.stop()
        await self.dispatcher.stop(grace)
        if self._flusher_task is not None:
            self._flusher_task.cancel()
            await asyncio.gather(self._flusher_task, return_exceptions=True)
        if self._flusher is not None:
            await self._flusher.flush(force=True)
        await self.outbox.close()

    async def flush_status(self, *keys: NotificationKey) -> None:
        """
        Write these notifications' statuses now (a front end, after handling their resources), or with
        no keys every pending status (at start-up). Other statuses keep to their interval.
        """
        if self._flusher is not None:
            await self._flusher.flush(force=not keys, now=keys)

    # -- notifications ---------------------------------------------------------------------------

    def put_notification(self, notification: Notification) -> None:
        self.routing.put(notification)

    def remove_notification(self, key: NotificationKey) -> None:
        self.routing.remove(key)
        self.dispatcher.forget(key)

    def admit(self, notification: Notification) -> None:
        """
        Route a compiled notification and set its Ready condition: Accepted, or (an e-mail
        address not verified yet for the repository) EmailNotVerified, sending a verification mail.
        """
        self.put_notification(notification)
        condition = self.verification.admit(notification) if self.verification is not None else None
        self.book.set_spec_condition(notification.key, condition or accepted_condition(notification),
                                     notification.generation)

    async def verify_address(self, token: str) -> tuple[int, str]:
        """Open a verification link: the HTTP status and the HTML page to answer."""
        return await verification_page(self.verification, token)

    async def _address_verified(self, keys: list[NotificationKey]) -> None:
        """An address was verified: its notifications are Accepted, their held deliveries go now."""
        for key in keys:
            notification = self.routing.get(key)
            if notification is not None:
                self.book.set_spec_condition(key, accepted_condition(notification), notification.generation)
        if keys:
            await self.outbox.make_due(keys)

    # -- events ----------------------------------------------------------------------------------

    async def ingest(self, kind: str, payload: Mapping[str, Any], *, idempotency_key: str | None = None,
                     claims: Sequence[str] = (), source: str = 'quay') -> Accepted:
        """Route an event and durably queue one delivery per matching notification (claims: Outbox.accept)."""
        event = new_event(kind, payload)
        keys = [notification.key for notification in self.routing.match(event)]
        accepted = await self.outbox.accept(event, keys, idempotency_key, claims)
        if not accepted.replayed and not accepted.taken:
            self.metrics.received(source, kind)  # source: the adapter it came through (metrics.SOURCES)
        return accepted

    async def send_test(self, key: NotificationKey, value: str) -> None:
        """
        Send the event's sample payload to one notification, as Quay's "Test Notification" does.

        It takes the normal path: filters apply (a sample that ``eventConfig`` rejects is not
        sent) and a disabled notification drops it. The outcome lands in ``status.lastTest``.
        """
        notification = self.routing.get(key)
        if notification is None:
            self.book.start_test(key, value, None, 'NotRouted',
                                 "Not sent: the notification is not ready (see its Ready condition)")
            return
        event = new_event(notification.event, test_payload(notification))
        if not notification.matches(event.payload):
            self.book.start_test(key, value, event.id, 'Filtered',
                                 "Not sent: the sample event does not pass spec.eventConfig (filters apply to "
                                 "tests, as in Quay)")
            return
        self.book.start_test(key, value, event.id, 'Queued', "Sample event queued")
        await self.enqueue(event, only=key)
        self.metrics.received('test', event.kind)

    def reset(self, key: NotificationKey) -> None:
        """Zero the failure count and re-enable a disabled notification."""
        self.book.reset(key)

    async def enqueue(self, event: Event, only: NotificationKey | None = None) -> int:
        """Queue deliveries of an event to its matching notifications (or to one of them)."""
        keys = [n.key for n in self.routing.match(event) if only is None or n.key == only]
        accepted = await self.outbox.accept(event, keys)
        return accepted.matched
