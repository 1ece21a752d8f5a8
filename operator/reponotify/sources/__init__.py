"""
Registry adapters: any registry as an event source.

=======================================  ====================================================
``POST /v1/sources/distribution``        Docker Distribution notification envelopes
``POST /v1/sources/harbor``              Harbor webhooks (Default and CloudEvents formats)
``POST /v1/sources/dockerhub``           Docker Hub push webhooks
``POST /v1/sources/quay/<event>``        Quay's own webhooks (as ``/v1/events/<event>``)
=======================================  ====================================================

Each source has a module with a pure function from the parsed body to the Quay
events it means (:class:`~reponotify.sources.common.Normalised`); this module is
the HTTP side. Every body that parses as what the source sends is answered
``202`` with what became of it, even when all of it is ignored::

    {"events": [{"id", "kind", "repository", "matched", "replayed"}], "matched": N,
     "ignored": [{"id", "reason"}]}

Only a request that cannot be right gets a 4xx: 401 without the credentials, 400
for malformed JSON, 413 too large, 422 valid JSON that is not this source's body
(no envelope, no type, ...), 404 an unknown source or Quay event. 503 (with
``Retry-After``) means "not now": the receiver is stopping, or the outbox cannot
write. A registry retries all of these, so nothing the registry may send is
answered with an error that stays (Docker Distribution retries the first
undelivered event forever and holds back every later one).

Authentication: as the event endpoint (the receiver's bearer token or HMAC
secret), unless the source has its own (``--source-token-file NAME=PATH``,
``--source-hmac-secret-file NAME=PATH``) or is named by ``--unauthenticated-source``.
A source's token may also come as ``?token=<token>`` in the URL, for registries that
cannot send a header (Docker Hub, Quay).
"""
import hmac
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from reponotify.config import SourceSettings
from reponotify.events import EVENT_KINDS, EVENT_NAMES
from reponotify.outbox import OutboxError
from reponotify.receiver import (AUTH, ENGINE, STATE, Auth, as_bytes, error, idempotency_key_problem, parse_json,
                                 read_body, shutting_down)
from reponotify.sources import distribution, dockerhub, harbor, quay
from reponotify.sources.common import Malformed, Normalised, SourceEvent

logger = logging.getLogger(__name__)

__all__ = ['ADAPTERS', 'SOURCE_NAMES', 'SOURCE_SETTINGS', 'add_routes', 'configure']

Adapter = Callable[[Any, SourceSettings], Normalised]

# The sources whose whole body is the event (Quay's also needs the event from the URL).
ADAPTERS: dict[str, Adapter] = {
    'distribution': distribution.normalise,
    'dockerhub': dockerhub.normalise,
    'harbor': harbor.normalise,
}
SOURCE_NAMES: tuple[str, ...] = (*sorted(ADAPTERS), 'quay')

SOURCE_SETTINGS: web.AppKey[SourceSettings] = web.AppKey('source_settings', SourceSettings)

UNAUTHORIZED = ("missing or wrong credentials (Authorization: Bearer <token>, ?token=<token>, "
                "or X-Signature: sha256=<hmac>)")


def add_routes(app: web.Application) -> None:
    """Add the source endpoints to a receiver application (made by ``receiver.make_app``)."""
    app.router.add_post('/v1/sources/quay/{event}', post_quay)
    app.router.add_post('/v1/sources/{source}', post_source)


def configure(app: web.Application, settings: SourceSettings) -> None:
    """Set the adapters' settings (the defaults apply until then)."""
    app[SOURCE_SETTINGS] = settings


def settings_of(app: web.Application) -> SourceSettings:
    return app.get(SOURCE_SETTINGS) or SourceSettings()


def source_auth(app: web.Application, name: str) -> Auth:
    """The credentials a source requires: its own, none, or the receiver's."""
    settings = settings_of(app)
    if name in settings.unauthenticated:
        return Auth()
    token, secret = settings.tokens.get(name), settings.hmac_secrets.get(name)
    if token or secret:
        return Auth(token=token or None, hmac_secret=secret or None)
    return app[AUTH]


def _query_token_ok(auth: Auth, request: web.Request) -> bool:
    given = request.query.get('token')
    return bool(auth.token) and given is not None and hmac.compare_digest(as_bytes(given), (auth.token or '').encode())


async def post_source(request: web.Request) -> web.Response:
    name = request.match_info['source']
    adapter = ADAPTERS.get(name)
    if adapter is None:
        known = ', '.join([*sorted(ADAPTERS), 'quay/<event>'])
        return error(404, f"unknown source {name[:100]!r}; known sources: {known}", 'unknown_event')
    return await _receive(request, name, lambda body: adapter(body, settings_of(request.app)))


async def post_quay(request: web.Request) -> web.Response:
    kind = request.match_info['event']
    if kind not in EVENT_KINDS:
        return error(404, f"unknown event {kind[:100]!r}; known events: {', '.join(EVENT_NAMES)}", 'unknown_event')
    idempotency_key = request.headers.get('Idempotency-Key')
    problem = idempotency_key_problem(idempotency_key)
    if problem:
        return error(400, problem, 'bad_idempotency_key')
    return await _receive(request, 'quay',
                          lambda body: quay.normalise(kind, body, settings_of(request.app), idempotency_key))


async def _receive(request: web.Request, name: str, adapt: Callable[[Any], Normalised]) -> web.Response:
    if not request.app[STATE].accepting:
        return shutting_down()
    auth = source_auth(request.app, name)
    if auth.required and not auth.hmac_secret and not (auth.bearer_ok(request) or _query_token_ok(auth, request)):
        return error(401, UNAUTHORIZED, 'unauthorized')  # no need to read the body of a request that cannot be right
    body = await read_body(request)
    if isinstance(body, web.Response):
        return body
    if auth.required and not (auth.bearer_ok(request) or _query_token_ok(auth, request)
                              or auth.signature_ok(request, body)):
        return error(401, UNAUTHORIZED, 'unauthorized')
    parsed = parse_json(body)
    if isinstance(parsed, web.Response):
        return parsed
    try:
        normalised = adapt(parsed)
    except Malformed as exc:
        return error(422, str(exc), 'invalid_payload')
    try:
        results = [await _accept(request.app, event, name) for event in normalised.events]
    except OutboxError as exc:
        logger.error("Could not queue %s events: %s", name, exc)
        return web.json_response({'error': "could not queue the event; retry shortly"}, status=503,
                                 headers={'Retry-After': '5'})
    for ignored in normalised.ignored:
        logger.debug("Ignored from %s: %s (%s)", name, ignored.reason, ignored.id)
    return web.json_response({
        'events': results,
        'matched': sum(result['matched'] for result in results),
        'ignored': [ignored.to_json() for ignored in normalised.ignored],
    }, status=202)


async def _accept(app: web.Application, event: SourceEvent, source: str) -> dict[str, Any]:
    """Ingest one source event; a coalesced one is rebuilt without parts an earlier event already holds."""
    engine = app[ENGINE]
    current: SourceEvent | None = event
    while current is not None:
        accepted = await engine.ingest(current.kind, current.payload, idempotency_key=current.idempotency_key,
                                       source=source,
                                       claims=current.claims)
        if not accepted.taken:
            return {'id': accepted.id, 'kind': current.kind, 'repository': current.payload['repository'],
                    'matched': accepted.matched, 'replayed': accepted.replayed}
        current = current.without(frozenset(accepted.taken)) if current.without is not None else None
    # Every part was delivered before, through other requests.
    return {'id': None, 'kind': event.kind, 'repository': event.payload['repository'], 'matched': 0,
            'replayed': True}

