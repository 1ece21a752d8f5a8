"""
The receiver: the HTTP service that takes repository events in.

``POST /v1/events/{event}`` takes a Quay event payload and answers
``202 {"id", "matched"}`` once its deliveries are queued. Bad input gets a
precise JSON error and changes nothing:

=====  ==========================================================
 401   no token, or the wrong one (when a token is configured)
 404   an unknown event name (or an unknown path)
 413   a body over the limit (1 MiB by default)
 400   malformed JSON, or a bad ``Idempotency-Key``
 422   valid JSON that is not a Quay payload (no ``repository``, ...)
=====  ==========================================================

Also ``GET /healthz`` and ``GET /readyz``; front ends may add routes (the
standalone mode adds ``GET /v1/notifications``).
"""
import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from reponotify.engine import Engine
from reponotify.events import EVENT_KINDS, EVENT_NAMES
from reponotify.models import REPOSITORY_PATTERN

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
MAX_IDEMPOTENCY_KEY = 255
_REPOSITORY = re.compile(REPOSITORY_PATTERN)

ENGINE: web.AppKey[Engine] = web.AppKey('engine', Engine)
TOKEN: web.AppKey[str | None] = web.AppKey('token', str)


def error(status: int, message: str) -> web.Response:
    return web.json_response({'error': message}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
    """Every error is a JSON body, including aiohttp's own (404 for unknown paths, 405, 413)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        messages = {
            404: f"no such endpoint: {request.method} {request.path}",
            405: f"method {request.method} is not allowed on {request.path}",
            413: f"request body is larger than {MAX_BODY_BYTES} bytes",
        }
        return error(exc.status, messages.get(exc.status, exc.reason))


def authorized(request: web.Request) -> bool:
    token = request.app[TOKEN]
    if not token:
        return True
    scheme, _, given = request.headers.get('Authorization', '').partition(' ')
    return scheme.lower() == 'bearer' and hmac.compare_digest(given.strip().encode(), token.encode())


async def post_event(request: web.Request) -> web.Response:
    if not authorized(request):
        return error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
    kind = request.match_info['event']
    if kind not in EVENT_KINDS:
        return error(404, f"unknown event {kind!r}; known events: {', '.join(EVENT_NAMES)}")
    idempotency_key = request.headers.get('Idempotency-Key')
    if idempotency_key is not None and not (0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY):
        return error(400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    if (request.content_length or 0) > MAX_BODY_BYTES:
        return error(413, f"request body is larger than {MAX_BODY_BYTES} bytes")

    body = await request.read()  # aiohttp raises 413 past client_max_size when there is no Content-Length
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:
        return error(400, f"body is not valid JSON: {exc}" if isinstance(exc, ValueError)
                     else "body is not valid JSON: nested too deeply")
    problem = payload_problem(payload)
    if problem:
        return error(422, problem)

    accepted = await request.app[ENGINE].ingest(kind, payload, idempotency_key=idempotency_key)
    headers = {'Idempotent-Replayed': 'true'} if accepted.replayed else None
    return web.json_response({'id': accepted.id, 'matched': accepted.matched}, status=202, headers=headers)


def payload_problem(payload: Any) -> str | None:
    """Why a parsed body is not a usable Quay payload, or None if it is."""
    if not isinstance(payload, Mapping):
        return f"body must be a JSON object (a Quay event payload), not {type(payload).__name__}"
    if 'repository' not in payload:
        return "payload has no 'repository' field (expected \"namespace/name\")"
    repository = payload['repository']
    if not isinstance(repository, str):
        return f"payload field 'repository' must be a string \"namespace/name\", not {type(repository).__name__}"
    if not _REPOSITORY.match(repository):
        return f"payload field 'repository' must look like \"namespace/name\" (lowercase), got {repository[:300]!r}"
    return None


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({'status': 'ok'})


def make_app(engine: Engine, *, token: str | None = None) -> web.Application:
    """The receiver application; the caller runs it (see :func:`serve`)."""
    app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY_BYTES)
    app[ENGINE] = engine
    app[TOKEN] = token or None
    app.router.add_post('/v1/events/{event}', post_event)
    app.router.add_get('/healthz', healthz)
    app.router.add_get('/readyz', healthz)
    return app


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start serving; stop with ``await runner.cleanup()``."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    logger.info("Receiver listening on %s:%s", host, port)
    return runner
