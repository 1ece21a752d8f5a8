"""
The one small interface every delivery method implements.

A method has a name, a pydantic model of its ``spec.config`` (secret-bearing
fields declared in ``secret_fields`` may come from a Secret as ``<field>From``
and are held as ``SecretStr`` so that no repr, log or exception shows them),
and one coroutine that makes one delivery attempt and says how it went.

Retrying, counting failures and recording outcomes are the dispatcher's job,
not the method's: a method only reports whether a failure is worth retrying.
"""
import abc
import asyncio
import dataclasses
import datetime
import email.utils
import errno
import functools
import json
import re
import ssl as _ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar
from urllib.parse import urlsplit

import aiohttp
import pydantic
import yarl

from reponotify.events import Event
from reponotify.inbox import Inbox
from reponotify.targets import TargetRefused

DEFAULT_TIMEOUT = 10.0  # seconds, as Quay's NOTIFICATION_SEND_TIMEOUT


@dataclasses.dataclass(frozen=True)
class AttemptResult:
    """How one delivery attempt went."""
    ok: bool
    message: str
    code: int | None = None
    retryable: bool = True
    retry_after: float | None = None  # seconds, from the target's Retry-After


@dataclasses.dataclass(frozen=True)
class SmtpSettings:
    """The operator's one SMTP server, used by the e-mail method."""
    host: str | None = None
    port: int = 25
    security: str = 'none'  # none | starttls | tls
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    sender: str = 'reponotify@localhost'
    ca_file: str | None = None  # extra CA bundle to trust (self-hosted servers, tests)


@dataclasses.dataclass(frozen=True)
class MethodSettings:
    """Operator-wide settings of the methods (API base URLs, SMTP), from the command line."""
    flowdock_api_url: str = 'https://api.flowdock.com/v1/messages/team_inbox'
    hipchat_api_url: str = 'https://api.hipchat.com/v2'
    smtp: SmtpSettings = SmtpSettings()


# Posts a Kubernetes Event on a notification: (namespace, name, reason, message). Operator only.
Announce = Callable[[str, str, str, str], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class DeliveryContext:
    """What a method needs beyond its own config for one attempt."""
    http: aiohttp.ClientSession
    delivery_id: str  # stable across retries of the same delivery
    timeout: float = DEFAULT_TIMEOUT
    settings: MethodSettings = MethodSettings()
    notification: tuple[str, str] = ('', '')  # (namespace, name) of the notification delivered to
    inbox: Inbox | None = None
    announce: Announce | None = None


class MethodConfig(pydantic.BaseModel):
    """Base of the per-method config models."""
    model_config = pydantic.ConfigDict(extra='forbid', frozen=True)
    secret_fields: ClassVar[tuple[str, ...]] = ()


class Method(abc.ABC):
    """A way to deliver an event: webhook, Slack, e-mail, ..."""
    name: ClassVar[str]
    config_model: ClassVar[type[MethodConfig]]
    # Whether attempts may run in a delivery process (reponotify.delivery_processes): only the
    # method's config and the operator-wide settings are there, and the prepared target is pickled.
    runs_in_delivery_process: ClassVar[bool] = True

    def prepare(self, config: MethodConfig) -> Any:
        """Turn a validated config into what :meth:`deliver` uses (compiled once per resource version)."""
        return config

    def target_key(self, target: Any) -> str | None:
        """
        What identifies the target for the per-target concurrency limit (``--per-target``): the host
        the attempts go to, shared by every notification sending there; None: the notification itself.
        """
        return None

    @abc.abstractmethod
    async def deliver(self, target: Any, event: Event, context: DeliveryContext) -> AttemptResult:
        """Make one attempt; never raise for a delivery failure, report it."""


def url_target_key(url: str) -> str:
    """scheme://host:port of a URL, without credentials or path: one target for concurrency limits."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


def http_url(value: str) -> str:
    """Check that a URL is http(s) with a host; the error never repeats the URL (it may be secret)."""
    try:
        parts = urlsplit(value)
    except ValueError:  # urlsplit's messages quote the URL's netloc, credentials included
        raise ValueError("is not a valid URL") from None
    if parts.scheme not in ('http', 'https'):
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("must be a URL with a host name")
    try:
        port = parts.port  # read at every attempt (url_target_key): a bad one must be refused here
    except ValueError:  # "out of range", or not a number (the message quotes it)
        port = 0
    if port == 0:  # None: the scheme's own
        raise ValueError("has an invalid port (1 to 65535)")
    return value


async def post_json(
        context: DeliveryContext,
        url: str | yarl.URL,
        body: Any,
        *,
        headers: Mapping[str, str] | None = None,
        ssl: Any = True,
        what: str = 'target',
) -> AttemptResult:
    """
    POST a JSON body and classify the answer the way the dispatcher needs it.

    ``body`` is serialised with :func:`json.dumps`, unless it is ``bytes``:
    those are sent as they are (already serialised JSON, e.g. signed bytes).
    2xx succeeds. 408, 429, 5xx and transport errors are retried; other codes
    (redirects included: they are never followed) are final. Messages name the
    status code and ``what`` was called, never the URL, which may be a secret.
    A method that sends to one URL many times passes it parsed (``yarl.URL``): aiohttp then
    skips parsing it again, and what it derives from the URL stays cached on the object
    (measured: 7 us less CPU a request when every notification has a URL of its own).
    """
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    all_headers = {'Content-Type': 'application/json', **(headers or {})}
    try:
        async with context.http.post(
                url, data=data, headers=all_headers, ssl=ssl, allow_redirects=False,
                timeout=client_timeout(context.timeout),
        ) as response:
            await response.read()
            return classify_status(response.status, response.headers.get('Retry-After'), what=what)
    except TargetRefused as exc:
        return AttemptResult(ok=False, retryable=False, message=str(exc))
    except asyncio.TimeoutError:
        return AttemptResult(ok=False, message=f"{what} did not answer within {context.timeout:g}s")
    except aiohttp.ClientSSLError as exc:
        return AttemptResult(ok=False, message=f"TLS error talking to {what}: {_reason(exc)}")
    except aiohttp.ClientError as exc:
        tls_reason = _tls_reason(exc, url)
        if tls_reason:
            return AttemptResult(ok=False, message=f"TLS error talking to {what}: {tls_reason}")
        return AttemptResult(ok=False, message=f"could not reach {what}: {type(exc).__name__}: {_reason(exc)}")


@functools.lru_cache(maxsize=8)
def client_timeout(seconds: float) -> aiohttp.ClientTimeout:
    """aiohttp's timeout for an attempt of ``seconds``: one immutable object per value, not one per request."""
    return aiohttp.ClientTimeout(total=seconds)


def classify_status(status: int, retry_after: str | None, *, what: str) -> AttemptResult:
    if 200 <= status < 300:
        return AttemptResult(ok=True, code=status, message=f"{what} answered {status}")
    retryable = status in (408, 429) or status >= 500
    return AttemptResult(
        ok=False, code=status, retryable=retryable,
        retry_after=parse_retry_after(retry_after) if retryable else None,
        message=f"{what} answered {status}" + ("" if retryable else " (not retried)"),
    )


MAX_RETRY_AFTER = 24 * 3600.0  # seconds: a target asking for more (years, by mistake) gets a day


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), at most MAX_RETRY_AFTER."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit alone takes "²", which float() refuses
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return min(max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds()), MAX_RETRY_AFTER)


