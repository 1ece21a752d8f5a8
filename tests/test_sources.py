"""
Registry adapters: Docker Distribution, Harbor, Docker Hub and Quay bodies in, Quay events out.

The adapters are checked as pure functions on the fixtures (exact normalised events), then
over real HTTP through the receiver: exact answers for every kind of input (accepted, ignored,
malformed, unauthenticated, unknown), what lands in the outbox, idempotency across repeated
and overlapping envelopes, per-source credentials, and (hypothesis) that no JSON body makes an
adapter fail with anything but a precise 422.

Fixtures: tests/fixtures/distribution/ (captured from a real registry), harbor/ and dockerhub/
(from those projects' documentation; see the READMEs there).
"""
import copy
import hashlib
import hmac
import json
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reponotify.config import SourceSettings
from reponotify.engine import Engine, EngineSettings
from reponotify.events import sample_payload
from reponotify.notifications import NotificationKey, compile_notification
from reponotify.outbox import PendingDelivery
from reponotify.receiver import make_app
from reponotify.sources import ADAPTERS, configure, distribution, dockerhub, harbor, quay
from reponotify.sources.common import Malformed, Normalised, SourceEvent
from reponotify.standalone import ManifestSecrets

FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures'
TOKEN = 'source-token'
AUTH = {'Authorization': f'Bearer {TOKEN}'}
DEFAULTS = SourceSettings()

PUSH_ID = 'fd982000-c839-4834-acf8-fc98976d19b0'  # the id in distribution/manifest-push-envelope.json
REGISTRY = '127.0.0.1:37975'
ALPINE_DIGEST = 'sha256:954b378c375d852eb3c63ab88978f640b4348b01c1b3456a024a81536dafbbf4'
HARBOR_ALPINE_API = ('https://localhost/api/v2.0/projects/harbor/repositories/alpine/artifacts/'
                     f'{ALPINE_DIGEST}/additions/vulnerabilities')
NO_TAG = "a push without a tag (a blob, or a manifest pushed by digest)"


def fixture(path: str) -> Any:
    return json.loads((FIXTURES / path).read_text())


def triples(normalised: Normalised) -> list[tuple[str, dict[str, Any], str | None]]:
    return [(event.kind, event.payload, event.idempotency_key) for event in normalised.events]


def reasons(normalised: Normalised) -> list[dict[str, Any]]:
    return [ignored.to_json() for ignored in normalised.ignored]


def envelope_of(*events: dict[str, Any]) -> dict[str, Any]:
    return {'events': list(events)}


def push_event(event_id: str, tag: str | None, repository: str = 'acme/web', action: str = 'push') -> dict[str, Any]:
    """A registry event shaped like the captured manifest push, with another id, tag, repository or action."""
    event = copy.deepcopy(fixture('distribution/manifest-push-envelope.json')['events'][0])
    event['id'], event['action'] = event_id, action
    event['target']['repository'] = repository
    if tag is None:
        del event['target']['tag']
    else:
        event['target']['tag'] = tag
    return event


# -- Docker Distribution: the adapter -----------------------------------------------------------

def test_distribution_manifest_push_with_tag_is_repo_push() -> None:
    normalised = distribution.normalise(fixture('distribution/manifest-push-envelope.json'), DEFAULTS)
    assert triples(normalised) == [('repo_push', {
        'repository': 'acme/web', 'namespace': 'acme', 'name': 'web',
        'docker_url': f'{REGISTRY}/acme/web',
        'homepage': f'http://{REGISTRY}/v2/acme/web/tags/list',
        'updated_tags': ['v1'],
    }, f'distribution:event:{PUSH_ID}')]
    assert normalised.events[0].claims == ()
    assert normalised.ignored == []


@pytest.mark.parametrize('name, reason', [
    ('blob-push-envelope.json', "a push without a tag (a blob, or a manifest pushed by digest)"),
    ('manifest-pull-envelope.json', "action 'pull' is not a push"),
    ('blob-mount-envelope.json', "action 'mount' is not a push"),
    ('manifest-delete-envelope.json', "action 'delete' is not a push"),
    ('tag-delete-envelope.json', "action 'delete' is not a push"),
])
def test_distribution_other_actions_are_ignored(name: str, reason: str) -> None:
    envelope = fixture(f'distribution/{name}')
    normalised = distribution.normalise(envelope, DEFAULTS)
    assert normalised.events == []
    assert reasons(normalised) == [{'id': envelope['events'][0]['id'], 'reason': reason}]


def test_distribution_manifest_pushed_by_digest_is_ignored() -> None:
    normalised = distribution.normalise(envelope_of(push_event('e1', None)), DEFAULTS)
    assert normalised.events == []
    assert reasons(normalised) == [{'id': 'e1', 'reason': NO_TAG}]


