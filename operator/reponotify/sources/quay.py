"""
Quay's own "Webhook POST" notifications, at ``/v1/sources/quay/<event>``.

Quay POSTs the event payload itself (the documented payloads, see QUAY-SEMANTICS.md),
which is exactly what ``POST /v1/events/<event>`` takes; this route takes the same body
with the source options (a per-source token, ``?token=`` in the URL), because Quay can
send neither a custom header nor a signature. The event kind comes from the URL: Quay's
body does not name it. An ``Idempotency-Key`` header is honoured as on ``/v1/events``.
"""
from typing import Any

from reponotify.config import SourceSettings
from reponotify.receiver import payload_problem, quay_key
from reponotify.sources.common import Malformed, Normalised, SourceEvent


def normalise(kind: str, body: Any, settings: SourceSettings, idempotency_key: str | None = None) -> Normalised:
    problem = payload_problem(body)
    if problem:
        raise Malformed(problem)
    return Normalised(events=[SourceEvent(kind, dict(body), quay_key(idempotency_key))])
