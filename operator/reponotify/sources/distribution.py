"""
Docker Distribution (the CNCF ``registry``, Debian's ``docker-registry``) notifications.

The registry POSTs an envelope, media type
``application/vnd.docker.distribution.events.v1+json``::

    {"events": [{"id": "...", "action": "push",
                 "target": {"mediaType": "...manifest...", "repository": "acme/web", "tag": "v1",
                            "url": "http://registry:5000/v2/acme/web/manifests/sha256:...", ...},
                 "request": {"host": "registry:5000", ...}, ...}]}

A manifest push *with a tag* is a Quay ``repo_push`` of that repository with that
tag in ``updated_tags``; the tags of one repository in one envelope make one
event. Blob pushes, pulls, mounts, deletes and manifests pushed by digest are
ignored (listed in the answer with the reason).

Idempotency: each registry event's ``id`` is its key (``distribution:event:<id>``).
An event that coalesces several registry events gets a key derived from all of
them and claims each one's own key too, so no registry event is delivered twice,
whichever envelope carries it: the registry retries an undelivered envelope
until it gets a 2xx (and holds back everything after it meanwhile).

``docker_url`` is ``<host>/<repository>``, the host being ``--distribution-registry-host``
or else the event's ``request.host`` (the address the pusher used) or else the
host of ``target.url``. ``homepage`` is ``--distribution-homepage-url`` (a template)
or else ``<scheme>://<host>/v2/<repository>/tags/list`` (the registry itself has no web pages).
"""
import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from reponotify.config import SourceSettings
from reponotify.sources.common import (Ignored, Malformed, Normalised, SourceEvent, clean_host, content_key, id_key,
                                       is_repository, is_tag, mapping, render_homepage, repository_fields,
                                       repository_problem, split_url)

MEDIA_TYPE = 'application/vnd.docker.distribution.events.v1+json'
EVENT_KEY = 'distribution:event:'
ENVELOPE_KEY = 'distribution:events:'


@dataclasses.dataclass(frozen=True)
class TagPush:
    """One registry event that pushed a manifest under a tag."""
    key: str
    repository: str
    tag: str
    host: str | None
    homepage: str


def normalise(envelope: Any, settings: SourceSettings) -> Normalised:
    """The repo_push events of an envelope, one per repository."""
    if not isinstance(envelope, Mapping) or not isinstance(envelope.get('events'), list):
        raise Malformed('body is not a Docker Distribution notification envelope: expected {"events": [...]}')
    groups: dict[str, list[TagPush]] = {}
    ignored: list[Ignored] = []
    for record in envelope['events']:
        push = tag_push(record, settings)
        if isinstance(push, Ignored):
            ignored.append(push)
        else:
            groups.setdefault(push.repository, []).append(push)
    return Normalised(events=[coalesce(pushes) for pushes in groups.values()], ignored=ignored)


def tag_push(record: Any, settings: SourceSettings) -> TagPush | Ignored:
    """The tag push a registry event is, or why it is none."""
    if not isinstance(record, Mapping):
        return Ignored("an event that is not a JSON object")
    event_id = record.get('id') if isinstance(record.get('id'), str) and record.get('id') else None
    action = record.get('action')
    if action != 'push':
        return Ignored(f"action {str(action)[:50]!r} is not a push", event_id)
    target = mapping(record.get('target'))
    tag = target.get('tag')
    if tag in (None, ''):
        return Ignored("a push without a tag (a blob, or a manifest pushed by digest)", event_id)
    if not is_tag(tag):
        return Ignored(f"tag {str(tag)[:150]!r} is not a valid tag", event_id)
    repository = target.get('repository')
    if not is_repository(repository):
        return Ignored(repository_problem(repository), event_id)
    parts = split_url(target.get('url'))
    host = (clean_host(settings.distribution_registry_host) or clean_host(mapping(record.get('request')).get('host'))
            or (clean_host(parts.netloc) if parts else None))
    if settings.distribution_homepage_url:
        homepage = render_homepage(settings.distribution_homepage_url, repository, host or '')
    elif host:
        scheme = parts.scheme if parts and parts.scheme in ('http', 'https') else 'https'
        homepage = f"{scheme}://{host}/v2/{repository}/tags/list"
    else:
        homepage = ''
    key = id_key(EVENT_KEY, event_id) if event_id else content_key(EVENT_KEY + 'sha256:', json.dumps(record))
    return TagPush(key=key, repository=repository, tag=tag, host=host, homepage=homepage)


def coalesce(pushes: Sequence[TagPush]) -> SourceEvent:
    """One repo_push for tag pushes of one repository (the first one's host and homepage)."""
    first = pushes[0]
    payload = repository_fields(first.repository, first.host, first.homepage)
    payload['updated_tags'] = list(dict.fromkeys(push.tag for push in pushes))
    keys = tuple(dict.fromkeys(push.key for push in pushes))
    claims: tuple[str, ...]
    if len(keys) == 1:
        key, claims = keys[0], ()
    else:
        key, claims = content_key(ENVELOPE_KEY, sorted(keys)), keys

    def without(taken: frozenset[str]) -> SourceEvent | None:
        rest = [push for push in pushes if push.key not in taken]
        return coalesce(rest) if rest else None
    return SourceEvent('repo_push', payload, key, claims, without)