def test_distribution_tags_of_one_repository_coalesce_into_one_event() -> None:
    envelope = envelope_of(push_event('e1', 'v1'), push_event('e2', 'v2'), push_event('e3', 'v1'),
                           push_event('e4', 'latest', repository='acme/api'),
                           push_event('e5', 'v3', action='pull'))
    normalised = distribution.normalise(envelope, DEFAULTS)
    [web, api] = normalised.events
    assert (web.kind, web.payload['repository'], web.payload['updated_tags']) == ('repo_push', 'acme/web',
                                                                                 ['v1', 'v2'])
    keys = ('distribution:event:e1', 'distribution:event:e2', 'distribution:event:e3')
    assert web.claims == keys
    assert web.idempotency_key == 'distribution:events:' + hashlib.sha256(
        json.dumps([sorted(keys)]).encode()).hexdigest()
    assert (api.payload['repository'], api.payload['updated_tags'], api.idempotency_key, api.claims) == (
        'acme/api', ['latest'], 'distribution:event:e4', ())
    assert reasons(normalised) == [{'id': 'e5', 'reason': "action 'pull' is not a push"}]
    # Rebuilt without what an earlier event holds: the rest, or nothing.
    rebuilt = web.without(frozenset({'distribution:event:e1', 'distribution:event:e3'}))
    assert (rebuilt.payload['updated_tags'], rebuilt.idempotency_key, rebuilt.claims) == (
        ['v2'], 'distribution:event:e2', ())
    assert web.without(frozenset(keys)) is None


def test_distribution_registry_host_and_homepage_are_configurable() -> None:
    settings = SourceSettings(distribution_registry_host='registry.example.com',
                              distribution_homepage_url='https://ui.example.com/repo/{namespace}/{name}')
    [event] = distribution.normalise(fixture('distribution/manifest-push-envelope.json'), settings).events
    assert event.payload['docker_url'] == 'registry.example.com/acme/web'
    assert event.payload['homepage'] == 'https://ui.example.com/repo/acme/web'
    base = SourceSettings(distribution_homepage_url='https://ui.example.com/repositories/')
    [event] = distribution.normalise(fixture('distribution/manifest-push-envelope.json'), base).events
    assert event.payload['homepage'] == 'https://ui.example.com/repositories/acme/web'


@pytest.mark.parametrize('host, url, docker_url, homepage', [
    # A junk request host: the host of the target's URL.
    ('evil.example/<script>', 'https://registry.example.com:5000/v2/acme/web/manifests/sha256:abc',
     'registry.example.com:5000/acme/web', 'https://registry.example.com:5000/v2/acme/web/tags/list'),
    # A URL urlsplit refuses ("http://[::1" raised): the request host, and no error.
    ('registry.example.com', 'http://[::1',
     'registry.example.com/acme/web', 'https://registry.example.com/v2/acme/web/tags/list'),
], ids=['junk host', 'unparsable url'])
def test_distribution_host_falls_back_and_ignores_junk(host: str, url: str, docker_url: str, homepage: str) -> None:
    event = push_event('e1', 'v1')
    event['request']['host'] = host
    event['target']['url'] = url
    [normalised] = distribution.normalise(envelope_of(event), DEFAULTS).events
    assert normalised.payload['docker_url'] == docker_url
    assert normalised.payload['homepage'] == homepage


@pytest.mark.parametrize('repository, tag, reason', [
    ('web', 'v1', "repository 'web' is not a lowercase \"namespace/name\" path, so no notification can name it"),
    ('Acme/Web', 'v1', ("repository 'Acme/Web' is not a lowercase \"namespace/name\" path, "
                       "so no notification can name it")),
    ('acme/web', '-bad', "tag '-bad' is not a valid tag"),
])
def test_distribution_unroutable_pushes_are_ignored(repository: str, tag: str, reason: str) -> None:
    normalised = distribution.normalise(envelope_of(push_event('e1', tag, repository=repository)), DEFAULTS)
    assert (normalised.events, reasons(normalised)) == ([], [{'id': 'e1', 'reason': reason}])


def test_distribution_event_without_id_gets_a_content_key() -> None:
    event = push_event('e1', 'v1')
    del event['id']
    [first] = distribution.normalise(envelope_of(event), DEFAULTS).events
    [again] = distribution.normalise(envelope_of(copy.deepcopy(event)), DEFAULTS).events
    assert first.idempotency_key == again.idempotency_key
    assert first.idempotency_key.startswith('distribution:event:sha256:')


@pytest.mark.parametrize('body', [[], {}, {'events': {}}, {'events': None}, 'events', None])
def test_distribution_non_envelopes_are_malformed(body: Any) -> None:
    with pytest.raises(Malformed, match='not a Docker Distribution notification envelope'):
        distribution.normalise(body, DEFAULTS)


