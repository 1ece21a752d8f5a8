"""
E-mail address verification, as Quay requires: an address gets event mail for a
repository only once someone holding that address has opened a link sent to it.

For an ``email`` notification whose (repository, address) is not verified yet:

1. When the front end admits it (:meth:`EmailVerification.admit`), its ``Ready``
   condition is ``False`` with reason ``EmailNotVerified`` (the message says to whom
   the mail went and what to do), and ONE verification mail is sent, through the
   e-mail method's SMTP settings, with a link to ``<public-url>/v1/verify/<token>``.
   Only one: a new mail goes out only when no mailed link for the pair is still open
   (:meth:`~reponotify.verification.VerificationStore.open_request`), so reconciles
   and restarts do not mail again. A send that fails is retried with backoff.
2. Its events are accepted and queued as usual (202, counted in ``matched``, durable
   in the outbox). Before each attempt the dispatcher asks :meth:`EmailVerification.gate`:
   a delivery to an unverified address is held (postponed, checked again every
   ``hold_interval``), up to ``hold_max_age`` after the event was received; older, it
   is recorded ``Dropped`` with a message saying why.
3. Opening the link (:func:`verification_page`, served by the receiver) verifies the
   pair: every notification naming it becomes ``Ready=True Accepted`` and its held
   deliveries are made due at once.

The store of tokens and verified pairs (:mod:`reponotify.verification`) lives in the
state folder; ``--no-email-verification`` turns all of this off.
"""
import asyncio
import dataclasses
import datetime
import email.message
import email.utils
import logging
import pathlib
import time
import uuid
from collections.abc import Awaitable, Callable


from reponotify.dispatcher import Hold
from reponotify.messages import LAYOUTS
from reponotify.methods.base import SmtpSettings
from reponotify.methods.email import POLICY, EmailTarget, message_id, send_mail, sender_address, single_line
from reponotify.notifications import Notification, NotificationKey
from reponotify.outbox import PendingDelivery
from reponotify.routing import RoutingTable
from reponotify.status import ReadyCondition, StatusBook
from reponotify.verification import DEFAULT_TTL, VerificationError, VerificationStore, Verified, normalise_address

logger = logging.getLogger(__name__)

REASON = 'EmailNotVerified'
VERIFY_PATH = '/v1/verify/'
DEFAULT_HOLD_MAX_AGE = 24 * 3600.0
FINAL_FAILURE_PAUSE = 3600.0  # seconds before a verification mail that failed for good is tried again

Pair = tuple[str, str]  # (repository, address as compared)


@dataclasses.dataclass(frozen=True)
class VerificationSettings:
    enabled: bool = True
    public_url: str | None = None  # the receiver's base URL as mail recipients reach it, for the link
    hold_max_age: float = DEFAULT_HOLD_MAX_AGE  # seconds an event waits for its address to be verified
    link_ttl: float = DEFAULT_TTL  # seconds a verification link works
    hold_interval: float = 60.0  # seconds between checks of a held delivery (a verification wakes it at once)
    retry_schedule: tuple[float, ...] = (30.0, 300.0, 1800.0, 7200.0)  # resending a mail that could not be sent


@dataclasses.dataclass(frozen=True)
class _Failure:
    message: str
    at: float
    retry_at: float | None  # the next try of the running request, or None: given up for FINAL_FAILURE_PAUSE




