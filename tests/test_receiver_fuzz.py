"""
Property-based fuzzing of the receiver over real HTTP (hypothesis).

Whatever arrives (random bytes, broken JSON, deep nesting, huge strings, wrong
types, unicode, odd headers), the receiver answers a 4xx with a JSON
``{"error": ...}`` or, for a genuine Quay payload, a 202; never a 5xx; and a
rejected request never leaves a queued delivery behind, although a
notification for the repository is routed.
"""
import json
import string
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings, strategies as st

from reponotify.engine import Engine
from reponotify.events import EVENT_NAMES
from reponotify.notifications import NotificationKey, compile_notification
from reponotify.receiver import make_app
from reponotify.standalone import ManifestSecrets

TOKEN = 'fuzz-token'
REPOSITORY = 'acme/web'

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
payload_like = st.fixed_dictionaries(
    {},
    optional={
        'repository': st.one_of(st.just(REPOSITORY), st.text(max_size=40), json_values),
        'namespace': json_values,
        'updated_tags': json_values,
        'trigger_metadata': json_values,
        'vulnerability': json_values,
    },
)
bodies = st.one_of(
    st.binary(max_size=2048),
    st.text(max_size=500).map(str.encode),
    json_values.map(lambda value: json.dumps(value).encode()),
    payload_like.map(lambda value: json.dumps(value).encode()),
    st.integers(min_value=1, max_value=5000).map(lambda depth: b'[' * depth + b']' * depth),
    st.integers(min_value=1, max_value=5000).map(lambda depth: b'{"a":' * depth + b'1' + b'}' * depth),
    st.just(json.dumps({'repository': REPOSITORY, 'x': 'y' * 200_000}).encode()),
)
event_names = st.one_of(st.sampled_from(EVENT_NAMES), st.text(alphabet=string.ascii_letters + '_-.%', min_size=1,
                                                                max_size=30))
header_values = st.text(alphabet=string.printable.strip() + ' ', max_size=300)
headers = st.fixed_dictionaries({}, optional={
    'Authorization': st.one_of(st.just(f'Bearer {TOKEN}'), header_values),
    'Idempotency-Key': header_values,
    'Content-Type': st.sampled_from(['application/json', 'text/plain', 'application/x-www-form-urlencoded']),
    'X-Signature': header_values,
})


@pytest.fixture
async def client() -> AsyncIterator[tuple[TestClient, Engine]]:
    engine = Engine()
    spec = {'repository': REPOSITORY, 'event': 'repo_push', 'method': 'webhook',
            'config': {'url': 'http://127.0.0.1:9/hook'}}
    engine.put_notification(await compile_notification(NotificationKey('ns', 'n'), spec, ManifestSecrets({})))
    await engine.outbox.open()  # the dispatcher does not run: the outbox keeps whatever is queued
    async with TestClient(TestServer(make_app(engine, token=TOKEN, hmac_secret='fuzz-hmac'))) as test_client:
        yield test_client, engine
    await engine.outbox.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(event=event_names, body=bodies, request_headers=headers)
async def test_any_request_gets_a_4xx_json_error_or_a_202_and_never_a_5xx(
        client: tuple[TestClient, Engine], event: str, body: bytes, request_headers: dict[str, str]) -> None:
    test_client, engine = client
    queued_before = len(engine.outbox)
    response = await test_client.post(f'/v1/events/{event}', data=body, headers=request_headers)
    answer = await response.json(content_type=None)
    assert response.status < 500, (response.status, answer)
    if response.status == 202:
        assert set(answer) == {'id', 'matched'}
    else:
        assert 400 <= response.status < 500
        assert set(answer) == {'error'} and isinstance(answer['error'], str) and answer['error']
        assert len(engine.outbox) == queued_before  # a rejected request queued nothing