def test_distribution_odd_entries_inside_an_envelope_are_ignored_not_malformed() -> None:
    normalised = distribution.normalise({'events': [42, {'action': 'push', 'target': 'x'}, {}]}, DEFAULTS)
    assert normalised.events == []
    assert reasons(normalised) == [
        {'reason': "an event that is not a JSON object"},
        {'reason': "a push without a tag (a blob, or a manifest pushed by digest)"},
        {'reason': "action 'None' is not a push"},
    ]


# -- Harbor: the adapter ------------------------------------------------------------------------

HARBOR_DEBIAN = {
    'repository': 'test-webhook/debian', 'namespace': 'test-webhook', 'name': 'debian',
    'docker_url': 'hub.harbor.com/test-webhook/debian', 'homepage': 'https://hub.harbor.com/harbor/projects',
}


def test_harbor_push_artifact_is_repo_push() -> None:
    body = fixture('harbor/push-artifact.json')
    normalised = harbor.normalise(body, DEFAULTS)
    key = 'harbor:' + hashlib.sha256(json.dumps(
        ['PUSH_ARTIFACT', 1586922308, 'test-webhook/debian', body['event_data']['resources']],
        sort_keys=True).encode()).hexdigest()
    assert triples(normalised) == [('repo_push', {**HARBOR_DEBIAN, 'updated_tags': ['latest']}, key)]


def test_harbor_cloudevents_push_is_the_same_repo_push_keyed_by_its_id() -> None:
    normalised = harbor.normalise(fixture('harbor/push-artifact-cloudevents.json'), DEFAULTS)
    assert triples(normalised) == [('repo_push', {**HARBOR_DEBIAN, 'updated_tags': ['latest']},
                                    'harbor:66e18103-09c1-41f6-982f-37df223f3eeb')]


def test_harbor_homepage_is_configurable() -> None:
    settings = SourceSettings(harbor_homepage_url='https://{host}/harbor/search?q={name}')
    [event] = harbor.normalise(fixture('harbor/push-artifact.json'), settings).events
    assert event.payload['homepage'] == 'https://hub.harbor.com/harbor/search?q=debian'


def test_harbor_push_by_digest_is_ignored() -> None:
    normalised = harbor.normalise(fixture('harbor/push-artifact-by-digest.json'), DEFAULTS)
    assert normalised.events == []
    assert reasons(normalised) == [{'reason': "an artifact pushed without a tag (by digest)"}]


def test_harbor_scan_is_one_vulnerability_found_per_reported_severity() -> None:
    body = fixture('harbor/scanning-completed.json')
    normalised = harbor.normalise(body, DEFAULTS)
    key = 'harbor:' + hashlib.sha256(json.dumps(
        ['SCANNING_COMPLETED', 1680502375, 'harbor/alpine', body['event_data']['resources']],
        sort_keys=True).encode()).hexdigest()
    digest = ALPINE_DIGEST
    fields = {'repository': 'harbor/alpine', 'namespace': 'harbor', 'name': 'alpine',
              'docker_url': 'localhost/harbor/alpine', 'homepage': 'https://localhost/harbor/projects',
              'tags': ['3.17']}

    def vulnerability(priority: str, found: str) -> dict[str, Any]:
        return {**fields, 'vulnerability': {
            'id': 'af0546c1-67dc-4e9d-927e-372900ead0df',
            'description': f"{found} found by Trivy v0.37.2 in harbor/alpine:3.17 (9 in total, 7 fixable)",
            'link': HARBOR_ALPINE_API, 'priority': priority, 'has_fix': True}}
    assert triples(normalised) == [
        ('vulnerability_found', vulnerability('Critical', "1 Critical vulnerability"), f'{key}:{digest}:Critical'),
        ('vulnerability_found', vulnerability('High', "3 High vulnerabilities"), f'{key}:{digest}:High'),
        ('vulnerability_found', vulnerability('Medium', "5 Medium vulnerabilities"), f'{key}:{digest}:Medium'),
    ]


def test_harbor_cloudevents_scan_without_tag_and_without_findings() -> None:
    clean = fixture('harbor/scanning-completed-clean.json')
    normalised = harbor.normalise(clean, DEFAULTS)
    assert (normalised.events, reasons(normalised)) == (
        [], [{'id': '64bce2fe-6159-454d-8389-852d01ef1e9d', 'reason': "the scan reports no vulnerabilities"}])
    # The same scan with findings: events for the digest (no tag), keyed by the CloudEvents id.
    report = clean['data']['resources'][0]['scan_overview'][
        'application/vnd.security.vulnerability.report; version=1.1']
    report['summary'] = {'total': 2, 'fixable': 0, 'summary': {'low': 1, 'Unknown': 1, 'Bogus': 4}}
    events = harbor.normalise(clean, DEFAULTS).events
    assert [(e.payload['vulnerability']['priority'], e.payload['tags'], e.payload['vulnerability']['has_fix'])
            for e in events] == [('Low', [], False), ('Unknown', [], False)]
    assert events[0].idempotency_key.startswith('harbor:64bce2fe-6159-454d-8389-852d01ef1e9d:sha256:')
    assert events[0].payload['vulnerability']['description'] == (
        "1 Low vulnerability found by Trivy v0.37.2 in harbor/alpine@sha256:954b378c375d852eb3c63ab88978f640b4348b01"
        "c1b3456a024a81536dafbbf4 (2 in total, 0 fixable)")