def format_time(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')


def format_duration(seconds: float) -> str:
    """``86400`` -> ``24h``, ``300`` -> ``5m``, ``1.5`` -> ``1.5s``."""
    for unit, size in (('h', 3600), ('m', 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def verification_link(public_url: str, token: str) -> str:
    return public_url.rstrip('/') + VERIFY_PATH + token


def build_verification_mail(*, sender: str, recipient: str, repository: str, link: str, expires: float,
                            notifications: list[str], hold_max_age: float,
                            date: datetime.datetime | None = None) -> email.message.EmailMessage:
    """
    The verification mail (raises ValueError if ``sender`` is not one address).

    ``notifications`` ("namespace/name") are the ones asking, named so that the recipient
    knows whom to ask about them. The plain part is written here (no escaping to undo);
    the HTML part is an autoescaped template.
    """
    which = (f"the repository notification {notifications[0]}" if len(notifications) == 1 else
             f"the repository notifications {', '.join(notifications)}")
    values = {
        'repository': repository, 'recipient': recipient, 'link': link, 'expires': format_time(expires),
        'which': which, 'hold_max_age': format_duration(hold_max_age),
    }
    plain = (
        f"reponotify was asked to mail notifications of events in the repository {repository} to {recipient} "
        f"({which}).\n"
        f"\n"
        f"Before it mails any, it needs to know that this address wants them. To confirm, open this link "
        f"(it works once, until {values['expires']}):\n"
        f"\n"
        f"{link}\n"
        f"\n"
        f"Until then nothing is mailed to this address: events wait for at most {values['hold_max_age']}, "
        f"then they are dropped.\n"
        f"\n"
        f"If you did not expect this mail, ignore it: unless the link is opened, no notification is mailed "
        f"to you.\n"
    )
    mail = email.message.EmailMessage(policy=POLICY)
    mail['Subject'] = f"Verify your e-mail address for notifications of {single_line(repository)}"
    mail['From'] = sender
    mail['To'] = recipient
    mail['Date'] = email.utils.format_datetime(date or datetime.datetime.now(datetime.timezone.utc))
    mail['Message-ID'] = message_id(f'verify-{uuid.uuid4()}', sender_address(mail))
    mail['Auto-Submitted'] = 'auto-generated'
    mail['X-Reponotify-Repository'] = single_line(repository)
    mail.set_content(plain, subtype='plain', charset='utf-8')
    mail.add_alternative(LAYOUTS.get_template('verification_mail.html').render(values), subtype='html',
                         charset='utf-8')
    for part in mail.iter_parts():
        del part['MIME-Version']
    return mail


class EmailVerification:
    """The gate, the verification mails and the conditions they imply, for one engine."""

    def __init__(self, settings: VerificationSettings, *, state_dir: pathlib.Path | str | None,
                 routing: RoutingTable,
                 book: StatusBook, smtp: SmtpSettings, timeout: float,
                 on_verified: Callable[[list[NotificationKey]], Awaitable[None]],
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._state_dir = state_dir
        self._routing = routing
        self._book = book
        self._smtp = smtp
        self._timeout = timeout
        self._on_verified = on_verified
        self.clock = clock  # replaceable before start (tests)
        self.store: VerificationStore | None = None  # loaded by open()
        self._wanted: dict[Pair, set[NotificationKey]] = {}  # notifications that named the pair
        self._requests: dict[Pair, asyncio.Task[None]] = {}  # verification mails being sent
        self._failures: dict[Pair, _Failure] = {}
        self._running = False

    # -- lifecycle -------------------------------------------------------------------------------

    def open(self) -> None:
        """Load the store (raises VerificationStoreError, naming the file, if it cannot be used)."""
        if self.store is None:
            self.store = VerificationStore(self._state_dir, ttl=self.settings.link_ttl, clock=self.clock)

    async def start(self) -> None:
        """Settle what was admitted before the store was loaded, and send the mails that are due."""
        self.open()
        self._running = True
        for pair in sorted(self._wanted):
            if self._is_verified(pair):
                await self._on_verified(self._keys(pair))
            else:
                self._update_conditions(pair)
                self._ensure(pair)

    async def stop(self) -> None:
        self._running = False
        tasks = list(self._requests.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- what the engine asks ----------------------------------------------------------------------

    def admit(self, notification: Notification) -> ReadyCondition | None:
        """The condition of a notification being routed: None if nothing waits for a verification."""
        pair = self._pair(notification)
        if pair is None or self._is_verified(pair):
            return None
        self._wanted.setdefault(pair, set()).add(notification.key)
        self._ensure(pair)
        return self._condition(pair)

    def gate(self, notification: Notification, delivery: PendingDelivery) -> Hold | None:
        """The dispatcher's question before an attempt: hold mails to an unverified address."""
        pair = self._pair(notification)
        if pair is None or self._is_verified(pair):
            return None
        repository, address = pair
        if notification.key not in self._wanted.setdefault(pair, set()):
            self._wanted[pair].add(notification.key)
        age = self.clock() - delivery.event.received_at.timestamp()
        max_age = self.settings.hold_max_age
        if age >= max_age:
            return Hold(drop=True, message=(
                f"Dropped: {address} was not verified for {repository} within {format_duration(max_age)} of the "
                f"event (events wait that long for the link in the verification mail to be opened)"))
        self._ensure(pair)
        return Hold(message=f"Held until {address} is verified for {repository}",
                    delay=max(0.0, min(self.settings.hold_interval, max_age - age)))

    async def verify(self, token: str) -> Verified:
        """Use a link's token (raises VerificationError); the pair's notifications become Accepted."""
        self.open()
        assert self.store is not None
        verified = self.store.verify(token)
        pair = (verified.repository, verified.address)
        self._failures.pop(pair, None)
        request = self._requests.get(pair)
        if request is not None:
            request.cancel()  # a resend waiting for its retry: no longer needed
        logger.info("%s verified for notifications of %s", verified.address, verified.repository)
        await self._on_verified(self._keys(pair))
        return verified

    # -- internals -------------------------------------------------------------------------------

    @staticmethod
    def _pair(notification: Notification) -> Pair | None:
        if notification.method.name != 'email' or not isinstance(notification.target, EmailTarget):
            return None
        return notification.repository, normalise_address(notification.target.recipient)

    def _is_verified(self, pair: Pair) -> bool:
        return self.store is not None and self.store.is_verified(*pair)

    def _keys(self, pair: Pair) -> list[NotificationKey]:
        """The notifications routed now that name the pair (forgetting those that no longer do)."""
        keys = self._wanted.get(pair, set())
        for key in list(keys):
            notification = self._routing.get(key)
            if notification is None or self._pair(notification) != pair:
                keys.discard(key)
        if not keys:
            self._wanted.pop(pair, None)
        return sorted(keys)

    def _ensure(self, pair: Pair) -> None:
        """Start sending a verification mail for the pair, unless one is open, on its way or pointless."""
        if not self._running or self.store is None or not self.settings.public_url or pair in self._requests:
            return
        if self.store.is_verified(*pair) or self.store.open_request(*pair) is not None:
            return
        failure = self._failures.get(pair)
        if failure is not None and self.clock() < failure.at + FINAL_FAILURE_PAUSE:
            return
        self._failures.pop(pair, None)
        task = asyncio.get_running_loop().create_task(self._request(pair), name=f'verify-{pair[1]}')
        self._requests[pair] = task
        task.add_done_callback(lambda _: self._requests.pop(pair, None))

    async def _request(self, pair: Pair) -> None:
        """Mail one verification link for the pair, retrying a failed send on the schedule."""
        assert self.store is not None and self.settings.public_url
        repository, address = pair
        token = self.store.issue(repository, address)
        link = verification_link(self.settings.public_url, token)
        expires = self.clock() + self.settings.link_ttl
        attempts = 0
        while True:
            keys = self._keys(pair)
            if not keys or self.store.is_verified(*pair):
                return  # nothing names the pair any more, or it was verified meanwhile
            try:
                mail = build_verification_mail(
                    sender=self._smtp.sender, recipient=address, repository=repository, link=link,
                    expires=expires, notifications=[str(key) for key in keys],
                    hold_max_age=self.settings.hold_max_age)
            except ValueError as exc:
                result_ok, retryable, message = False, False, f"cannot build the mail: {exc}"
            else:
                result = await send_mail(mail, address, self._smtp, self._timeout)
                result_ok, retryable, message = result.ok, result.retryable, result.message
            attempts += 1
            now = self.clock()
            if result_ok:
                self.store.mark_sent(token)
                self._failures.pop(pair, None)
                logger.info("Sent a verification mail to %s for notifications of %s", address, repository)
                self._update_conditions(pair)
                return
            schedule = self.settings.retry_schedule
            if retryable and attempts <= len(schedule):
                delay = schedule[attempts - 1]
                self._failures[pair] = _Failure(message, now, now + delay)
                logger.warning("Could not send the verification mail to %s (retrying in %s): %s", address,
                               format_duration(delay), message)
                self._update_conditions(pair)
                await asyncio.sleep(delay)
                continue
            self._failures[pair] = _Failure(message, now, None)
            logger.warning("Could not send the verification mail to %s: %s", address, message)
            self._update_conditions(pair)
            return

    def _update_conditions(self, pair: Pair) -> None:
        if self._is_verified(pair):
            return
        condition = self._condition(pair)
        for key in self._keys(pair):
            notification = self._routing.get(key)
            assert notification is not None
            self._book.set_spec_condition(key, condition, notification.generation)

    def _condition(self, pair: Pair) -> ReadyCondition:
        repository, address = pair
        held = (f"Its events are held until then (each for at most {format_duration(self.settings.hold_max_age)}) "
                f"and delivered once it is verified.")
        request = self.store.open_request(*pair) if self.store is not None else None
        failure = self._failures.get(pair)
        if not self.settings.public_url:
            message = (f"{address} is not verified for {repository}, and no verification mail can be sent: "
                       f"reponotify has no --public-url (its receiver's address as the recipient reaches it, "
                       f"for the link). Set it, or turn verification off with --no-email-verification. "
                       f"Events are held for at most {format_duration(self.settings.hold_max_age)}.")
        elif request is not None:
            message = (f"{address} is not verified for {repository}: a verification mail was sent to {address} "
                       f"at {format_time(request.sent)}; open the link in it (valid until "
                       f"{format_time(request.expires)}) to receive these notifications. {held}")
        elif failure is not None:
            then = (f"retrying at {format_time(failure.retry_at)}" if failure.retry_at is not None else
                    f"tried again with the next event or change of the notification after "
                    f"{format_time(failure.at + FINAL_FAILURE_PAUSE)}")
            message = (f"{address} is not verified for {repository}, and the verification mail could not be sent "
                       f"to it: {failure.message}; {then}. {held}")
        else:
            message = (f"{address} is not verified for {repository}: sending it a verification mail; open the "
                       f"link in it to receive these notifications. {held}")
        return ReadyCondition('False', REASON, message)


# -- the page behind the link -----------------------------------------------------------------------

PAGE_HEADERS = {
    'Cache-Control': 'no-store',
    'Content-Security-Policy': "default-src 'none'; style-src 'unsafe-inline'",
    'Referrer-Policy': 'no-referrer',
    'X-Content-Type-Options': 'nosniff',
    'X-Frame-Options': 'DENY',
}

_HINTS = {
    VerificationError.EXPIRED: "A new link is mailed when the next event for the notification arrives, when the "
                               "notification changes, or when reponotify restarts.",
    VerificationError.ALREADY_USED: "If it verified the address, notifications are on their way: there is nothing "
                                    "more to do.",
    VerificationError.UNKNOWN: "Copy the whole link from the mail; if several mails came, use the newest one.",
}


async def verification_page(verification: EmailVerification | None, token: str) -> tuple[int, str]:
    """The HTTP status and HTML page answering ``GET /v1/verify/<token>``."""
    page = LAYOUTS.get_template('verification_page.html')
    if verification is None:
        return 404, page.render(ok=False, title="Nothing to verify",
                                message="E-mail address verification is turned off on this reponotify.", hint='')
    try:
        verified = await verification.verify(token)
    except VerificationError as exc:
        status = 404 if exc.reason == VerificationError.UNKNOWN else 410
        title = {VerificationError.EXPIRED: "Link expired", VerificationError.ALREADY_USED: "Link already used",
                 VerificationError.UNKNOWN: "Unknown link"}[exc.reason]
        message = str(exc)
        return status, page.render(ok=False, title=title, message=message[:1].upper() + message[1:] + '.',
                                   hint=_HINTS[exc.reason])
    return 200, page.render(ok=True, title="Address verified", address=verified.address,
                            repository=verified.repository, message='', hint='')