def _reason(exc: BaseException) -> str:
    # aiohttp puts the URL into some messages (ClientConnectorError's str has host:port, which is fine;
    # InvalidURL has the whole URL, which may carry credentials): name the class and the OS reason only.
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, _ssl.SSLError):
            return _ssl_text(exc.os_error)
        return exc.os_error.strerror or type(exc.os_error).__name__
    if isinstance(exc, aiohttp.InvalidURL):
        return "invalid URL"
    return str(exc).split(':', 1)[0] if str(exc) else type(exc).__name__


_SSL_TEXT = re.compile(r'^(?:\[[A-Z0-9_]+: [A-Z0-9_]+\] )?(?P<text>.*?)(?: \(_ssl\.c:\d+\))?$')


def _ssl_text(exc: _ssl.SSLError) -> str:
    """OpenSSL's words without the ``[SSL: CODE]`` prefix and ``(_ssl.c:N)`` suffix."""
    verify_message = getattr(exc, 'verify_message', None)  # only certificate verification errors have it
    text = str(verify_message and f"certificate verify failed: {verify_message}" or exc.strerror or exc)
    match = _SSL_TEXT.match(text)
    return match.group('text') if match and match.group('text') else text


def _tls_reason(exc: aiohttp.ClientError, url: str | yarl.URL) -> str | None:
    """
    Why a request failed at the TLS layer once connected, if it did.

    aiohttp reports a TLS alert received after the handshake (as TLS 1.3 servers send when a
    required client certificate is missing) as a ClientOSError caused by an SSLError. Some
    servers (asyncio's among them) drop the connection instead of sending the alert: over
    HTTPS a reset then most likely means the same, so say so.
    """
    causes = (exc, exc.__cause__, getattr(exc, 'os_error', None))
    for cause in causes:
        if isinstance(cause, _ssl.SSLError):
            return _ssl_text(cause)
    if urlsplit(str(url)).scheme == 'https' and any(
            isinstance(cause, ConnectionResetError) or getattr(cause, 'errno', None) == errno.ECONNRESET
            for cause in causes):
        return "connection reset (does the target require a TLS client certificate?)"
    return None