@pytest.mark.parametrize('name', ['harbor/pull-artifact.json'])
def test_harbor_other_types_are_ignored(name: str) -> None:
    normalised = harbor.normalise(fixture(name), DEFAULTS)
    assert (normalised.events, reasons(normalised)) == (
        [], [{'reason': "Harbor event type 'PULL_ARTIFACT' has no Quay equivalent"}])


@pytest.mark.parametrize('body, message', [
    ([], 'body is not a Harbor webhook payload: expected a JSON object with a "type"'),
    ({'event_data': {}}, 'body is not a Harbor webhook payload: expected a JSON object with a "type"'),
    ({'type': 'PUSH_ARTIFACT'}, "Harbor PUSH_ARTIFACT payload has no event_data object"),
    ({'type': 'harbor.artifact.pushed', 'specversion': '1.0'},
     "Harbor harbor.artifact.pushed payload has no data object"),
    ({'type': 'PUSH_ARTIFACT', 'event_data': {'resources': []}},
     "Harbor PUSH_ARTIFACT payload has no repository.repo_full_name"),
    ({'type': 'PUSH_ARTIFACT', 'event_data': {'repository': {'repo_full_name': 'a/b'}}},
     "Harbor PUSH_ARTIFACT payload has no resources list"),
])
def test_harbor_malformed_bodies(body: Any, message: str) -> None:
    with pytest.raises(Malformed) as raised:
        harbor.normalise(body, DEFAULTS)
    assert str(raised.value) == message


# -- Docker Hub and Quay: the adapters ---------------------------------------------------------

def test_dockerhub_push_is_repo_push() -> None:
    normalised = dockerhub.normalise(fixture('dockerhub/push.json'), DEFAULTS)
    content = ['svendowideit/testhook', 'latest', 1417566161]
    key = 'dockerhub:' + hashlib.sha256(json.dumps(content).encode()).hexdigest()
    assert triples(normalised) == [('repo_push', {
        'repository': 'svendowideit/testhook', 'namespace': 'svendowideit', 'name': 'testhook',
        'docker_url': 'docker.io/svendowideit/testhook',
        'homepage': 'https://registry.hub.docker.com/u/svendowideit/testhook/',
        'updated_tags': ['latest'],
    }, key)]


@pytest.mark.parametrize('body, message', [
    ({'push_data': {'tag': 'x'}}, ('body is not a Docker Hub webhook payload: expected {"push_data": {...}, '
                                  '"repository": {...}}')),
    ({'push_data': {}, 'repository': {}}, "Docker Hub payload has no repository.repo_name"),
])
def test_dockerhub_malformed_bodies(body: Any, message: str) -> None:
    with pytest.raises(Malformed) as raised:
        dockerhub.normalise(body, DEFAULTS)
    assert str(raised.value) == message


def test_dockerhub_an_unparsable_repo_url_falls_back_to_docker_hub() -> None:
    body = fixture('dockerhub/push.json')
    body['repository']['repo_url'] = 'http://[::1'
    [normalised] = dockerhub.normalise(body, DEFAULTS).events
    assert normalised.payload['homepage'] == f"https://hub.docker.com/r/{normalised.payload['repository']}"


def test_dockerhub_push_without_tag_is_ignored() -> None:
    body = fixture('dockerhub/push.json')
    del body['push_data']['tag']
    normalised = dockerhub.normalise(body, DEFAULTS)
    assert (normalised.events, reasons(normalised)) == ([], [{'reason': "a push without a tag"}])


def test_quay_body_passes_unchanged() -> None:
    payload = {'name': 'repository', 'repository': 'dgangaia/test', 'namespace': 'dgangaia',
               'docker_url': 'quay.io/dgangaia/test', 'homepage': 'https://quay.io/repository/dgangaia/repository',
               'updated_tags': ['latest']}  # Quay's documented repo_push payload
    assert triples(quay.normalise('repo_push', payload, DEFAULTS, 'abc')) == [('repo_push', payload, 'quay:abc')]
    with pytest.raises(Malformed, match="payload has no 'repository' field"):
        quay.normalise('repo_push', {}, DEFAULTS)


