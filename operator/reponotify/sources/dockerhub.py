"""
Docker Hub repository webhooks (repository > Webhooks: a name and a URL, nothing else).

Docker Hub POSTs one body per push::

    {"callback_url": "...", "push_data": {"pushed_at": 1417566161, "pusher": "...", "tag": "latest"},
     "repository": {"repo_name": "acme/web", "repo_url": "https://hub.docker.com/r/acme/web", ...}}

It becomes a ``repo_push`` of ``repo_name`` with ``push_data.tag`` in ``updated_tags``;
``docker_url`` is ``docker.io/<repo_name>`` and ``homepage`` is ``repo_url``. Docker Hub
sends no event id, no signature and no custom header: the idempotency key is derived from
repository, tag and push time, and authentication is a ``?token=`` in the URL (see
docs/sources/dockerhub.md). The ``callback_url`` (an optional way to report a result back
to Docker Hub) is not called.
"""
from collections.abc import Mapping
from typing import Any

from reponotify.config import SourceSettings
from reponotify.sources.common import (Ignored, Malformed, Normalised, SourceEvent, content_key, is_repository, is_tag,
                                       repository_fields, repository_problem, split_url)

KEY = 'dockerhub:'
REGISTRY_HOST = 'docker.io'


def normalise(body: Any, settings: SourceSettings) -> Normalised:
    if not isinstance(body, Mapping) or not isinstance(body.get('push_data'), Mapping) \
            or not isinstance(body.get('repository'), Mapping):
        raise Malformed('body is not a Docker Hub webhook payload: expected {"push_data": {...}, "repository": {...}}')
    push, repository_info = body['push_data'], body['repository']
    repository = repository_info.get('repo_name')
    if not isinstance(repository, str):
        raise Malformed("Docker Hub payload has no repository.repo_name")
    if not is_repository(repository):
        return Normalised(ignored=[Ignored(repository_problem(repository))])
    tag = push.get('tag')
    if tag in (None, ''):
        return Normalised(ignored=[Ignored("a push without a tag")])
    if not is_tag(tag):
        return Normalised(ignored=[Ignored(f"tag {str(tag)[:150]!r} is not a valid tag")])
    repo_url = repository_info.get('repo_url')
    parts = split_url(repo_url)
    homepage = repo_url if parts is not None and parts.scheme in ('http', 'https') \
        else f"https://hub.docker.com/r/{repository}"
    payload = {**repository_fields(repository, REGISTRY_HOST, homepage), 'updated_tags': [tag]}
    key = content_key(KEY, repository, tag, push.get('pushed_at'))
    return Normalised(events=[SourceEvent('repo_push', payload, key)])
