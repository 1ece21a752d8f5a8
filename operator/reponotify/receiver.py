"""
The receiver: the HTTP service that takes repository events in.

``POST /v1/events/{event}`` takes a Quay event payload and answers
``202 {"id", "matched"}`` once its deliveries are queued. Bad input gets a
precise JSON error and changes nothing:

=====  ==========================================================
 401   no or wrong credentials, when a token or an HMAC secret is configured
 404   an unknown event name (or an unknown path)
 413   a body over the limit (1 MiB by default)
 408   a body that does not arrive within the read timeout
 503   the receiver is shutting down (``Retry-After`` says when to retry)
 400   malformed JSON, or a bad ``Idempotency-Key``
 422   valid JSON that is not a Quay payload (no ``repository``, ...)
=====  ==========================================================

Also ``GET /v1/inbox?kind=&name=`` (the quay_notification inbox),
``GET /v1/verify/<token>`` (the link of an e-mail verification mail: an HTML
page, 200, or 410 for a used or expired link, 404 for an unknown one),
``GET /healthz``, ``GET /readyz`` and ``GET /metrics`` (Prometheus); front ends may add routes (the
standalone mode adds ``/v1/notifications`` and its test and reset buttons).
"""
import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from reponotify.config import ReceiverSettings
from reponotify.email_verification import PAGE_HEADERS, VERIFY_PATH
from reponotify.engine import Engine
from reponotify.events import EVENT_KINDS, EVENT_NAMES
from reponotify.inbox import TARGET_KINDS
from reponotify.models import REPOSITORY_PATTERN

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
MAX_IDEMPOTENCY_KEY = 255
_REPOSITORY = re.compile(REPOSITORY_PATTERN)

DEFAULT_READ_TIMEOUT = 10.0  # seconds to receive a whole request body