# -- every JSON body: an event list or a precise Malformed, nothing else -----------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20)
    | st.sampled_from(['push', 'pull', 'v1', 'acme/web', 'PUSH_ARTIFACT', 'SCANNING_COMPLETED',
                       'harbor.scan.completed', 'sha256:abc', 'Critical', '1.0']),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(['events', 'id', 'action', 'target', 'tag', 'repository', 'request', 'host', 'url', 'type',
                         'event_data', 'data', 'resources', 'repo_full_name', 'scan_overview', 'summary',
                         'push_data', 'repo_name', 'repo_url', 'specversion', 'resource_url', 'namespace']),
        children, max_size=6),
    max_leaves=30)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=JSON, source=st.sampled_from(sorted(ADAPTERS)))
def test_adapters_take_any_json(body: Any, source: str) -> None:
    try:
        normalised = ADAPTERS[source](body, DEFAULTS)
    except Malformed:
        return
    for event in normalised.events:
        assert isinstance(event, SourceEvent)
        assert isinstance(event.payload['repository'], str)
        json.dumps(event.payload)


# -- over HTTP ---------------------------------------------------------------------------------

WEB = NotificationKey('team-a', 'web-pushes')
ALPINE = NotificationKey('team-a', 'alpine-critical')


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    """Routed notifications, the outbox open, the dispatcher not running: the outbox keeps what is queued."""
    engine = Engine(EngineSettings())
    for key, spec in [
        (WEB, {'repository': 'acme/web', 'event': 'repo_push', 'method': 'webhook',
               'config': {'url': 'http://127.0.0.1:9/hook'}}),
        (ALPINE, {'repository': 'harbor/alpine', 'event': 'vulnerability_found', 'eventConfig': {'level': 'High'},
                  'method': 'webhook', 'config': {'url': 'http://127.0.0.1:9/hook'}}),
    ]:
        engine.put_notification(await compile_notification(key, spec, ManifestSecrets({})))
    await engine.outbox.open()
    yield engine
    await engine.outbox.close()


@pytest.fixture
async def client(engine: Engine) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(make_app(engine, token=TOKEN))) as test_client:
        yield test_client


async def queued(engine: Engine) -> list[PendingDelivery]:
    deliveries = []
    while len(engine.outbox):
        delivery = await engine.outbox.take()
        await engine.outbox.complete(delivery)
        deliveries.append(delivery)
    return deliveries


async def answer(response: Any) -> tuple[int, Any]:
    assert response.headers['Content-Type'] == 'application/json; charset=utf-8'
    return response.status, await response.json()


async def test_distribution_push_is_accepted_and_queued(client: TestClient, engine: Engine) -> None:
    body = (FIXTURES / 'distribution/manifest-push-envelope.json').read_bytes()
    response = await client.post('/v1/sources/distribution', data=body, headers={
        **AUTH, 'Content-Type': distribution.MEDIA_TYPE})
    status, answered = await answer(response)
    assert status == 202
    assert answered == {'events': [{'id': answered['events'][0]['id'], 'kind': 'repo_push',
                                    'repository': 'acme/web', 'matched': 1, 'replayed': False}],
                        'matched': 1, 'ignored': []}
    [delivery] = await queued(engine)
    assert (delivery.key, delivery.event.id, delivery.event.kind) == (WEB, answered['events'][0]['id'], 'repo_push')
    assert delivery.event.payload['updated_tags'] == ['v1']


@pytest.mark.parametrize('name', ['blob-push-envelope.json', 'manifest-pull-envelope.json', 'blob-mount-envelope.json',
                                  'manifest-delete-envelope.json', 'tag-delete-envelope.json'])
async def test_distribution_ignored_envelopes_get_202(client: TestClient, engine: Engine, name: str) -> None:
    envelope = fixture(f'distribution/{name}')
    status, answered = await answer(await client.post('/v1/sources/distribution', json=envelope, headers=AUTH))
    assert status == 202
    assert answered['events'] == [] and answered['matched'] == 0
    assert [item['id'] for item in answered['ignored']] == [envelope['events'][0]['id']]
    assert len(engine.outbox) == 0


async def test_distribution_repeated_envelope_is_delivered_once(client: TestClient, engine: Engine) -> None:
    envelope = fixture('distribution/manifest-push-envelope.json')
    first = await (await client.post('/v1/sources/distribution', json=envelope, headers=AUTH)).json()
    response = await client.post('/v1/sources/distribution', json=envelope, headers=AUTH)
    status, again = await answer(response)
    assert status == 202
    assert again['events'] == [{**first['events'][0], 'replayed': True}]
    assert len(await queued(engine)) == 1


