"""
A small asynchronous Kubernetes API client for what kopf does not do for us.

kopf patches resources from inside its handlers; status written later (after
deliveries), Events and Secret reads happen outside any handler, so they go
through this client. It authenticates with the same credentials kopf logged in
with (see :mod:`reponotify.kube.handlers`), re-read on every request so that
rotated service-account tokens are picked up.
"""
import datetime
import logging
import secrets
import ssl
from collections.abc import Callable
from typing import Any

import aiohttp
import kopf

from reponotify.models import API_VERSION, KIND, PLURAL

logger = logging.getLogger(__name__)


class KubeClient:
    """Status patches, Events and Secret reads over aiohttp."""

    def __init__(self, credentials: Callable[[], kopf.ConnectionInfo | None]) -> None:
        self._credentials = credentials
        self._session: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | bool | None = None
        self._ssl_for: kopf.ConnectionInfo | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, *, json: Any = None,
                      content_type: str = 'application/json') -> tuple[int, Any]:
        info = self._credentials()
        if info is None:
            raise RuntimeError("not logged in to the Kubernetes API yet")
        if self._session is None:
            self._session = aiohttp.ClientSession(trust_env=False)
        headers = {**info.as_http_headers(), 'Content-Type': content_type, 'User-Agent': 'reponotify'}
        url = info.server.rstrip('/') + path
        async with self._session.request(method, url, json=json, headers=headers, ssl=self._ssl_context(info),
                                         timeout=aiohttp.ClientTimeout(total=30)) as response:
            body = await response.json(content_type=None) if response.content_length != 0 else None
            return response.status, body

    async def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        status, body = await self.request('GET', f'/api/v1/namespaces/{namespace}/secrets/{name}')
        if status == 404:
            return None
        if status >= 400:
            raise RuntimeError(f"reading Secret {namespace}/{name} failed with HTTP {status}")
        return body

    async def read_namespace(self, name: str) -> dict[str, Any] | None:
        status, body = await self.request('GET', f'/api/v1/namespaces/{name}')
        if status == 404:
            return None
        if status >= 400:
            raise RuntimeError(f"reading Namespace {name} failed with HTTP {status}")
        return body

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        path = f'/apis/{API_VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status'
        code, _ = await self.request('PATCH', path, json={'status': status},
                                     content_type='application/merge-patch+json')
        if code == 404:
            logger.debug("Status of %s/%s not written: the resource is gone", namespace, name)
        elif code >= 400:
            raise RuntimeError(f"status patch answered HTTP {code}")

    async def post_event(self, namespace: str, name: str, uid: str | None, *,
                         type: str, reason: str, message: str, count: int = 1) -> None:
        """Post a core/v1 Event about a RepositoryNotification (``count``: the occurrences it stands for)."""
        now = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')
        event = {
            'apiVersion': 'v1',
            'kind': 'Event',
            # client-go's naming: the object name plus a unique suffix.
            'metadata': {'name': f'{name}.{secrets.token_hex(8)}', 'namespace': namespace},
            'involvedObject': {'apiVersion': API_VERSION, 'kind': KIND, 'name': name, 'namespace': namespace,
                               **({'uid': uid} if uid else {})},
            'type': type, 'reason': reason, 'message': message[:1024],
            'source': {'component': 'reponotify'},
            'reportingComponent': 'reponotify',
            'firstTimestamp': now, 'lastTimestamp': now, 'count': count,
        }
        code, _ = await self.request('POST', f'/api/v1/namespaces/{namespace}/events', json=event)
        if code >= 400:
            raise RuntimeError(f"posting an Event answered HTTP {code}")

    def _ssl_context(self, info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
        # kopf builds the context from the CA and client certificate it logged in with.
        if self._ssl is None or self._ssl_for is not info:
            self._ssl = True if info.server.startswith('http://') else info.as_ssl_context()
            self._ssl_for = info
        return self._ssl
