"""
The kopf operator, for real: kopf runs in-process, unchanged, against kmock's
Kubernetes emulator over HTTP (see :mod:`kube_emulator`); events go in through
the receiver over HTTP, and deliveries go out to a loopback HTTP target.

Every test asserts what a user would see: the bytes the target got, the status
written into the emulated API server, the Kubernetes Events posted.
"""
import asyncio
import base64
import concurrent.futures
import copy
import json
import pathlib
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import kmock
import pytest

from conftest import Reply, eventually, free_port
from kube_emulator import RN, VersionedKubernetesEmulator, declare_resources, namespace_paths
from reponotify.config import ReceiverSettings, Settings
from reponotify.dispatcher import DispatcherSettings
from reponotify.engine import Engine, EngineSettings
from reponotify.events import sample_payload
from reponotify.kube.handlers import OperatorSettings, run_operator
from reponotify.models import API_VERSION, GROUP, KIND, PLURAL
from reponotify.notifications import NotificationKey

NS = 'ns1'
TIMEOUT = 10.0
RFC3339 = re.compile(r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$')
DIFFBASE = f'kopf.{GROUP}/last-handled-configuration'






def ready(status: dict[str, Any] | None) -> tuple[str, str, str] | None:
    """The Ready condition as (status, reason, message)."""
    for condition in (status or {}).get('conditions') or []:
        if condition.get('type') == 'Ready':
            return condition['status'], condition['reason'], condition['message']
    return None


class Cluster:
    """The emulated API server, with the few operations the tests make over its HTTP API."""

    def __init__(self, kube: VersionedKubernetesEmulator, server: kmock.Server) -> None:
        self.kube = kube
        self.server = server

    @property
    def url(self) -> str:
        return str(self.server.url)

    async def _call(self, method: str, path: str, body: Any = None, *,
                    content_type: str = 'application/json') -> dict[str, Any]:
        async with self.server.client.request(method, path, data=json.dumps(body) if body is not None else None,
                                              headers={'Content-Type': content_type}) as response:
            answer = await response.json()
            assert response.status == 200, (method, path, response.status, answer)
            return answer

    async def create(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {'apiVersion': API_VERSION, 'kind': KIND, 'metadata': {'name': name, 'namespace': NS}, 'spec': spec}
        return await self._call('POST', f'/apis/{API_VERSION}/namespaces/{NS}/{PLURAL}', body)

    async def patch_spec(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return await self._call('PATCH', f'/apis/{API_VERSION}/namespaces/{NS}/{PLURAL}/{name}', {'spec': spec},
                                content_type='application/merge-patch+json')

    async def delete(self, name: str) -> None:
        await self._call('DELETE', f'/apis/{API_VERSION}/namespaces/{NS}/{PLURAL}/{name}')

    async def create_namespace(self, name: str) -> None:
        await self._call('POST', '/api/v1/namespaces', {'apiVersion': 'v1', 'kind': 'Namespace',
                                                        'metadata': {'name': name}})

    async def annotate(self, name: str, annotations: dict[str, str | None]) -> dict[str, Any]:
        return await self._call('PATCH', f'/apis/{API_VERSION}/namespaces/{NS}/{PLURAL}/{name}',
                                {'metadata': {'annotations': annotations}},
                                content_type='application/merge-patch+json')

    async def annotate_namespace(self, name: str, annotations: dict[str, str | None]) -> None:
        await self._call('PATCH', f'/api/v1/namespaces/{name}', {'metadata': {'annotations': annotations}},
                         content_type='application/merge-patch+json')

    async def create_secret(self, name: str, data: dict[str, str]) -> None:
        body = {'apiVersion': 'v1', 'kind': 'Secret', 'metadata': {'name': name, 'namespace': NS},
                'data': {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}}
        await self._call('POST', f'/api/v1/namespaces/{NS}/secrets', body)

    async def update_secret(self, name: str, data: dict[str, str]) -> None:
        body = {'data': {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}}
        await self._call('PATCH', f'/api/v1/namespaces/{NS}/secrets/{name}', body,
                         content_type='application/merge-patch+json')

    async def delete_secret(self, name: str) -> None:
        await self._call('DELETE', f'/api/v1/namespaces/{NS}/secrets/{name}')

    def get(self, name: str) -> dict[str, Any] | None:
        """The object as the emulated API server holds it now (None if absent or deleted)."""
        try:
            obj = self.kube.objects[RN, NS, name]
        except KeyError:
            return None
        return None if obj.deleted else copy.deepcopy(obj.raw)

    def status(self, name: str) -> dict[str, Any]:
        return (self.get(name) or {}).get('status') or {}

    async def wait_status(self, name: str, check: Callable[[dict[str, Any]], bool], what: str,
                          timeout: float = TIMEOUT) -> dict[str, Any]:
        """Poll the object in the emulator until its status satisfies ``check``."""
        def probe() -> dict[str, Any] | None:
            status = self.status(name)
            return status if status and check(status) else None
        try:
            return await eventually(probe, f"{name}: {what}", timeout)
        except pytest.fail.Exception:
            pytest.fail(f"timed out waiting for {name}: {what}; last status: {json.dumps(self.status(name))}")

    async def wait_ready(self, name: str, status: str, reason: str, generation: int) -> dict[str, Any]:
        return await self.wait_status(
            name, lambda s: ready(s)[:2] == (status, reason) and s.get('observedGeneration') == generation,
            f"Ready={status} {reason} at generation {generation}")

    def requests(self, name: str, *, method: str, subresource: str | None) -> list[kmock.Request]:
        """Requests the API server got for one notification (e.g. PATCH on /status)."""
        return [request for request in self.kube._requests
                if request.resource is not None and request.resource.plural == PLURAL
                and request.namespace == NS and request.name == name
                and request.method == method and request.subresource == subresource]

    def events(self, name: str) -> list[dict[str, Any]]:
        """The core/v1 Events about one notification, in the order they were posted."""
        return [copy.deepcopy(obj.raw) for (resource, namespace, _), obj in self.kube.objects.items()
                if resource.plural == 'events' and namespace == NS and not obj.deleted
                and obj.raw.get('involvedObject', {}).get('name') == name]


class Operator:
    """
    The operator, running against the emulator, with its receiver on a free port.

    kopf runs in a thread with its own event loop, as in production (``asyncio.run``):
    on exit kopf waits for, then cancels, every task of its loop that it did not find
    at startup, so sharing the test's loop would make it cancel the test's own tasks
    (pytest-asyncio's fixture teardown, the emulator's and the target's connections).
    """

    def __init__(self, engine: Engine, receiver_url: str, done: asyncio.Future[None],
                 stop_flag: threading.Event) -> None:
        self.engine = engine
        self.receiver_url = receiver_url
        self.done = done  # the thread running kopf: its result is kopf's exit
        self.stop_flag = stop_flag
        self.http = aiohttp.ClientSession()

    async def post_event(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST a Quay event to the receiver; it must answer 202 {"id", "matched"}."""
        async with self.http.post(f'{self.receiver_url}/v1/events/{kind}', data=json.dumps(payload),
                                  headers={'Content-Type': 'application/json'}) as response:
            body = await response.json()
            assert response.status == 202, body
            assert set(body) == {'id', 'matched'}, body
            return body

    def routed(self, name: str) -> bool:
        return self.engine.routing.get(NotificationKey(NS, name)) is not None

    async def stop(self) -> None:
        """Stop kopf as a signal would (its cleanup handlers run) and wait until it has exited; idempotent."""
        self.stop_flag.set()
        try:
            await asyncio.wait_for(asyncio.shield(self.done), TIMEOUT)
        finally:
            await self.http.close()


StartOperator = Callable[..., Awaitable[Operator]]


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    with namespace_paths():
        async with VersionedKubernetesEmulator() as kube, kmock.Server(kube) as server:
            declare_resources(kube)
            cluster = Cluster(kube, server)
            await cluster.create_namespace(NS)
            yield cluster


@pytest.fixture
async def start_operator(cluster: Cluster, tmp_path: pathlib.Path) -> AsyncIterator[StartOperator]:
    """
    Start the operator with short timings; every one started is stopped cleanly at teardown.

    The engine is built as the operator builds its own (durable outbox in the state folder);
    the test passes it in only to look at its routing table. Operators started in one test
    share the state folder, as a restarted pod does.
    """
    running: list[tuple[Operator, concurrent.futures.ThreadPoolExecutor]] = []

    async def start(*, status_interval: float = 0.1, retry_schedule: tuple[float, ...] = (0.05, 0.05, 0.05, 0.05),
                    secret_retry_delay: float = 0.5, repository_policy: str = 'allow', warning_interval: float = 60.0,
                    namespaces: list[str] | None = None) -> Operator:
        port = free_port()
        settings = Settings(
            receiver=ReceiverSettings(host='127.0.0.1', port=port),
            engine=EngineSettings(dispatcher=DispatcherSettings(workers=16, retry_schedule=retry_schedule, timeout=5.0),
                                  status_interval=status_interval),
            state_dir=tmp_path, shutdown_grace=1.0)
        options = OperatorSettings(common=settings, kube_api_url=cluster.url, secret_retry_delay=secret_retry_delay,
                                   repository_policy=repository_policy, warning_interval=warning_interval)
        engine = Engine(settings.engine, outbox_path=settings.state_dir / 'outbox.sqlite3')
        stop_flag, ready_flag = threading.Event(), threading.Event()  # kopf takes threading flags too

        def main() -> None:
            asyncio.run(run_operator(options, namespaces=[NS] if namespaces is None else namespaces,
                                     stop_flag=stop_flag,  # type: ignore[arg-type]
                                     ready_flag=ready_flag, engine=engine))  # type: ignore[arg-type]

        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='operator')
        done = asyncio.get_running_loop().run_in_executor(executor, main)
        operator = Operator(engine, f'http://127.0.0.1:{port}', done, stop_flag)
        running.append((operator, executor))
        await eventually(lambda: ready_flag.is_set() or done.done(), "the operator to be ready")
        if done.done():
            done.result()  # raises what broke the operator
            pytest.fail("the operator exited before it was ready")
        return operator

    yield start

    try:
        for operator, _ in running:
            operator.stop_flag.set()  # all at once: one stuck operator must not keep the others running
        for operator, _ in running:
            await operator.stop()
            assert operator.done.result() is None  # it exited cleanly
    finally:
        for _, executor in running:
            executor.shutdown(wait=False)


def webhook_spec(url: str, **extra: Any) -> dict[str, Any]:
    return {'repository': 'acme/web', 'event': 'repo_push', 'method': 'webhook', 'config': {'url': url}, **extra}


def condition(status: dict[str, Any]) -> dict[str, Any]:
    """The Ready condition, with its time checked for format and taken out (it is the only moving part)."""
    [found] = status['conditions']
    assert RFC3339.match(found['lastTransitionTime']), found
    return {key: value for key, value in found.items() if key != 'lastTransitionTime'}


def delivery(record: dict[str, Any]) -> dict[str, Any]:
    """
    A delivery record, with its time and duration checked for shape and taken out.

    Status is written with a JSON merge patch, where null means "remove": in ``lastDelivery``
    (an object) a null ``code`` or ``durationMs`` is absent; in ``recentDeliveries`` (a list,
    replaced whole) it stays null.
    """
    assert RFC3339.match(record['time']), record
    duration = record.get('durationMs')
    assert duration is None or (isinstance(duration, int) and duration >= 0), record
    return {key: value for key, value in record.items() if key not in ('time', 'durationMs')}


# -- the tests ---------------------------------------------------------------------------------------


async def test_create_accepts_routes_and_records_the_delivery(cluster, start_operator, http_target):
    operator = await start_operator()
    created = await cluster.create('push-to-ci', webhook_spec(f'{http_target.url}/hook', title='Push to CI'))
    assert created['metadata']['generation'] == 1

    status = await cluster.wait_ready('push-to-ci', 'True', 'Accepted', generation=1)
    assert condition(status) == {
        'type': 'Ready', 'status': 'True', 'reason': 'Accepted',
        'message': 'Routing repo_push events of acme/web to webhook', 'observedGeneration': 1,
    }
    assert status['numberOfFailures'] == 0
    assert status['deliveries'] == {'succeeded': 0, 'failed': 0, 'dropped': 0}
    assert 'lastDelivery' not in status  # written as null: a JSON merge patch removes the key
    assert status['recentDeliveries'] == []

    payload = sample_payload('repo_push', 'acme/web')
    accepted = await operator.post_event('repo_push', payload)
    assert accepted['matched'] == 1

    [received] = await http_target.wait_for(1, '/hook')
    assert received.method == 'POST'
    assert received.headers['Content-Type'] == 'application/json'
    assert received.body == json.dumps(payload).encode()  # the payload itself, not wrapped (as Quay)
    assert received.json() == payload

    status = await cluster.wait_status('push-to-ci', lambda s: s['deliveries']['succeeded'] == 1,
                                       "one succeeded delivery")
    expected = {'eventId': accepted['id'], 'event': 'repo_push', 'outcome': 'Succeeded', 'attempts': 1,
                'code': 200, 'message': 'webhook target answered 200'}
    assert delivery(status['lastDelivery']) == expected
    assert [delivery(record) for record in status['recentDeliveries']] == [expected]
    assert status['recentDeliveries'][0] == status['lastDelivery']
    assert status['deliveries'] == {'succeeded': 1, 'failed': 0, 'dropped': 0}
    assert status['numberOfFailures'] == 0
    assert condition(status)['reason'] == 'Accepted'
    assert status['observedGeneration'] == 1

    # The status went to the status subresource, where a real API server keeps it; the spec is untouched.
    assert cluster.requests('push-to-ci', method='PATCH', subresource='status')
    assert cluster.get('push-to-ci')['spec'] == webhook_spec(f'{http_target.url}/hook', title='Push to CI')
    assert cluster.get('push-to-ci')['metadata']['generation'] == 1
    assert len(http_target.requests) == 1


async def test_update_changes_routing_and_observed_generation(cluster, start_operator, http_target):
    operator = await start_operator()
    await cluster.create('push', webhook_spec(f'{http_target.url}/hook'))
    await cluster.wait_ready('push', 'True', 'Accepted', generation=1)

    patched = await cluster.patch_spec('push', {'repository': 'acme/api'})
    assert patched['metadata']['generation'] == 2
    status = await cluster.wait_ready('push', 'True', 'Accepted', generation=2)
    assert condition(status) == {
        'type': 'Ready', 'status': 'True', 'reason': 'Accepted',
        'message': 'Routing repo_push events of acme/api to webhook', 'observedGeneration': 2,
    }

    old = await operator.post_event('repo_push', sample_payload('repo_push', 'acme/web'))
    assert old['matched'] == 0
    new_payload = sample_payload('repo_push', 'acme/api')
    new = await operator.post_event('repo_push', new_payload)
    assert new['matched'] == 1
    [received] = await http_target.wait_for(1, '/hook')
    assert received.json() == new_payload

    # A new URL takes effect too, and the generation follows.
    await cluster.patch_spec('push', {'config': {'url': f'{http_target.url}/moved'}})
    await cluster.wait_ready('push', 'True', 'Accepted', generation=3)
    moved = await operator.post_event('repo_push', new_payload)
    assert moved['matched'] == 1
    [received] = await http_target.wait_for(1, '/moved')
    assert received.body == json.dumps(new_payload).encode()
    status = await cluster.wait_status('push', lambda s: s['deliveries']['succeeded'] == 2, "two deliveries")
    assert [record['eventId'] for record in status['recentDeliveries']] == [moved['id'], new['id']]
    assert [request.path for request in http_target.requests] == ['/hook', '/moved']


async def test_delete_stops_routing(cluster, start_operator, http_target):
    operator = await start_operator()
    await cluster.create('push', webhook_spec(f'{http_target.url}/hook'))
    await cluster.wait_ready('push', 'True', 'Accepted', generation=1)
    assert (await operator.post_event('repo_push', sample_payload('repo_push', 'acme/web')))['matched'] == 1
    await cluster.wait_status('push', lambda s: s['deliveries']['succeeded'] == 1, "the delivery to be recorded")

    await cluster.delete('push')
    assert cluster.get('push') is None
    await eventually(lambda: not operator.routed('push'), "the deleted notification to be unrouted")

    accepted = await operator.post_event('repo_push', sample_payload('repo_push', 'acme/web'))
    assert accepted['matched'] == 0
    assert len(operator.engine.outbox) == 0
    assert len(http_target.requests) == 1  # only the delivery from before the deletion
    assert operator.engine.book.keys() == []  # its status is forgotten too


async def test_delete_during_an_attempt_leaves_nothing_behind(cluster, start_operator, http_target):
    http_target.script('/slow', Reply(delay=0.5))
    operator = await start_operator()
    await cluster.create('push', webhook_spec(f'{http_target.url}/slow'))
    await cluster.wait_ready('push', 'True', 'Accepted', generation=1)
    assert (await operator.post_event('repo_push', sample_payload('repo_push', 'acme/web')))['matched'] == 1
    await http_target.wait_for(1, '/slow')  # the attempt is in flight: the target answers in 0.5 s

    await cluster.delete('push')
    await eventually(lambda: not operator.routed('push'), "the deleted notification to be unrouted")
    await eventually(lambda: len(operator.engine.outbox) == 0, "the attempt in flight to finish")
    assert operator.engine.book.keys() == []

    # A new resource of the same name starts afresh.
    await cluster.create('push', webhook_spec(f'{http_target.url}/slow'))
    status = await cluster.wait_ready('push', 'True', 'Accepted', generation=1)
    assert status['deliveries'] == {'succeeded': 0, 'failed': 0, 'dropped': 0}


@pytest.mark.parametrize('spec, message', [
    pytest.param(
        {'repository': 'acme/web', 'event': 'build_start', 'eventConfig': {'refRegex': '(['},
         'method': 'webhook', 'config': {'url': 'http://127.0.0.1:9/hook'}},
        "spec.eventConfig.refRegex is not a valid regular expression: unterminated character set at position 1",
        id='bad-refRegex'),
    pytest.param(
        {'repository': 'acme/web', 'event': 'build_start', 'method': 'webhook', 'config': {'url': 'ftp://x'}},
        "spec.config.url: must be an http:// or https:// URL",
        id='ftp-url'),
])
async def test_invalid_spec_is_reported_and_not_routed(cluster, start_operator, http_target, spec, message):
    operator = await start_operator()
    await cluster.create('broken', spec)
    status = await cluster.wait_ready('broken', 'False', 'InvalidSpec', generation=1)
    assert condition(status) == {'type': 'Ready', 'status': 'False', 'reason': 'InvalidSpec',
                                 'message': message, 'observedGeneration': 1}
    assert 'ftp://x' not in json.dumps(status)  # config values may be secrets: never echoed

    assert not operator.routed('broken')
    accepted = await operator.post_event('build_start', sample_payload('build_start', 'acme/web'))
    assert accepted['matched'] == 0
    assert http_target.requests == []
    [event] = await eventually(lambda: cluster.events('broken'), "the InvalidSpec Event")
    assert (event['type'], event['reason'], event['message']) == ('Warning', 'InvalidSpec', message)


async def test_missing_secret_then_created(cluster, start_operator, http_target):
    operator = await start_operator(secret_retry_delay=0.3)
    spec = {'repository': 'acme/web', 'event': 'repo_push', 'method': 'webhook',
            'config': {'urlFrom': {'secretKeyRef': {'name': 'hook-secret', 'key': 'url'}}}}
    await cluster.create('from-secret', spec)
    status = await cluster.wait_ready('from-secret', 'False', 'SecretNotFound', generation=1)
    assert condition(status) == {'type': 'Ready', 'status': 'False', 'reason': 'SecretNotFound',
                                 'message': 'Secret ns1/hook-secret not found', 'observedGeneration': 1}
    assert not operator.routed('from-secret')
    assert (await operator.post_event('repo_push', sample_payload('repo_push', 'acme/web')))['matched'] == 0

    # It keeps looking for the Secret (kopf retries the handler), without an Event per retry.
    def secret_reads() -> int:
        return sum(1 for request in cluster.kube._requests
                   if request.resource is not None and request.resource.plural == 'secrets'
                   and request.name == 'hook-secret' and request.method == 'GET')
    await eventually(lambda: secret_reads() >= 2, "a retry reading the Secret again")

    secret_url = f'{http_target.url}/from-secret?token=s3cr3t'
    await cluster.create_secret('hook-secret', {'url': secret_url})
    status = await cluster.wait_ready('from-secret', 'True', 'Accepted', generation=1)
    assert condition(status)['message'] == 'Routing repo_push events of acme/web to webhook'

    payload = sample_payload('repo_push', 'acme/web')
    assert (await operator.post_event('repo_push', payload))['matched'] == 1
    [received] = await http_target.wait_for(1, '/from-secret')
    assert received.query == {'token': 's3cr3t'}
    assert received.json() == payload

    # The Secret's value never shows in status or Events.
    status = await cluster.wait_status('from-secret', lambda s: s['deliveries']['succeeded'] == 1, "the delivery")
    assert 's3cr3t' not in json.dumps(status)
    events = cluster.events('from-secret')
    assert 's3cr3t' not in json.dumps(events)
    assert [(event['type'], event['reason'], event['message']) for event in events] == [
        ('Warning', 'SecretNotFound', 'Secret ns1/hook-secret not found'),
        ('Normal', 'Accepted', 'Routing repo_push events of acme/web to webhook'),
    ]


async def test_refresh_annotation_reads_rotated_or_deleted_secrets_again(cluster, start_operator, http_target):
    """Secrets are read when a spec is handled; after rotating one, reponotify.dev/refresh reads it again."""
    operator = await start_operator(secret_retry_delay=0.3)
    await cluster.create_secret('hook-secret', {'url': f'{http_target.url}/old?token=rotated-away'})
    spec = {'repository': 'acme/web', 'event': 'repo_push', 'method': 'webhook',
            'config': {'urlFrom': {'secretKeyRef': {'name': 'hook-secret', 'key': 'url'}}}}
    await cluster.create('rotating', spec)
    await cluster.wait_ready('rotating', 'True', 'Accepted', generation=1)

    await cluster.update_secret('hook-secret', {'url': f'{http_target.url}/new?token=rotated-in'})
    await cluster.annotate('rotating', {'reponotify.dev/refresh': '1'})
    await eventually(lambda: 'Refreshed' in [event['reason'] for event in cluster.events('rotating')],
                     "the Refreshed Event")
    assert (await operator.post_event('repo_push', sample_payload('repo_push', 'acme/web')))['matched'] == 1
    [received] = await http_target.wait_for(1, '/new')
    assert received.query == {'token': 'rotated-in'}
    assert http_target.on('/old') == []

    await cluster.delete_secret('hook-secret')
    await cluster.annotate('rotating', {'reponotify.dev/refresh': '2'})
    status = await cluster.wait_ready('rotating', 'False', 'SecretNotFound', generation=1)
    assert condition(status)['message'] == 'Secret ns1/hook-secret not found'
    assert not operator.routed('rotating')
    events = json.dumps(cluster.events('rotating'))
    assert 'rotated-in' not in events and 'rotated-away' not in events


async def test_suspend_stops_routing_and_resume_restores_it(cluster, start_operator, http_target):
    operator = await start_operator()
    await cluster.create('paused', webhook_spec(f'{http_target.url}/hook', suspend=True))
    status = await cluster.wait_ready('paused', 'False', 'Suspended', generation=1)
    assert condition(status) == {'type': 'Ready', 'status': 'False', 'reason': 'Suspended',
                                 'message': 'spec.suspend is true', 'observedGeneration': 1}
    assert (await operator.post_event('repo_push', sample_payload('repo_push', 'acme/web')))['matched'] == 0

    await cluster.patch_spec('paused', {'suspend': False})
    await cluster.wait_ready('paused', 'True', 'Accepted', generation=2)
    payload = sample_payload('repo_push', 'acme/web')
    assert (await operator.post_event('repo_push', payload))['matched'] == 1
    [received] = await http_target.wait_for(1, '/hook')
    assert received.json() == payload
    assert len(http_target.requests) == 1  # nothing of the event sent while suspended


async def test_three_failures_disable_and_later_events_are_dropped(cluster, start_operator, http_target):
    http_target.script('/hook', Reply(status=500, body='boom'))
    operator = await start_operator()
    await cluster.create('flaky', webhook_spec(f'{http_target.url}/hook'))
    await cluster.wait_ready('flaky', 'True', 'Accepted', generation=1)

    first = await operator.post_event('repo_push', sample_payload('repo_push', 'acme/web'))
    assert first['matched'] == 1
    await http_target.wait_for(3, '/hook')
    status = await cluster.wait_ready('flaky', 'False', 'Disabled', generation=1)
    assert condition(status) == {
        'type': 'Ready', 'status': 'False', 'reason': 'Disabled',
        'message': 'Disabled after 3 consecutive failed deliveries; events are dropped until it is reset '
                   '(annotate reponotify.dev/reset)',
        'observedGeneration': 1,
    }
    status = await cluster.wait_status('flaky', lambda s: s['deliveries']['failed'] == 1, "the failed delivery")
    assert status['numberOfFailures'] == 3
    failed = {'eventId': first['id'], 'event': 'repo_push', 'outcome': 'Failed', 'attempts': 3, 'code': 500,
              'message': 'webhook target answered 500; the notification is now disabled'}
    assert delivery(status['lastDelivery']) == failed
    assert [delivery(record) for record in status['recentDeliveries']] == [failed]
    assert status['deliveries'] == {'succeeded': 0, 'failed': 1, 'dropped': 0}

    second = await operator.post_event('repo_push', sample_payload('repo_push', 'acme/web'))
    assert second['matched'] == 1  # still routed: the drop is recorded, never silently lost
    status = await cluster.wait_status('flaky', lambda s: s['deliveries']['dropped'] == 1, "the dropped delivery")
    dropped = {'eventId': second['id'], 'event': 'repo_push', 'outcome': 'Dropped', 'attempts': 0,
               'message': 'Dropped: the notification is disabled after repeated failures'}
    assert delivery(status['lastDelivery']) == dropped  # no code: the merge patch dropped the null
    assert [delivery(record) for record in status['recentDeliveries']] == [{**dropped, 'code': None}, failed]
    assert status['deliveries'] == {'succeeded': 0, 'failed': 1, 'dropped': 1}
    assert status['numberOfFailures'] == 3
    assert condition(status)['reason'] == 'Disabled'
    assert len(http_target.on('/hook')) == 3  # the second event never reached the target


async def test_ready_transitions_post_kubernetes_events(cluster, start_operator, http_target):
    http_target.script('/hook', Reply(status=503))
    operator = await start_operator()
    created = await cluster.create('noisy', webhook_spec(f'{http_target.url}/hook'))
    uid = created['metadata']['uid']
    await cluster.wait_ready('noisy', 'True', 'Accepted', generation=1)
    [accepted] = await eventually(lambda: cluster.events('noisy'), "the Accepted Event")

    assert (await operator.post_event('repo_push', sample_payload('repo_push', 'acme/web')))['matched'] == 1
    await cluster.wait_ready('noisy', 'False', 'Disabled', generation=1)
    def transitions() -> list[dict[str, Any]]:  # the failed deliveries' own Warnings: see test_events_and_logs
        return [event for event in cluster.events('noisy') if not event['reason'].startswith('Delivery')]
    accepted, disabled = await eventually(lambda: len(transitions()) == 2 and transitions(), "the Disabled Event")

    for event, type_, reason, message in [
        (accepted, 'Normal', 'Accepted', 'Routing repo_push events of acme/web to webhook'),
        (disabled, 'Warning', 'Disabled', 'Disabled after 3 consecutive failed deliveries; events are dropped '
                                          'until it is reset (annotate reponotify.dev/reset)'),
    ]:
        assert re.fullmatch(r'noisy\.[0-9a-f]{16}', event['metadata']['name']), event['metadata']
        assert event['metadata']['namespace'] == NS
        # With the uid, `kubectl describe rn noisy` lists the Event (it selects on involvedObject.uid).
        assert event['involvedObject'] == {'apiVersion': API_VERSION, 'kind': KIND, 'name': 'noisy',
                                           'namespace': NS, 'uid': uid}
        assert (event['type'], event['reason'], event['message']) == (type_, reason, message)
        assert event['source'] == {'component': 'reponotify'}
        assert event['reportingComponent'] == 'reponotify'
        assert event['count'] == 1
        assert RFC3339.match(event['firstTimestamp']) and event['lastTimestamp'] == event['firstTimestamp']
    assert len(http_target.on('/hook')) == 3


async def test_status_writes_are_coalesced_and_do_not_retrigger_handlers(cluster, start_operator, http_target):
    operator = await start_operator(status_interval=1.0)
    routed: list[str] = []
    put_notification = operator.engine.put_notification
    operator.engine.put_notification = lambda n: (routed.append(n.key.name), put_notification(n))[-1]

    await cluster.create('busy', webhook_spec(f'{http_target.url}/hook'))
    await cluster.wait_ready('busy', 'True', 'Accepted', generation=1)
    # kopf finishes the creation by storing what it handled (its diffbase annotation).
    await eventually(lambda: DIFFBASE in (cluster.get('busy')['metadata'].get('annotations') or {}),
                     "kopf's diffbase annotation")
    status_patches_before = len(cluster.requests('busy', method='PATCH', subresource='status'))

    # 200 events in 4 waves spread over more than one status_interval.
    count, waves = 200, 4
    answers = []
    for wave in range(waves):
        if wave:
            await asyncio.sleep(0.35)  # pacing the load, not waiting for a result
        answers += await asyncio.gather(*(operator.post_event('repo_push', sample_payload('repo_push', 'acme/web'))
                                          for _ in range(count // waves)))
    assert [answer['matched'] for answer in answers] == [1] * count
    ids = {answer['id'] for answer in answers}
    assert len(ids) == count
    await http_target.wait_for(count, '/hook')
    status = await cluster.wait_status('busy', lambda s: s['deliveries']['succeeded'] == count,
                                       f"{count} succeeded deliveries")

    # Exact final status...
    assert status['deliveries'] == {'succeeded': count, 'failed': 0, 'dropped': 0}
    assert status['numberOfFailures'] == 0
    assert status['observedGeneration'] == 1
    assert condition(status)['reason'] == 'Accepted'
    assert len(status['recentDeliveries']) == 10
    assert all(delivery(record)['outcome'] == 'Succeeded' for record in status['recentDeliveries'])
    assert {record['eventId'] for record in status['recentDeliveries']} <= ids
    assert len({record['eventId'] for record in status['recentDeliveries']}) == 10
    assert status['lastDelivery'] == status['recentDeliveries'][0]

    # ... written with few PATCH requests: at most one per status_interval, the last one exact ...
    status_patches = len(cluster.requests('busy', method='PATCH', subresource='status')) - status_patches_before
    # 200 deliveries over ~1.5 s at status_interval=1.0: 2 or 3 writes (writing per flush wake-up, not per
    # interval, made 24). The burst spans > 1 s, so progress shows before the end.
    assert 2 <= status_patches <= 6, status_patches
    written = [version.raw['status']['deliveries']['succeeded']
               for version in cluster.kube.objects[RN, NS, 'busy'].history
               if version is not None and 'status' in version.raw]
    progress = sorted(set(written))
    assert written == sorted(written) and progress[-1] == count and len(progress) <= status_patches + 1, written

    # ... none of which made kopf run the handler again or patch the resource itself. (A short
    # window for a wrong reaction to the last status write to show: absence cannot be polled for.)
    await asyncio.sleep(0.3)
    assert routed == ['busy']
    # The only write to the resource itself is kopf's own, once, after the creation was handled:
    # its annotations (diffbase, managed marker), nothing from our handlers.
    [body_patch] = cluster.requests('busy', method='PATCH', subresource=None)
    assert body_patch.headers['User-Agent'].startswith('kopf/')
    patch = json.loads(body_patch.body)
    assert list(patch) == ['metadata'] and list(patch['metadata']) == ['annotations'], patch
    assert DIFFBASE in patch['metadata']['annotations']
    assert all(key.startswith(f'kopf.{GROUP}/') for key in patch['metadata']['annotations']), patch
    history = [version for version in cluster.kube.objects[RN, NS, 'busy'].history if version is not None]
    diffbases = {(version.raw.get('metadata', {}).get('annotations') or {}).get(DIFFBASE) for version in history}
    assert len(diffbases - {None}) == 1  # stored once, for the creation
    assert cluster.get('busy')['metadata']['generation'] == 1
    assert len(cluster.events('busy')) == 1  # Accepted, once


async def test_applying_other_notifications_does_not_write_a_busy_status_more_often(
        cluster, start_operator, http_target):
    """Each handled resource writes its own status at once, not every pending one (that bypassed the interval)."""
    operator = await start_operator(status_interval=1.0)
    await cluster.create('busy', webhook_spec(f'{http_target.url}/hook'))
    await cluster.wait_ready('busy', 'True', 'Accepted', generation=1)
    status_patches_before = len(cluster.requests('busy', method='PATCH', subresource='status'))

    # Events to busy in 6 waves over about 1.5 s, while 12 other notifications are created.
    count, waves = 120, 6
    for wave in range(waves):
        if wave:
            await asyncio.sleep(0.25)  # pacing the load, not waiting for a result
        answers = await asyncio.gather(*(operator.post_event('repo_push', sample_payload('repo_push', 'acme/web'))
                                         for _ in range(count // waves)))
        assert [answer['matched'] for answer in answers] == [1] * (count // waves)
        for other in range(2):
            await cluster.create(f'other-{wave}-{other}', webhook_spec(f'{http_target.url}/other',
                                                                       repository='acme/other'))
    for wave in range(waves):
        for other in range(2):
            await cluster.wait_ready(f'other-{wave}-{other}', 'True', 'Accepted', generation=1)
    await cluster.wait_status('busy', lambda s: s['deliveries']['succeeded'] == count, f"{count} succeeded deliveries")

    # About 2 s of changes at status_interval=1.0: 2 or 3 writes, the last one exact (each of the 12 others'
    # handlers used to write busy's status too: 9 here).
    status_patches = len(cluster.requests('busy', method='PATCH', subresource='status')) - status_patches_before
    assert 1 <= status_patches <= 4, status_patches


async def test_restart_resumes_with_counters_from_status(cluster, start_operator, http_target):
    """A restarted operator takes the resource over (kopf's resume) and keeps counting from its status."""
    first = await start_operator()
    await cluster.create('kept', webhook_spec(f'{http_target.url}/hook'))
    await cluster.wait_ready('kept', 'True', 'Accepted', generation=1)
    one = await first.post_event('repo_push', sample_payload('repo_push', 'acme/web'))
    assert one['matched'] == 1
    await cluster.wait_status('kept', lambda s: s['deliveries']['succeeded'] == 1, "the first delivery")
    await first.stop()
    assert first.done.result() is None

    second = await start_operator()  # a new engine: nothing in memory, everything from the resource
    # The receiver is up as soon as the operator is ready; kopf resumes the resource right after.
    await eventually(lambda: second.routed('kept'), "the resumed notification to be routed")
    two = await second.post_event('repo_push', sample_payload('repo_push', 'acme/web'))
    assert two['matched'] == 1
    status = await cluster.wait_status('kept', lambda s: s['deliveries']['succeeded'] == 2, "the second delivery")
    assert [record['eventId'] for record in status['recentDeliveries']] == [two['id'], one['id']]
    assert condition(status) == {
        'type': 'Ready', 'status': 'True', 'reason': 'Accepted',
        'message': 'Routing repo_push events of acme/web to webhook', 'observedGeneration': 1,
    }
    assert len(http_target.on('/hook')) == 2
    assert len(cluster.events('kept')) == 1  # no new Accepted Event: Ready did not change


async def test_a_restart_delivers_what_fell_due_before_the_resources_were_resumed(cluster, start_operator, http_target):
    """
    The dispatcher starts before kopf resumes the resources: a delivery already due then found its
    notification unknown and was removed as if deleted, with nothing recorded. It waits for the resume now.
    """
    http_target.script('/hook', Reply(status=503, headers={'Retry-After': '1'}))
    first = await start_operator(retry_schedule=(0.05,) * 4)
    names = [f'kept-{i}' for i in range(5)]
    for name in names:
        await cluster.create(name, webhook_spec(f'{http_target.url}/hook', repository=f'acme/{name}'))
    for name in names:
        await cluster.wait_ready(name, 'True', 'Accepted', generation=1)
    for name in names:
        assert (await first.post_event('repo_push', sample_payload('repo_push', f'acme/{name}')))['matched'] == 1
    for name in names:
        await cluster.wait_status(name, lambda s: (s.get('lastDelivery') or {}).get('outcome') == 'Retrying',
                                  "the first attempt to fail")
    await first.stop()
    http_target.script('/hook', Reply(status=200))
    await asyncio.sleep(1.2)  # every retry is due before the operator starts again

    await start_operator()
    for name in names:
        status = await cluster.wait_status(name, lambda s: s['deliveries']['succeeded'] == 1, "the resumed delivery")
        assert status['deliveries'] == {'succeeded': 1, 'failed': 0, 'dropped': 0}
        assert delivery(status['lastDelivery'])['attempts'] == 2
    assert len(http_target.on('/hook')) == 10


async def test_emulator_versions_objects_as_an_api_server_does(cluster):
    """The emulator extension the tests above rely on (no operator running)."""
    created = await cluster.create('plain', webhook_spec('http://127.0.0.1:9/hook'))
    meta = created['metadata']
    assert meta['namespace'] == NS and meta['generation'] == 1
    assert re.fullmatch(r'[0-9a-f-]{36}', meta['uid']) and RFC3339.match(meta['creationTimestamp'])
    versions = [int(meta['resourceVersion'])]

    async def patch(body: dict[str, Any], subresource: str = '') -> dict[str, Any]:
        path = f'/apis/{API_VERSION}/namespaces/{NS}/{PLURAL}/plain' + (f'/{subresource}' if subresource else '')
        answer = await cluster._call('PATCH', path, body, content_type='application/merge-patch+json')
        versions.append(int(answer['metadata']['resourceVersion']))
        return answer

    # Status through /status: kept, no new generation; anything else in that patch is ignored.
    answer = await patch({'status': {'observedGeneration': 1}, 'spec': {'title': 'ignored'}}, 'status')
    assert answer['status'] == {'observedGeneration': 1} and 'title' not in answer['spec']
    assert answer['metadata']['generation'] == 1
    # Metadata changes: no new generation. Status through the main resource: ignored.
    answer = await patch({'metadata': {'annotations': {'a': 'b'}}, 'status': {'observedGeneration': 7}})
    assert answer['metadata']['generation'] == 1 and answer['status'] == {'observedGeneration': 1}
    # Spec changes: a new generation.
    answer = await patch({'spec': {'title': 'T'}})
    assert answer['metadata']['generation'] == 2 and answer['spec']['title'] == 'T'
    assert versions == sorted(set(versions))  # a new resourceVersion on every change
    assert answer['metadata']['uid'] == meta['uid']
    assert answer['metadata']['creationTimestamp'] == meta['creationTimestamp']


async def test_test_annotation_sends_the_sample_once_per_value(cluster, start_operator, http_target):
    operator = await start_operator()
    await cluster.create('hook', webhook_spec(f'{http_target.url}/hook'))
    await cluster.wait_ready('hook', 'True', 'Accepted', 1)

    await cluster.annotate('hook', {'reponotify.dev/test': 'first'})
    [request] = await http_target.wait_for(1, '/hook')
    assert request.json() == sample_payload('repo_push', 'acme/web')  # the sample, aimed at the repository
    status = await cluster.wait_status('hook', lambda s: (s.get('lastTest') or {}).get('outcome') == 'Succeeded',
                                       "the test's outcome")
    assert status['lastTest']['value'] == 'first'
    assert status['lastTest']['eventId'] == status['lastDelivery']['eventId']
    assert [event['reason'] for event in cluster.events('hook')][-1] == 'TestRequested'

    await cluster.annotate('hook', {'reponotify.dev/other': 'unrelated'})  # the same test value: nothing sent
    await cluster.annotate('hook', {'reponotify.dev/test': 'second'})
    await http_target.wait_for(2, '/hook')
    await cluster.wait_status('hook', lambda s: s['lastTest']['value'] == 'second'
                              and s['lastTest']['outcome'] == 'Succeeded', "the second test")
    assert len(http_target.on('/hook')) == 2
    assert operator.routed('hook')


async def test_test_annotation_honours_filters_as_quay_does(cluster, start_operator, http_target):
    await start_operator()
    spec = {'repository': 'acme/web', 'event': 'build_start', 'eventConfig': {'refRegex': 'refs/heads/release-'},
            'method': 'webhook', 'config': {'url': f'{http_target.url}/hook'}}
    await cluster.create('builds', spec)
    await cluster.wait_ready('builds', 'True', 'Accepted', 1)
    await cluster.annotate('builds', {'reponotify.dev/test': 'try'})
    status = await cluster.wait_status('builds', lambda s: 'lastTest' in s, "the test's outcome")
    assert status['lastTest']['outcome'] == 'Filtered'
    assert status['lastTest']['message'] == ("Not sent: the sample event does not pass spec.eventConfig "
                                             "(filters apply to tests, as in Quay)")
    assert http_target.requests == []


async def test_reset_annotation_re_enables_a_disabled_notification(cluster, start_operator, http_target):
    operator = await start_operator()
    http_target.script('/hook', Reply(status=500), Reply(status=500), Reply(status=500), Reply())
    await cluster.create('hook', webhook_spec(f'{http_target.url}/hook'))
    await cluster.wait_ready('hook', 'True', 'Accepted', 1)
    await operator.post_event('repo_push', sample_payload('repo_push', 'acme/web'))
    await cluster.wait_status('hook', lambda s: ready(s)[1] == 'Disabled', "Disabled after 3 failures")

    await cluster.annotate('hook', {'reponotify.dev/reset': '1'})
    status = await cluster.wait_status('hook', lambda s: ready(s)[1] == 'Accepted', "re-enabled")
    assert status['numberOfFailures'] == 0
    # The Event is posted beside the status PATCH, not before it: wait for it as for the status.
    await eventually(lambda: 'Reset' in [event['reason'] for event in cluster.events('hook')], "the Reset Event")
    await operator.post_event('repo_push', sample_payload('repo_push', 'acme/web'))
    await http_target.wait_for(4, '/hook')  # delivered again after the reset
    await cluster.wait_status('hook', lambda s: s['deliveries']['succeeded'] == 1, "the delivery after reset")