async def test_a_client_key_cannot_claim_a_registry_event(client: TestClient, engine: Engine) -> None:
    """
    /v1/events kept its Idempotency-Key as given, beside the sources' own keys: a client sending the key a
    registry event would get ("distribution:event:<id>") made that push a "replay", never delivered.
    """
    envelope = fixture('distribution/manifest-push-envelope.json')
    claim = {**AUTH, 'Idempotency-Key': f"distribution:event:{envelope['events'][0]['id']}"}
    other = sample_payload('repo_push', 'other/thing')
    assert (await client.post('/v1/events/repo_push', json=other, headers=claim)).status == 202
    status, answered = await answer(await client.post('/v1/sources/distribution', json=envelope, headers=AUTH))
    assert (status, answered['matched'], answered['events'][0]['replayed']) == (202, 1, False)
    assert [delivery.event.payload['updated_tags'] for delivery in await queued(engine)] == [['v1']]


async def test_quay_keys_are_one_namespace_on_both_quay_endpoints(client: TestClient, engine: Engine) -> None:
    """Quay's notifications come to /v1/events or /v1/sources/quay: a key is the same key on either."""
    payload = sample_payload('repo_push', 'acme/web')
    headers = {**AUTH, 'Idempotency-Key': 'quay-both'}
    first = await (await client.post('/v1/events/repo_push', json=payload, headers=headers)).json()
    status, again = await answer(await client.post('/v1/sources/quay/repo_push', json=payload, headers=headers))
    assert (status, again['events'][0]['id'], again['events'][0]['replayed']) == (202, first['id'], True)
    assert len(await queued(engine)) == 1


async def test_distribution_overlapping_envelopes_deliver_each_registry_event_once(
        client: TestClient, engine: Engine) -> None:
    async def post(*events: dict[str, Any]) -> dict[str, Any]:
        response = await client.post('/v1/sources/distribution', json=envelope_of(*events), headers=AUTH)
        status, answered = await answer(response)
        assert status == 202
        return answered

    await post(push_event('e1', 'v1'))                                  # e1 alone
    both = await post(push_event('e1', 'v1'), push_event('e2', 'v2'))  # e1 again, with e2
    await post(push_event('e1', 'v1'), push_event('e2', 'v2'))         # the same envelope, retried
    alone = await post(push_event('e2', 'v2'))                         # e2 alone, after it came coalesced
    three = await post(push_event('e2', 'v2'), push_event('e3', 'v3'), push_event('e4', 'v4'))
    assert [item['replayed'] for item in both['events'] + alone['events'] + three['events']] == [False, True, False]
    assert alone['events'][0]['id'] == both['events'][0]['id']
    tags = [delivery.event.payload['updated_tags'] for delivery in await queued(engine)]
    assert tags == [['v1'], ['v2'], ['v3', 'v4']]
    # Once every part was delivered through other envelopes, the envelope is a replay with nothing queued.
    status, answered = await answer(await client.post(
        '/v1/sources/distribution', json=envelope_of(push_event('e1', 'v1'), push_event('e4', 'v4')), headers=AUTH))
    assert (status, answered['events'], answered['matched']) == (202, [
        {'id': None, 'kind': 'repo_push', 'repository': 'acme/web', 'matched': 0, 'replayed': True}], 0)
    assert len(engine.outbox) == 0


async def test_harbor_scan_queues_only_what_the_level_asks_for(client: TestClient, engine: Engine) -> None:
    status, answered = await answer(await client.post(
        '/v1/sources/harbor', json=fixture('harbor/scanning-completed.json'), headers=AUTH))
    assert status == 202
    assert [(item['kind'], item['repository'], item['matched']) for item in answered['events']] == [
        ('vulnerability_found', 'harbor/alpine', 1), ('vulnerability_found', 'harbor/alpine', 1),
        ('vulnerability_found', 'harbor/alpine', 0)]  # Critical, High (level: High), Medium
    assert answered['matched'] == 2
    priorities = [d.event.payload['vulnerability']['priority'] for d in await queued(engine)]
    assert sorted(priorities) == ['Critical', 'High']
    # Harbor retrying the same body changes nothing.
    again = await (await client.post('/v1/sources/harbor', json=fixture('harbor/scanning-completed.json'),
                                     headers=AUTH)).json()
    assert [item['replayed'] for item in again['events']] == [True, True, True]
    assert len(engine.outbox) == 0


@pytest.mark.parametrize('path, body, ignored', [
    ('/v1/sources/harbor', 'harbor/pull-artifact.json',
     [{'reason': "Harbor event type 'PULL_ARTIFACT' has no Quay equivalent"}]),
    ('/v1/sources/harbor', 'harbor/push-artifact-by-digest.json',
     [{'reason': "an artifact pushed without a tag (by digest)"}]),
    ('/v1/sources/harbor', 'harbor/scanning-completed-clean.json',
     [{'id': '64bce2fe-6159-454d-8389-852d01ef1e9d', 'reason': "the scan reports no vulnerabilities"}]),
])
async def test_ignored_bodies_answer_202_matched_0(client: TestClient, engine: Engine, path: str, body: str,
                                                    ignored: list[dict[str, Any]]) -> None:
    response = await client.post(path, json=fixture(body), headers=AUTH)
    assert await answer(response) == (202, {'events': [], 'matched': 0, 'ignored': ignored})
    assert len(engine.outbox) == 0


