"""
The Prometheus metrics, scraped over HTTP after a short, fully known run.

The run: events accepted through the Quay endpoint (one replayed with its
Idempotency-Key), one through the Docker Hub adapter, one test notification;
one refused request of every rejection reason; deliveries that succeed, one
that succeeds after a retry, one final failure, one notification disabled by
three failures and the delivery dropped after that. Every counter and histogram
count of the scrape must be exactly what that run implies.
"""
import asyncio
import json
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer
from conftest import HttpTarget, Reply
from prometheus_client.parser import text_string_to_metric_families
from reponotify.dispatcher import DispatcherSettings
from reponotify.engine import Engine, EngineSettings
from reponotify.events import EVENT_NAMES, sample_payload
from reponotify.methods import METHODS
from reponotify.metrics import REJECTION_REASONS, SOURCES
from reponotify.notifications import NotificationKey, compile_notification
from reponotify.receiver import MAX_BODY_BYTES, STATE, make_app
from reponotify.standalone import ManifestSecrets, StatusFile
from test_delivery import eventually

TOKEN = 'metrics-test-token'
AUTH = {'Authorization': f'Bearer {TOKEN}'}
FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
NAMES = ('ok', 'flaky', 'broken', 'dead')  # each on its own repository acme/<name>, target path /<name>

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def key(name: str) -> NotificationKey:
    return NotificationKey('team-a', name)


@pytest.fixture
async def engine(http_target: HttpTarget, tmp_path: pathlib.Path) -> AsyncIterator[Engine]:
    engine = Engine(EngineSettings(dispatcher=DispatcherSettings(workers=4, retry_schedule=(0.01,) * 4),
                                   status_interval=0.0))
    for name in NAMES:
        spec = {'repository': f'acme/{name}', 'event': 'repo_push', 'method': 'webhook',
                'config': {'url': f'{http_target.url}/{name}'}}
        engine.admit(await compile_notification(key(name), spec, ManifestSecrets({})))
    await engine.start(StatusFile(tmp_path / 'status.json'))
    yield engine
    await engine.stop()


@pytest.fixture
async def client(engine: Engine) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(make_app(engine, token=TOKEN, read_timeout=0.3))) as test_client:
        yield test_client


async def scrape(client: TestClient, accept: str | None = None) -> tuple[str, str]:
    """GET /metrics over HTTP: (content type, body)."""
    headers = {'Accept': accept} if accept else {}
    async with ClientSession() as http, http.get(str(client.make_url('/metrics')), headers=headers) as response:
        assert response.status == 200  # a plain client, as Prometheus scrapes
        return response.headers['Content-Type'], await response.text()


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, labels), and every family's type."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            sample_key = (sample.name, frozenset(sample.labels.items()))
            assert sample_key not in samples, f"duplicate sample {sample_key}"
            samples[sample_key] = sample.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels``."""
    return sum(v for (n, sample_labels), v in samples.items()
               if n == name and frozenset(labels.items()) <= sample_labels)


async def post(client: TestClient, path: str, body: Any = None, *, data: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    response = await client.post(path, data=data if data is not None else json.dumps(body).encode(),
                                 headers={'Content-Type': 'application/json', **AUTH, **(headers or {})})
    return response.status, await response.json()


async def trickle(client: TestClient) -> bytes:
    """A request whose body never completes: the receiver answers 408 after its read timeout."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(b'POST /v1/events/repo_push HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n'
                     b'Authorization: Bearer ' + TOKEN.encode() + b'\r\nContent-Length: 100\r\n\r\n{"repos')
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()