@dataclasses.dataclass(frozen=True)
class Auth:
    """How event endpoints authenticate: a bearer token, an HMAC of the body, either, or none."""
    token: str | None = None
    hmac_secret: str | None = dataclasses.field(default=None, repr=False)

    @property
    def required(self) -> bool:
        return bool(self.token or self.hmac_secret)

    def bearer_ok(self, request: web.Request) -> bool:
        scheme, _, given = request.headers.get('Authorization', '').partition(' ')
        return bool(self.token) and scheme.lower() == 'bearer' and hmac.compare_digest(
            as_bytes(given.strip()), (self.token or '').encode())

    def signature_ok(self, request: web.Request, body: bytes) -> bool:
        """``X-Signature: sha256=<hex HMAC-SHA256 of the body>``, compared in constant time."""
        if not self.hmac_secret:
            return False
        expected = 'sha256=' + hmac.new(self.hmac_secret.encode(), body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(as_bytes(request.headers.get('X-Signature', '').strip()), expected.encode())


def as_bytes(given: str) -> bytes:
    """
    A header's (or query's) text as the bytes that came: aiohttp decodes invalid UTF-8 to lone
    surrogates (surrogateescape), which a plain ``encode()`` refuses with an error (a 500).
    """
    return given.encode('utf-8', 'surrogateescape')


def idempotency_key_problem(key: str | None) -> str | None:
    """Why an ``Idempotency-Key`` header cannot be used, or None (no header, or a usable one)."""
    if key is None or (0 < len(key) <= MAX_IDEMPOTENCY_KEY and key.isascii() and key.isprintable()):
        return None
    return f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"


def quay_key(key: str | None) -> str | None:
    """
    An ``Idempotency-Key`` of Quay's events as the outbox keeps it: the same on ``/v1/events`` and on
    ``/v1/sources/quay`` (the same events), and apart from the other sources' keys
    ("distribution:event:<id>"), so that a client's key cannot claim a registry's event.
    """
    return None if key is None else f'quay:{key}'


UNAUTHORIZED = "missing or wrong credentials (Authorization: Bearer <token>, or X-Signature: sha256=<hmac>)"


@dataclasses.dataclass
class ReceiverState:
    accepting: bool = True  # False while shutting down: event endpoints answer 503


ENGINE: web.AppKey[Engine] = web.AppKey('engine', Engine)
AUTH: web.AppKey[Auth] = web.AppKey('auth', Auth)
STATE: web.AppKey[ReceiverState] = web.AppKey('state', ReceiverState)
READ_TIMEOUT: web.AppKey[float] = web.AppKey('read_timeout', float)


class Rejection(web.Response):
    """A JSON error refusing an event, with the reason it is counted under (metrics.REJECTION_REASONS)."""

    def __init__(self, reason: str, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(text=json.dumps({'error': message}), status=status, content_type='application/json',
                         headers=headers)
        self.rejection = reason


def error(status: int, message: str, reason: str | None = None) -> web.Response:
    """A JSON error; with a ``reason``, it counts as a rejected event."""
    if reason is not None:
        return Rejection(reason, status, message)
    return web.json_response({'error': message}, status=status)


def shutting_down() -> web.Response:
    return Rejection('shutting_down', 503, "shutting down: not accepting events; retry shortly",
                     headers={'Retry-After': '5'})


async def get_metrics(request: web.Request) -> web.Response:
    """Prometheus metrics (text format, or OpenMetrics when the scraper asks for it)."""
    body, content_type = request.app[ENGINE].metrics.exposition(request.headers.get('Accept'))
    return web.Response(body=body, headers={'Content-Type': content_type})


@web.middleware
async def json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
    """
    Every error is a JSON body, including aiohttp's own (404 for unknown paths, 405, 413), and every
    refused event request is counted by its reason (reponotify_events_rejected_total).

    One middleware for both: each one wraps every request, events included.
    """
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        messages = {
            404: f"no such endpoint: {request.method} {request.path}",
            405: f"method {request.method} is not allowed on {request.path}",
            413: f"request body is larger than {MAX_BODY_BYTES} bytes",
        }
        response = error(exc.status, messages.get(exc.status, exc.reason),
                         'too_large' if exc.status == 413 else None)  # only bodies read raise 413: events'
    if isinstance(response, Rejection):
        request.app[ENGINE].metrics.rejected(response.rejection)
    return response


def authorized(request: web.Request, body: bytes = b'') -> bool:
    """Whether a request carries the configured credentials (always, when none are configured)."""
    auth = request.app[AUTH]
    return not auth.required or auth.bearer_ok(request) or auth.signature_ok(request, body)


async def read_body(request: web.Request) -> bytes | web.Response:
    """The whole body, or the error response: 413 past the limit, 408 when it trickles in too slowly."""
    if (request.content_length or 0) > MAX_BODY_BYTES:
        return error(413, f"request body is larger than {MAX_BODY_BYTES} bytes", 'too_large')
    try:
        if request.content.is_eof():  # all of it arrived with the headers (most events): nothing to wait for
            return await request.read()  # past client_max_size, aiohttp raises 413 here too
        async with asyncio.timeout(request.app[READ_TIMEOUT]):
            return await request.read()  # aiohttp raises 413 past client_max_size without Content-Length
    except TimeoutError:
        return error(408, f"request body not received within {request.app[READ_TIMEOUT]:g}s", 'timeout')
    except RequestPayloadError:  # the Content-Encoding (gzip, deflate) does not decode
        encoding = request.headers.get('Content-Encoding', '')[:50]
        answer = error(400, f"request body could not be decoded (Content-Encoding: {encoding})", 'malformed_json')
        # Done with this body and this connection: aiohttp would otherwise read the rest of the body after
        # the answer (to keep the connection), fail again, and log that as an unhandled exception.
        request.content.feed_eof()
        answer.force_close()
        return answer


async def post_event(request: web.Request) -> web.Response:
    if not request.app[STATE].accepting:
        return shutting_down()
    auth = request.app[AUTH]
    if auth.required and not auth.hmac_secret and not auth.bearer_ok(request):
        return error(401, UNAUTHORIZED, 'unauthorized')  # no need to read the body of a request that cannot be right
    kind = request.match_info['event']
    if kind not in EVENT_KINDS:
        return error(404, f"unknown event {kind!r}; known events: {', '.join(EVENT_NAMES)}", 'unknown_event')
    idempotency_key = request.headers.get('Idempotency-Key')
    problem = idempotency_key_problem(idempotency_key)
    if problem:
        return error(400, problem, 'bad_idempotency_key')

    body = await read_body(request)
    if isinstance(body, web.Response):
        return body
    if not authorized(request, body):
        return error(401, UNAUTHORIZED, 'unauthorized')
    payload = parse_json(body)
    if isinstance(payload, web.Response):
        return payload
    problem = payload_problem(payload)
    if problem:
        return error(422, problem, 'invalid_payload')

    accepted = await request.app[ENGINE].ingest(kind, payload, idempotency_key=quay_key(idempotency_key))
    headers = {'Idempotent-Replayed': 'true'} if accepted.replayed else None
    return web.json_response({'id': accepted.id, 'matched': accepted.matched}, status=202, headers=headers)


def parse_json(body: bytes) -> Any:
    """The parsed body, or the 400 answer saying why it is not JSON (or no text: an unpaired surrogate)."""
    try:  # as json.loads(body) does, with one decoder for every request instead of one per call
        text = body.decode(json.detect_encoding(body), 'surrogatepass')
        parsed = _DECODER.decode(text)
        if _SURROGATE.search(text):  # rare (most text has none): only then look at every string
            json.dumps(parsed, ensure_ascii=False).encode()  # a lone surrogate cannot be encoded
        return parsed
    except UnicodeEncodeError as exc:
        return error(400, f"body is not valid JSON: a string holds an unpaired surrogate "
                          f"({ascii(exc.object[exc.start])[1:-1]}), not a character", 'malformed_json')
    except (ValueError, RecursionError) as exc:
        return error(400, f"body is not valid JSON: {exc}" if isinstance(exc, ValueError)
                     else "body is not valid JSON: nested too deeply", 'malformed_json')


def _not_json(constant: str) -> Any:
    # Python's json accepts NaN and Infinity; they are not JSON (RFC 8259), and forwarding them
    # would send invalid JSON to webhook targets.
    raise ValueError(f"{constant} is not a JSON value")


def _finite(number: str) -> float:
    # 1e999 is valid JSON, but Python reads it as infinity, which json.dumps writes as Infinity: not JSON.
    value = float(number)
    if math.isinf(value):
        raise ValueError(f"number {number[:50]} is out of range")
    return value


_DECODER = json.JSONDecoder(parse_constant=_not_json, parse_float=_finite)
# Where a lone surrogate may hide: an escape of one (\ud800 to \udfff, alone or in a valid pair), or
# one decoded from the body's bytes (surrogatepass, as json.loads does).
_SURROGATE = re.compile(r'\\u[dD][89a-fA-F]|[\ud800-\udfff]')


def payload_problem(payload: Any) -> str | None:
    """Why a parsed body is not a usable Quay payload, or None if it is."""
    if not isinstance(payload, Mapping):
        return f"body must be a JSON object (a Quay event payload), not {type(payload).__name__}"
    if 'repository' not in payload:
        return "payload has no 'repository' field (expected \"namespace/name\")"
    repository = payload['repository']
    if not isinstance(repository, str):
        return f"payload field 'repository' must be a string \"namespace/name\", not {type(repository).__name__}"
    if not _REPOSITORY.fullmatch(repository):  # fullmatch: "$" alone would let a trailing newline in
        return f"payload field 'repository' must look like \"namespace/name\" (lowercase), got {repository[:300]!r}"
    return None


async def get_inbox(request: web.Request) -> web.Response:
    """The latest quay_notification entries for one audience, newest first."""
    if not authorized(request):
        return error(401, UNAUTHORIZED)
    kind, name = request.query.get('kind'), request.query.get('name')
    if kind not in TARGET_KINDS or not name:
        return error(400, f"query must name an audience: ?kind=<{'|'.join(TARGET_KINDS)}>&name=<name>")
    entries = request.app[ENGINE].inbox.latest(kind, name)
    return web.json_response({'kind': kind, 'name': name, 'items': [entry.to_json() for entry in entries]})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({'status': 'ok'})


async def verify_address(request: web.Request) -> web.Response:
    """The link of a verification mail: verifies an e-mail address, answers a small HTML page."""
    status, page = await request.app[ENGINE].verify_address(request.match_info['token'])
    return web.Response(status=status, text=page, content_type='text/html', charset='utf-8', headers=PAGE_HEADERS)


def make_app(engine: Engine, *, token: str | None = None, hmac_secret: str | None = None,
             read_timeout: float = DEFAULT_READ_TIMEOUT) -> web.Application:
    """The receiver application; the caller runs it (see :func:`serve`)."""
    app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY_BYTES)
    app[ENGINE] = engine
    app[AUTH] = Auth(token=token or None, hmac_secret=hmac_secret or None)
    app[STATE] = ReceiverState()
    app[READ_TIMEOUT] = read_timeout
    app.router.add_post('/v1/events/{event}', post_event)
    sources.add_routes(app)  # /v1/sources/<registry>: the registry adapters (reponotify.sources)
    app.router.add_get('/v1/inbox', get_inbox)
    app.router.add_get('/healthz', healthz)
    app.router.add_get('/readyz', healthz)
    app.router.add_get('/metrics', get_metrics)
    # No token: the link comes from a mail. No HEAD: a link checker's HEAD must not use the link up.
    app.router.add_get(VERIFY_PATH + '{token}', verify_address, allow_head=False)
    return app


def make_receiver(engine: Engine, settings: ReceiverSettings) -> web.Application:
    """The receiver application configured from the command line's settings."""
    app = make_app(engine, token=settings.token, hmac_secret=settings.hmac_secret,
                   read_timeout=settings.read_timeout)
    sources.configure(app, settings.sources)
    return app


async def shut_down(app: web.Application, runner: web.AppRunner, grace: float) -> None:
    """Graceful stop: answer 503 to new events, let attempts in flight finish within ``grace``, stop."""
    app[STATE].accepting = False
    await app[ENGINE].stop(grace)
    await runner.cleanup()


# Connections the kernel holds for the receiver while it is busy (aiohttp's default: 128). A burst of
# new connections beyond it, from a registry's retries or many pushes at once, has its SYNs dropped,
# and each of those clients waits a second or more before trying again (measured with the
# benchmark's open-loop client, 1,000 requests/s to a server on that default stalled for 0.4 s: the
# last answers came 1.6 s late; 0.43 s with a larger backlog). The kernel caps it at
# net.core.somaxconn (4096 on current kernels).
LISTEN_BACKLOG = 1024


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start serving; stop with ``await runner.cleanup()``."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG)
    await site.start()
    logger.info("Receiver listening on %s:%s", host, port)
    return runner


from reponotify import sources  # noqa: E402  (last: reponotify.sources imports the names above)