async def test_dockerhub_push_with_token_in_the_url(client: TestClient, engine: Engine) -> None:
    response = await client.post(f'/v1/sources/dockerhub?token={TOKEN}', json=fixture('dockerhub/push.json'))
    status, answered = await answer(response)
    assert (status, answered['matched'], answered['events'][0]['repository']) == (202, 0, 'svendowideit/testhook')


async def test_quay_source_takes_quay_payloads_and_idempotency_keys(client: TestClient, engine: Engine) -> None:
    payload = {'repository': 'acme/web', 'namespace': 'acme', 'name': 'web', 'docker_url': 'quay.io/acme/web',
               'homepage': 'https://quay.io/repository/acme/web', 'updated_tags': ['latest']}
    headers = {'Idempotency-Key': 'quay-1'}
    first = await client.post(f'/v1/sources/quay/repo_push?token={TOKEN}', json=payload, headers=headers)
    again = await client.post(f'/v1/sources/quay/repo_push?token={TOKEN}', json=payload, headers=headers)
    status, answered = await answer(first)
    assert (status, answered['matched'], [item['replayed'] for item in (await again.json())['events']]) == (
        202, 1, [True])
    [delivery] = await queued(engine)
    assert delivery.event.payload == payload


@pytest.mark.parametrize('path, body, status, message', [
    ('/v1/sources/distribution', b'{"events": [', 400, ("body is not valid JSON: Expecting value: line 1 column 13 "
                                                      "(char 12)")),
    ('/v1/sources/distribution', b'{"events": [NaN]}', 400, "body is not valid JSON: NaN is not a JSON value"),
    ('/v1/sources/distribution', b'[]', 422,
     'body is not a Docker Distribution notification envelope: expected {"events": [...]}'),
    ('/v1/sources/distribution', b'{"event": []}', 422,
     'body is not a Docker Distribution notification envelope: expected {"events": [...]}'),
    ('/v1/sources/harbor', b'{"type": "PUSH_ARTIFACT"}', 422, "Harbor PUSH_ARTIFACT payload has no event_data object"),
    ('/v1/sources/dockerhub', b'{}', 422,
     'body is not a Docker Hub webhook payload: expected {"push_data": {...}, "repository": {...}}'),
    ('/v1/sources/quay/repo_push', b'{}', 422, "payload has no 'repository' field (expected \"namespace/name\")"),
    ('/v1/sources/gitlab', b'{}', 404, ("unknown source 'gitlab'; known sources: distribution, dockerhub, harbor, "
                                       "quay/<event>")),
    ('/v1/sources/quay/repo_pull', b'{}', 404, ("unknown event 'repo_pull'; known events: repo_push, build_queued, "
                                              "build_start, build_success, build_failure, build_cancelled, "
                                              "vulnerability_found, repo_mirror_sync_started, "
                                              "repo_mirror_sync_success, repo_mirror_sync_failed, repo_image_expiry")),
])
async def test_bad_requests_get_a_precise_4xx(client: TestClient, engine: Engine, path: str, body: bytes,
                                              status: int, message: str) -> None:
    assert await answer(await client.post(path, data=body, headers=AUTH)) == (status, {'error': message})
    assert len(engine.outbox) == 0


UNAUTHORIZED = ("missing or wrong credentials (Authorization: Bearer <token>, ?token=<token>, "
                "or X-Signature: sha256=<hmac>)")


@pytest.mark.parametrize('source', ['distribution', 'harbor', 'dockerhub', 'quay/repo_push'])
@pytest.mark.parametrize('headers, query', [({}, ''), ({'Authorization': 'Bearer wrong'}, ''), ({}, '?token=wrong')])
async def test_sources_require_the_receiver_token(client: TestClient, engine: Engine, source: str,
                                                  headers: dict[str, str], query: str) -> None:
    response = await client.post(f'/v1/sources/{source}{query}', json={'events': []}, headers=headers)
    assert await answer(response) == (401, {'error': UNAUTHORIZED})