async def test_metrics_after_a_known_run(engine: Engine, client: TestClient, http_target: HttpTarget) -> None:
    http_target.script('/flaky', Reply(status=500), Reply(status=200))
    http_target.script('/broken', Reply(status=400))
    http_target.script('/dead', Reply(status=500))

    # Accepted events: 6 through the Quay endpoint (one more replayed), 1 through Docker Hub, 1 test.
    for name in ('ok', 'flaky', 'broken', 'dead'):
        assert (await post(client, '/v1/events/repo_push', sample_payload('repo_push', f'acme/{name}')))[0] == 202
    for _ in range(2):  # the same Idempotency-Key twice: accepted once
        status, body = await post(client, '/v1/events/repo_push', sample_payload('repo_push', 'acme/ok'),
                                  headers={'Idempotency-Key': 'once'})
        assert (status, body['matched']) == (202, 1)
    hub = json.loads((FIXTURES / 'dockerhub' / 'push.json').read_text())
    status, body = await post(client, '/v1/sources/dockerhub', hub)
    assert (status, body['matched'], len(body['events'])) == (202, 0, 1)  # accepted, nothing routed for it
    await engine.send_test(key('ok'), 'metrics')

    # One refusal of each kind, and requests that are no event rejections at all.
    assert (await post(client, '/v1/events/repo_push', data=b'{"repository": '))[0] == 400
    assert (await post(client, '/v1/events/no_such_event', {}))[0] == 404
    assert (await post(client, '/v1/events/repo_push', {'no': 'repository'}))[0] == 422
    assert (await post(client, '/v1/events/repo_push', data=b' ' * (MAX_BODY_BYTES + 1)))[0] == 413
    assert (await post(client, '/v1/events/repo_push', {}, headers={'Authorization': 'Bearer wrong'}))[0] == 401
    assert (await post(client, '/v1/events/repo_push', {}, headers={'Idempotency-Key': 'k' * 256}))[0] == 400
    assert (await trickle(client)).startswith(b'HTTP/1.1 408')
    client.server.app[STATE].accepting = False
    assert (await post(client, '/v1/events/repo_push', {}))[0] == 503
    client.server.app[STATE].accepting = True
    assert (await client.get('/no/such/path')).status == 404  # not an event: not counted
    assert (await client.get('/v1/inbox', headers={'Authorization': 'Bearer wrong'})).status == 401  # nor this

    # ok: 3 successes; flaky: a retry, then a success; broken: a final failure (400 is not retried);
    # dead: 3 failed attempts (2 retries) disable it, its next event is dropped.
    def outcomes(name: str) -> dict[str, int]:
        return engine.book.status(key(name))['deliveries']
    await eventually(lambda: outcomes('ok')['succeeded'] == 3 and outcomes('flaky')['succeeded'] == 1
                     and outcomes('broken')['failed'] == 1 and outcomes('dead')['failed'] == 1, "the deliveries")
    assert (await post(client, '/v1/events/repo_push', sample_payload('repo_push', 'acme/dead')))[0] == 202
    await eventually(lambda: outcomes('dead')['dropped'] == 1, "the drop")
    await eventually(lambda: len(engine.outbox) == 0, "an empty outbox")
    assert len(http_target.on('/ok')) == 3 and len(http_target.on('/flaky')) == 2
    assert len(http_target.on('/broken')) == 1 and len(http_target.on('/dead')) == 3

    content_type, text = await scrape(client)
    assert content_type == 'text/plain; version=0.0.4; charset=utf-8'
    samples, types = parse(text)

    # Received, by source and event (and nothing else).
    received = 'reponotify_events_received_total'
    assert value(samples, received, source='quay', event='repo_push') == 6
    assert value(samples, received, source='dockerhub', event='repo_push') == 1
    assert value(samples, received, source='test', event='repo_push') == 1
    assert total(samples, received) == 8
    assert {labels for (name, labels) in samples if name == received} == {
        frozenset({('source', source), ('event', event)}) for source in SOURCES for event in EVENT_NAMES}

    # Rejected: exactly one of each reason.
    rejected = {dict(labels)['reason']: v for (name, labels), v in samples.items()
                if name == 'reponotify_events_rejected_total'}
    assert rejected == {reason: 1.0 for reason in REJECTION_REASONS}

    # Deliveries by final outcome, retries, attempts, latencies.
    deliveries = 'reponotify_deliveries_total'
    assert value(samples, deliveries, method='webhook', outcome='Succeeded') == 4
    assert value(samples, deliveries, method='webhook', outcome='Failed') == 2
    assert value(samples, deliveries, method='webhook', outcome='Dropped') == 1
    assert total(samples, deliveries) == 7
    assert {dict(labels)['outcome'] for (name, labels) in samples if name == deliveries} == {
        'Succeeded', 'Failed', 'Dropped'}  # Retrying is not a final outcome
    assert value(samples, 'reponotify_retries_total', method='webhook') == 3
    assert total(samples, 'reponotify_retries_total') == 3
    assert value(samples, 'reponotify_attempt_duration_seconds_count', method='webhook') == 9
    assert total(samples, 'reponotify_attempt_duration_seconds_count') == 9
    assert value(samples, 'reponotify_attempt_duration_seconds_bucket', method='webhook', le='+Inf') == 9
    assert 0 < value(samples, 'reponotify_attempt_duration_seconds_sum', method='webhook') < 9 * 5
    assert value(samples, 'reponotify_delivery_latency_seconds_count', method='webhook') == 7
    assert total(samples, 'reponotify_delivery_latency_seconds_count') == 7
    for method in METHODS:  # every method's series exists from the start
        assert ('reponotify_retries_total', frozenset({('method', method)})) in samples

    # Computed at scrape time: the (empty) outbox and the notifications' Ready reasons.
    assert value(samples, 'reponotify_outbox_pending') == 0
    assert value(samples, 'reponotify_outbox_oldest_pending_age_seconds') == 0
    notifications = {dict(labels)['state']: v for (name, labels), v in samples.items()
                     if name == 'reponotify_notifications'}
    assert notifications['Accepted'] == 3 and notifications['Disabled'] == 1
    assert sum(notifications.values()) == 4

    assert types == {
        'reponotify_events_received': 'counter', 'reponotify_events_rejected': 'counter',
        'reponotify_deliveries': 'counter', 'reponotify_retries': 'counter',
        'reponotify_delivery_latency_seconds': 'histogram', 'reponotify_attempt_duration_seconds': 'histogram',
        'reponotify_outbox_pending': 'gauge', 'reponotify_outbox_oldest_pending_age_seconds': 'gauge',
        'reponotify_notifications': 'gauge',
    }
    # No label carries a repository, a notification, a URL or an id: only the fixed label sets.
    assert {name for (_, labels) in samples for name, _ in labels} == {
        'source', 'event', 'reason', 'method', 'outcome', 'le', 'state'}
    for (_, labels) in samples:
        assert not any(part in label_value for _, label_value in labels
                       for part in ('acme', 'team-a', '127.0.0.1', 'http', 'svendowideit')), labels


async def test_backlog_gauges_and_openmetrics(engine: Engine, client: TestClient, http_target: HttpTarget) -> None:
    """Pending deliveries and the age of the oldest due one, as the scraper finds them; OpenMetrics on request."""
    await engine.dispatcher.stop()  # nothing is delivered: what is accepted stays pending
    for _ in range(3):
        assert (await post(client, '/v1/events/repo_push', sample_payload('repo_push', 'acme/ok')))[0] == 202
    await asyncio.sleep(0.2)
    content_type, text = await scrape(client)
    samples, _ = parse(text)
    assert value(samples, 'reponotify_outbox_pending') == 3
    assert 0.2 <= value(samples, 'reponotify_outbox_oldest_pending_age_seconds') < 10

    content_type, text = await scrape(client, accept='application/openmetrics-text; version=1.0.0')
    assert content_type.startswith('application/openmetrics-text')
    assert text.endswith('# EOF\n')
    assert 'reponotify_events_received_total{event="repo_push",source="quay"} 3.0' in text
