"""
kmock's KubernetesEmulator, extended with the few API server behaviours the operator relies on.

kmock keeps objects as plain JSON and merges every patch into the whole object.
A real API server also:

* sets ``metadata.uid``, ``creationTimestamp``, ``generation`` (1) and
  ``resourceVersion`` on create, and the namespace from the URL;
* bumps ``resourceVersion`` on every change, and ``generation`` only when
  something other than ``metadata`` and ``status`` changes (the spec);
* for a resource with the ``status`` subresource, ignores ``status`` in writes
  to the main resource (including create), and everything but ``status`` in
  writes to ``/status``.

It also works around one kmock 0.8 bug: its URL parser reads ``/api/v1/namespaces``
(the Namespace list, which kopf fetches and watches when it serves specific
namespaces) as "a namespace with no name" and answers 500. :func:`namespace_paths`
parses the Namespace URLs the way the API server does, while a test runs.

:class:`VersionedKubernetesEmulator` adds exactly that, so that tests can assert
that ``status.observedGeneration`` follows ``metadata.generation`` and that the
operator writes its status where a real server would keep it. Nothing else is
changed: the watch streams, listings and errors are kmock's own.
"""
import asyncio
import contextlib
import copy
import datetime
import itertools
import uuid
from collections.abc import Iterator, Mapping
from unittest import mock
from typing import Any

import aiohttp.web
import attrs
import kmock
from kmock._internal import parsing

RN = 'reponotify.dev/v1alpha1/repositorynotifications'
SECRETS = 'v1/secrets'
EVENTS = 'v1/events'
NAMESPACES = 'v1/namespaces'
CRDS = 'apiextensions.k8s.io/v1/customresourcedefinitions'


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


def _essence(body: Mapping[str, Any]) -> dict[str, Any]:
    """What ``metadata.generation`` tracks: everything except metadata and status."""
    return {key: value for key, value in body.items() if key not in ('metadata', 'status')}


@attrs.define(kw_only=True)
class VersionedKubernetesEmulator(kmock.KubernetesEmulator):
    """The emulator plus uid, creationTimestamp, generation, resourceVersion and status-subresource rules."""

    # Serialises the writes so that "read the current object, compute the new versions" is atomic.
    _versioning: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)
    _versions: Iterator[int] = attrs.field(factory=lambda: itertools.count(1), init=False)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.resource is None or request.action not in (kmock.action.CREATE, kmock.action.UPDATE):
            return await super()._handle(request)
        async with self._versioning:
            if request.action == kmock.action.CREATE:
                request = self._versioned_create(request)
            else:
                request = self._versioned_update(request)
            return await super()._handle(request)

    def _has_status_subresource(self, resource: Any) -> bool:
        return resource in self.resources and 'status' in self.resources[resource].subresources

    def _versioned_create(self, request: kmock.Request) -> kmock.Request:
        if not isinstance(request.data, Mapping):
            return request
        data = copy.deepcopy(dict(request.data))
        if self._has_status_subresource(request.resource):
            data.pop('status', None)
        metadata = data.setdefault('metadata', {})
        if request.namespace and not metadata.get('namespace'):
            metadata['namespace'] = request.namespace
        metadata.update({
            'uid': str(uuid.uuid4()),
            'creationTimestamp': _now(),
            'generation': 1,
            'resourceVersion': str(next(self._versions)),
        })
        return _with_data(request, data)

    def _versioned_update(self, request: kmock.Request) -> kmock.Request:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return request  # kmock answers 404
        current = self.objects[key].raw
        patch: Any = copy.deepcopy(request.data)
        if isinstance(patch, Mapping):
            patch = dict(patch)
            if request.subresource == 'status':
                patch = {'status': patch['status']} if 'status' in patch else {}
            elif self._has_status_subresource(request.resource):
                patch.pop('status', None)
        elif not isinstance(patch, list):  # neither a merge patch nor a JSON patch: let kmock decide
            return request

        try:
            preview = kmock.Object(copy.deepcopy(current))
            preview.patch(patch)
            patched = preview.raw
        except Exception:  # e.g. a failing JSON-patch "test" operation: kmock reports it
            return _with_data(request, patch)
        if patched == current:
            return _with_data(request, patch)  # no change: no new versions

        old_metadata = current.get('metadata') or {}
        versions: dict[str, Any] = {'resourceVersion': str(next(self._versions))}
        if _essence(patched) != _essence(current):
            versions['generation'] = int(old_metadata.get('generation') or 0) + 1
        if isinstance(patch, dict):
            patch['metadata'] = {**(patch.get('metadata') or {}), **versions}
        else:
            has_metadata = 'metadata' in patched
            patch = [*patch] + ([] if has_metadata else [{'op': 'add', 'path': '/metadata', 'value': {}}]) + [
                {'op': 'add', 'path': f'/metadata/{name}', 'value': value} for name, value in versions.items()]
        return _with_data(request, patch)


def _with_data(request: kmock.Request, data: Any) -> kmock.Request:
    # The same request object (kmock routes it by identity among the recorded requests), with
    # the data the server acts on; ``request.body`` keeps the bytes the client really sent.
    object.__setattr__(request, 'data', data)
    return request


def declare_resources(kube: kmock.KubernetesEmulator) -> None:
    """The resources kopf and the operator use (kopf does not start watching without namespaces and CRDs)."""
    kube.resources[RN] = kmock.ResourceInfo(
        kind='RepositoryNotification', singular='repositorynotification', namespaced=True,
        shortnames={'rn'}, categories={'reponotify'},
        verbs={'list', 'watch', 'get', 'patch', 'create', 'delete'}, subresources={'status'})
    kube.resources[NAMESPACES] = kmock.ResourceInfo(
        kind='Namespace', singular='namespace', namespaced=False, verbs={'list', 'watch', 'get'})
    kube.resources[CRDS] = kmock.ResourceInfo(
        kind='CustomResourceDefinition', singular='customresourcedefinition', namespaced=False,
        verbs={'list', 'watch', 'get'})
    kube.resources[SECRETS] = kmock.ResourceInfo(
        kind='Secret', singular='secret', namespaced=True, verbs={'list', 'watch', 'get', 'create', 'delete'})
    kube.resources[EVENTS] = kmock.ResourceInfo(
        kind='Event', singular='event', namespaced=True, verbs={'list', 'watch', 'get', 'create'})


def _parse_path(path: str, *, _original: Any = parsing.parse_path) -> parsing.ParsedPath:
    parts = path.strip('/').split('/')
    # /api/v1/namespaces, /api/v1/namespaces/{name}, /api/v1/namespaces/{name}/{status|finalize}
    if parts[:3] == ['api', 'v1', 'namespaces'] and (
            len(parts) <= 4 or (len(parts) == 5 and parts[4] in ('status', 'finalize'))):
        return parsing.ParsedPath(group='', version='v1', plural='namespaces', namespace=None,
                                  name=parts[3] if len(parts) > 3 else None,
                                  subresource=parts[4] if len(parts) > 4 else None)
    return _original(path)


@contextlib.contextmanager
def namespace_paths() -> Iterator[None]:
    """Parse Namespace URLs correctly while inside (kmock 0.8 fails on ``GET /api/v1/namespaces``)."""
    with mock.patch.object(parsing, 'parse_path', _parse_path):
        yield