async def test_per_source_credentials(engine: Engine) -> None:
    app = make_app(engine, token=TOKEN, hmac_secret='global-hmac')
    configure(app, SourceSettings(tokens={'dockerhub': 'hub-token'}, hmac_secrets={'harbor': 'harbor-hmac'},
                                  unauthenticated=frozenset({'distribution'})))
    envelope = json.dumps({'events': []}).encode()
    signature = 'sha256=' + hmac.new(b'harbor-hmac', envelope, hashlib.sha256).hexdigest()
    global_signature = 'sha256=' + hmac.new(b'global-hmac', envelope, hashlib.sha256).hexdigest()
    async with TestClient(TestServer(app)) as client:
        async def status(path: str, headers: dict[str, str] | None = None) -> int:
            return (await client.post(path, data=envelope, headers=headers or {})).status
        assert await status('/v1/sources/distribution') == 202                     # no credentials needed
        assert await status('/v1/sources/dockerhub?token=hub-token') == 422        # its own token: in
        assert await status('/v1/sources/dockerhub', {'Authorization': 'Bearer hub-token'}) == 422
        assert await status('/v1/sources/dockerhub', AUTH) == 401                  # the global one: out
        assert await status('/v1/sources/harbor', {'X-Signature': signature}) == 422
        assert await status('/v1/sources/harbor', {'X-Signature': global_signature}) == 401
        assert await status('/v1/sources/harbor', AUTH) == 401
        assert await status('/v1/sources/quay/repo_push', {'X-Signature': global_signature}) == 422  # global
        assert await status('/v1/sources/quay/repo_push', AUTH) == 422
    assert len(engine.outbox) == 0


async def test_sources_answer_503_while_shutting_down(client: TestClient, engine: Engine) -> None:
    from reponotify.receiver import STATE
    client.server.app[STATE].accepting = False
    response = await client.post('/v1/sources/distribution', json=fixture('distribution/manifest-push-envelope.json'),
                                 headers=AUTH)
    assert response.status == 503 and response.headers['Retry-After'] == '5'
    assert len(engine.outbox) == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=JSON, source=st.sampled_from(['distribution', 'harbor', 'dockerhub', 'quay/repo_push']))
async def test_any_json_body_gets_202_or_a_precise_422_never_a_5xx(client: TestClient, body: Any,
                                                                   source: str) -> None:
    response = await client.post(f'/v1/sources/{source}', data=json.dumps(body), headers=AUTH)
    assert response.status in (202, 422), await response.text()


# -- the command line --------------------------------------------------------------------------

def _settings_from(args: list[str], env: dict[str, str] | None = None) -> Any:
    import click
    from click.testing import CliRunner

    from reponotify.cli import build_settings, common_options

    built: list[Any] = []

    @click.command()
    @common_options
    def probe(**kwargs: Any) -> None:
        built.append(build_settings(**kwargs))
    result = CliRunner().invoke(probe, args, env=env or {})
    return built[0] if built else result.output


def test_command_line_source_options(tmp_path: pathlib.Path) -> None:
    (tmp_path / 'hub').write_text('hub-token\n')
    (tmp_path / 'harbor').write_text('harbor-secret\n')
    settings = _settings_from(
        ['--distribution-registry-host', 'registry.example.com:5000',
         '--distribution-homepage-url', 'https://ui.example.com/{repository}',
         '--harbor-homepage-url', 'https://{host}/harbor/projects',
         '--source-token-file', f'dockerhub={tmp_path / "hub"}',
         '--source-hmac-secret-file', f'harbor={tmp_path / "harbor"}',
         '--unauthenticated-source', 'quay'])
    assert settings.receiver.sources == SourceSettings(
        distribution_registry_host='registry.example.com:5000',
        distribution_homepage_url='https://ui.example.com/{repository}',
        harbor_homepage_url='https://{host}/harbor/projects',
        tokens={'dockerhub': 'hub-token'}, hmac_secrets={'harbor': 'harbor-secret'},
        unauthenticated=frozenset({'quay'}))
    # The environment variables, several entries separated by spaces.
    (tmp_path / 'registry').write_text('registry-token')
    settings = _settings_from([], env={
        'REPONOTIFY_SOURCE_TOKEN_FILE': f'dockerhub={tmp_path / "hub"} distribution={tmp_path / "registry"}',
        'REPONOTIFY_DISTRIBUTION_REGISTRY_HOST': 'registry.example.com'})
    assert settings.receiver.sources.tokens == {'dockerhub': 'hub-token', 'distribution': 'registry-token'}
    assert settings.receiver.sources.distribution_registry_host == 'registry.example.com'
    assert _settings_from([]).receiver.sources == SourceSettings()


@pytest.mark.parametrize('args, message', [
    (['--source-token-file', 'gitlab=/x'], "expected NAME=PATH with NAME one of distribution, dockerhub, harbor, quay"),
    (['--source-token-file', 'dockerhub'], "expected NAME=PATH"),
    (['--distribution-registry-host', 'registry.example.com/path'], "must be a registry host"),
    (['--distribution-homepage-url', 'https://ui.example.com/{repo}'], "unknown placeholder {repo}"),
    (['--harbor-homepage-url', 'ftp://ui.example.com/'], "must be an http(s) URL"),
    (['--unauthenticated-source', 'gitlab'], "'gitlab' is not one of"),
])
def test_command_line_rejects_bad_source_options(args: list[str], message: str) -> None:
    output = _settings_from(args)
    assert isinstance(output, str) and message in output, output
