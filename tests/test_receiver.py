"""
The receiver over real HTTP: every error answer (status and exact JSON), and that
bad input changes nothing (the outbox stays empty although a notification would match).

The engine's dispatcher is not started in most tests, so ``engine.outbox`` holds exactly
what the receiver queued. One test runs the dispatcher and checks the target itself.
"""
import asyncio
import json
import select
import socket
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer
from reponotify.dispatcher import DispatcherSettings
from reponotify.engine import Engine, EngineSettings
from reponotify.events import EVENT_NAMES, sample_payload
from reponotify.notifications import NotificationKey, compile_notification
from reponotify.receiver import MAX_BODY_BYTES, make_app
from reponotify.standalone import ManifestSecrets, StatusFile

TOKEN = 's3cr3t-token'
AUTH = {'Authorization': f'Bearer {TOKEN}'}
KEY = NotificationKey('team-a', 'push-to-ci')
REPOSITORY = 'acme/web'
PAYLOAD = sample_payload('repo_push', REPOSITORY)  # matches the routed notification
KNOWN = ', '.join(EVENT_NAMES)
UNAUTHORIZED = "missing or wrong credentials (Authorization: Bearer <token>, or X-Signature: sha256=<hmac>)"


async def routed_engine(url: str = 'http://127.0.0.1:9/hook', **settings: object) -> Engine:
    engine = Engine(EngineSettings(**settings))  # type: ignore[arg-type]
    spec = {'repository': REPOSITORY, 'event': 'repo_push', 'method': 'webhook', 'config': {'url': url}}
    engine.put_notification(await compile_notification(KEY, spec, ManifestSecrets({})))
    return engine


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    """An engine whose outbox is open but whose dispatcher is not running: the outbox keeps what is queued."""
    engine = await routed_engine()
    await engine.outbox.open()
    yield engine
    await engine.outbox.close()


@pytest.fixture
async def client(engine: Engine) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(make_app(engine, token=TOKEN))) as test_client:
        yield test_client


async def answer(response) -> tuple[int, object]:
    assert response.headers['Content-Type'] == 'application/json; charset=utf-8'
    return response.status, await response.json()


async def test_accepted_event_answers_202_with_id_and_matched(client: TestClient, engine: Engine) -> None:
    response = await client.post('/v1/events/repo_push', json=PAYLOAD, headers=AUTH)
    status, body = await answer(response)
    assert status == 202
    assert sorted(body) == ['id', 'matched']
    assert body['matched'] == 1
    assert len(engine.outbox) == 1
    delivery = await engine.outbox.take()
    assert delivery.event.id == body['id']
    assert delivery.key == KEY
    assert delivery.event.payload == PAYLOAD


async def test_event_for_an_unrouted_repository_matches_nothing(client: TestClient, engine: Engine) -> None:
    response = await client.post('/v1/events/repo_push', json=sample_payload('repo_push', 'other/repo'),
                                 headers=AUTH)
    status, body = await answer(response)
    assert (status, body['matched']) == (202, 0)
    assert len(engine.outbox) == 0


async def test_malformed_json_is_400(client: TestClient, engine: Engine) -> None:
    response = await client.post('/v1/events/repo_push', data=b'{"repository": "acme/web"', headers=AUTH)
    assert await answer(response) == (400, {
        'error': "body is not valid JSON: Expecting ',' delimiter: line 1 column 26 (char 25)"})
    assert len(engine.outbox) == 0


async def test_json_with_nan_is_malformed_not_accepted(client: TestClient, engine: Engine) -> None:
    # NaN/Infinity are not JSON (RFC 8259); accepting them would forward invalid JSON to webhook targets.
    response = await client.post('/v1/events/repo_push', data=b'{"repository": "acme/web", "x": NaN}',
                                 headers=AUTH)
    assert await answer(response) == (400, {'error': "body is not valid JSON: NaN is not a JSON value"})
    assert len(engine.outbox) == 0


async def test_deeply_nested_json_is_400(client: TestClient, engine: Engine) -> None:
    response = await client.post('/v1/events/repo_push', data=b'[' * 100_000, headers=AUTH)
    assert await answer(response) == (400, {'error': "body is not valid JSON: nested too deeply"})
    assert len(engine.outbox) == 0


async def test_unknown_event_is_404(client: TestClient, engine: Engine) -> None:
    response = await client.post('/v1/events/repo_pull', json=PAYLOAD, headers=AUTH)
    assert await answer(response) == (404, {'error': f"unknown event 'repo_pull'; known events: {KNOWN}"})
    assert len(engine.outbox) == 0


async def test_payload_without_repository_is_422(client: TestClient, engine: Engine) -> None:
    payload = {key: value for key, value in PAYLOAD.items() if key != 'repository'}
    response = await client.post('/v1/events/repo_push', json=payload, headers=AUTH)
    assert await answer(response) == (422, {
        'error': "payload has no 'repository' field (expected \"namespace/name\")"})
    assert len(engine.outbox) == 0


@pytest.mark.parametrize('body, kind', [(b'[{"repository": "acme/web"}]', 'list'), (b'"acme/web"', 'str'),
                                        (b'42', 'int'), (b'null', 'NoneType')])
async def test_non_object_json_is_422(client: TestClient, engine: Engine, body: bytes, kind: str) -> None:
    response = await client.post('/v1/events/repo_push', data=body, headers=AUTH)
    assert await answer(response) == (422, {
        'error': f"body must be a JSON object (a Quay event payload), not {kind}"})
    assert len(engine.outbox) == 0


@pytest.mark.parametrize('repository, message', [
    (5, "payload field 'repository' must be a string \"namespace/name\", not int"),
    ('Acme/Web', "payload field 'repository' must look like \"namespace/name\" (lowercase), got 'Acme/Web'"),
    ('web', "payload field 'repository' must look like \"namespace/name\" (lowercase), got 'web'"),
])
async def test_unusable_repository_is_422(client: TestClient, engine: Engine, repository: object,
                                          message: str) -> None:
    response = await client.post('/v1/events/repo_push', json={**PAYLOAD, 'repository': repository},
                                 headers=AUTH)
    assert await answer(response) == (422, {'error': message})
    assert len(engine.outbox) == 0


def oversized_payload() -> bytes:
    """A valid, matching payload just over the limit: only its size is wrong."""
    body = json.dumps({**PAYLOAD, 'padding': ''}).encode()
    padding = MAX_BODY_BYTES + 1 - len(body)
    body = json.dumps({**PAYLOAD, 'padding': 'x' * padding}).encode()
    assert len(body) == MAX_BODY_BYTES + 1
    return body


async def test_body_over_1_mib_with_content_length_is_413(client: TestClient, engine: Engine) -> None:
    response = await client.post('/v1/events/repo_push', data=oversized_payload(), headers=AUTH)
    assert await answer(response) == (413, {'error': "request body is larger than 1048576 bytes"})
    assert len(engine.outbox) == 0


async def test_body_over_1_mib_chunked_is_413(client: TestClient, engine: Engine) -> None:
    body = oversized_payload()

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        for start in range(0, len(body), 64 * 1024):
            yield body[start:start + 64 * 1024]

    response = await client.post('/v1/events/repo_push', data=chunks(), headers=AUTH)
    assert await answer(response) == (413, {'error': "request body is larger than 1048576 bytes"})
    assert len(engine.outbox) == 0


async def test_body_of_exactly_1_mib_is_accepted(client: TestClient, engine: Engine) -> None:
    body = oversized_payload()[:-3] + b'"}'  # one padding byte less: exactly the limit
    assert len(body) == MAX_BODY_BYTES
    json.loads(body)
    response = await client.post('/v1/events/repo_push', data=body, headers=AUTH)
    status, answer_body = await answer(response)
    assert (status, answer_body['matched']) == (202, 1)
    assert len(engine.outbox) == 1


@pytest.mark.parametrize('headers', [
    {},
    {'Authorization': 'Bearer wrong-token'},
    {'Authorization': f'Basic {TOKEN}'},
    {'Authorization': TOKEN},
    {'Authorization': f'Bearer {TOKEN}x'},
])
async def test_missing_or_wrong_token_is_401(client: TestClient, engine: Engine, headers: dict[str, str]) -> None:
    response = await client.post('/v1/events/repo_push', json=PAYLOAD, headers=headers)
    assert await answer(response) == (401, {
        'error': UNAUTHORIZED})
    assert len(engine.outbox) == 0


async def test_right_token_is_202_and_scheme_is_case_insensitive(client: TestClient, engine: Engine) -> None:
    response = await client.post('/v1/events/repo_push', json=PAYLOAD, headers={'Authorization': f'bearer {TOKEN}'})
    status, body = await answer(response)
    assert (status, body['matched']) == (202, 1)


async def test_without_a_configured_token_no_header_is_needed(engine: Engine) -> None:
    async with TestClient(TestServer(make_app(engine, token=None))) as open_client:
        response = await open_client.post('/v1/events/repo_push', json=PAYLOAD)
        status, body = await answer(response)
    assert (status, body['matched']) == (202, 1)
    assert len(engine.outbox) == 1


@pytest.mark.parametrize('key', ['', 'k' * 256])
async def test_bad_idempotency_key_is_400(client: TestClient, engine: Engine, key: str) -> None:
    response = await client.post('/v1/events/repo_push', json=PAYLOAD, headers={**AUTH, 'Idempotency-Key': key})
    assert await answer(response) == (400, {'error': "Idempotency-Key must be 1 to 255 printable ASCII characters"})
    assert len(engine.outbox) == 0


async def test_same_idempotency_key_twice_is_accepted_once(client: TestClient, engine: Engine) -> None:
    headers = {**AUTH, 'Idempotency-Key': 'k' * 255}
    first = await client.post('/v1/events/repo_push', json=PAYLOAD, headers=headers)
    second = await client.post('/v1/events/repo_push', json=PAYLOAD, headers=headers)
    first_status, first_body = await answer(first)
    second_status, second_body = await answer(second)
    assert (first_status, second_status) == (202, 202)
    assert second_body == first_body
    assert first_body['matched'] == 1
    assert 'Idempotent-Replayed' not in first.headers
    assert second.headers['Idempotent-Replayed'] == 'true'
    assert len(engine.outbox) == 1

    other = await client.post('/v1/events/repo_push', json=PAYLOAD, headers={**AUTH, 'Idempotency-Key': 'other'})
    _, other_body = await answer(other)
    assert other_body['id'] != first_body['id']
    assert len(engine.outbox) == 2


async def test_unknown_path_is_404_json(client: TestClient) -> None:
    response = await client.get('/v2/nothing-here', headers=AUTH)
    assert await answer(response) == (404, {'error': "no such endpoint: GET /v2/nothing-here"})


async def test_wrong_method_is_405_json(client: TestClient) -> None:
    response = await client.get('/v1/events/repo_push', headers=AUTH)
    assert await answer(response) == (405, {'error': "method GET is not allowed on /v1/events/repo_push"})


async def test_health_endpoints_need_no_token(client: TestClient) -> None:
    for path in ('/healthz', '/readyz'):
        response = await client.get(path)
        assert await answer(response) == (200, {'status': 'ok'})


async def test_rejected_and_replayed_requests_never_reach_the_target(http_target, tmp_path) -> None:
    """With the dispatcher running: of a burst of bad, good and replayed requests, each good event arrives once."""
    engine = await routed_engine(f'{http_target.url}/hook',
                                 dispatcher=DispatcherSettings(workers=1, retry_schedule=()))  # one worker: FIFO
    await engine.start(StatusFile(tmp_path / 'status.json'))
    try:
        async with TestClient(TestServer(make_app(engine, token=TOKEN))) as test_client:
            bad = [
                ('/v1/events/repo_push', json.dumps(PAYLOAD).encode(), {}),  # no token
                ('/v1/events/repo_pull', json.dumps(PAYLOAD).encode(), AUTH),  # unknown event
                ('/v1/events/repo_push', b'{"repository": "acme/web",', AUTH),  # malformed
                ('/v1/events/repo_push', oversized_payload(), AUTH),  # too large
                ('/v1/events/repo_push', json.dumps(PAYLOAD).encode(), {**AUTH, 'Idempotency-Key': ''}),
            ]
            for path, body, headers in bad:
                response = await test_client.post(path, data=body, headers=headers)
                assert response.status in (400, 401, 404, 413)
            good = {**PAYLOAD, 'updated_tags': ['v9']}
            answers = []
            for _ in range(3):  # a client retrying with the same key
                response = await test_client.post('/v1/events/repo_push', json=good,
                                                  headers={**AUTH, 'Idempotency-Key': 'push-v9'})
                answers.append((response.status, await response.json()))
            assert answers[1:] == answers[:1] * 2
            assert answers[0][0] == 202
            sentinel = {**PAYLOAD, 'updated_tags': ['sentinel']}
            response = await test_client.post('/v1/events/repo_push', json=sentinel, headers=AUTH)
            assert response.status == 202
            await http_target.wait_for(2, "/hook")
    finally:
        await engine.stop()
    assert [request.json() for request in http_target.requests] == [good, sentinel]


async def test_receiver_on_a_real_port(engine: Engine, unused_tcp_port: int) -> None:
    """The same app served by aiohttp's runner on a real TCP port (what the front ends do)."""
    from reponotify.receiver import serve

    runner = await serve(make_app(engine, token=TOKEN), '127.0.0.1', unused_tcp_port)
    try:
        async with ClientSession() as session:
            url = f'http://127.0.0.1:{unused_tcp_port}/v1/events/repo_push'
            async with session.post(url, json=PAYLOAD) as response:
                assert (response.status, await response.json()) == (401, {
                    'error': UNAUTHORIZED})
            async with session.post(url, json=PAYLOAD, headers=AUTH) as response:
                assert response.status == 202
                assert (await response.json())['matched'] == 1
    finally:
        await runner.cleanup()
    assert len(engine.outbox) == 1


async def test_a_burst_of_connections_while_the_receiver_is_busy_waits_to_be_served(
        engine: Engine, unused_tcp_port: int) -> None:
    """
    New connections arriving while the event loop is busy wait in the kernel's queue, 300 of them at
    least: past the queue, a client's SYN is dropped and it waits a second or more to try again.
    """
    from reponotify.receiver import serve

    runner = await serve(make_app(engine, token=TOKEN), '127.0.0.1', unused_tcp_port)
    sockets: list[socket.socket] = []
    try:
        # The loop is blocked from here to the first await: nothing accepts, only the kernel queues.
        for _ in range(300):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(('127.0.0.1', unused_tcp_port))
            sockets.append(sock)
        poller = select.poll()
        for sock in sockets:
            poller.register(sock, select.POLLOUT)
        connected: set[int] = set()
        deadline = time.monotonic() + 2.0  # the queue stays full while the loop is blocked: a dropped SYN stays out
        while len(connected) < len(sockets) and time.monotonic() < deadline:
            connected.update(fd for fd, _ in poller.poll(100))
        assert len(connected) == 300
        for sock in sockets:
            sock.send(b'GET /healthz HTTP/1.1\r\nHost: receiver\r\nConnection: close\r\n\r\n')

        loop = asyncio.get_running_loop()

        async def answer(sock: socket.socket) -> bytes:
            data = b''
            while chunk := await loop.sock_recv(sock, 4096):
                data += chunk
            return data

        answers = await asyncio.wait_for(asyncio.gather(*(answer(sock) for sock in sockets)), 30)
        assert {answer.split(b'\r\n', 1)[0] for answer in answers} == {b'HTTP/1.1 200 OK'}
    finally:
        for sock in sockets:
            sock.close()
        await runner.cleanup()


async def test_repository_with_a_trailing_newline_is_422(client: TestClient, engine: Engine) -> None:
    payload = {**PAYLOAD, 'repository': 'acme/web\n'}
    response = await client.post('/v1/events/repo_push', data=json.dumps(payload), headers=AUTH)
    assert response.status == 422
    assert await response.json() == {
        'error': "payload field 'repository' must look like \"namespace/name\" (lowercase), got 'acme/web\\n'"}
    assert len(engine.outbox) == 0


# -- bad bytes in headers and bodies: a precise 4xx, never a 500 -------------------------------------

async def raw_post(port: int, path: bytes, headers: bytes, body: bytes) -> tuple[int, object]:
    """POST with exactly these header bytes (aiohttp's client would not send invalid UTF-8); status and JSON."""
    reader, writer = await asyncio.open_connection('127.0.0.1', port)
    try:
        writer.write(b'POST ' + path + b' HTTP/1.1\r\nHost: test\r\nConnection: close\r\n'
                     + b'Content-Length: ' + str(len(body)).encode() + b'\r\n' + headers + b'\r\n' + body)
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, content = answer.partition(b'\r\n\r\n')
    assert b'\r\nContent-Type: application/json; charset=utf-8\r\n' in head, head
    return int(head.split()[1]), json.loads(content)


BEARER = f'Authorization: Bearer {TOKEN}\r\n'.encode()
SOURCES_UNAUTHORIZED = ("missing or wrong credentials (Authorization: Bearer <token>, ?token=<token>, "
                        "or X-Signature: sha256=<hmac>)")
NOT_GZIP = b'{"repository": "acme/web"}'


@pytest.mark.parametrize('headers, body, expected', [
    (BEARER + b'Content-Encoding: gzip\r\n', NOT_GZIP,
     (400, {'error': "request body could not be decoded (Content-Encoding: gzip)"})),
    (BEARER + b'Content-Encoding: deflate\r\n', NOT_GZIP,
     (400, {'error': "request body could not be decoded (Content-Encoding: deflate)"})),
    (BEARER + b'Idempotency-Key: k\xe9y\r\n', NOT_GZIP,
     (400, {'error': "Idempotency-Key must be 1 to 255 printable ASCII characters"})),
    (b'Authorization: Bearer R\xe9cv\r\n', NOT_GZIP, (401, {'error': UNAUTHORIZED})),
    (b'X-Signature: sha256=\xe9\xe9\r\n', NOT_GZIP, (401, {'error': UNAUTHORIZED})),
    # A lone surrogate escape is valid JSON syntax, but no character: the methods that encode the payload
    # (Slack's Jinja template, e-mail) raised at every attempt, retried forever.
    (BEARER, b'{"repository": "acme/web", "updated_tags": ["\\ud800"]}',
     (400, {'error': "body is not valid JSON: a string holds an unpaired surrogate (\\ud800), not a character"})),
    (BEARER, b'{"repository": "acme/web", "\\udfff": 1}',
     (400, {'error': "body is not valid JSON: a string holds an unpaired surrogate (\\udfff), not a character"})),
    # Too large for a float: Python reads it as infinity, and forwarded it as Infinity (not JSON).
    (BEARER, b'{"repository": "acme/web", "x": 1e999}',
     (400, {'error': "body is not valid JSON: number 1e999 is out of range"})),
], ids=['gzip', 'deflate', 'idempotency-key', 'bearer', 'signature', 'surrogate', 'surrogate-key', 'infinity'])
async def test_bad_bytes_get_a_precise_4xx_not_a_500(engine: Engine, headers: bytes, body: bytes,
                                                      expected: tuple[int, object], caplog) -> None:
    async with TestClient(TestServer(make_app(engine, token=TOKEN, hmac_secret='hmac-secret'))) as test_client:
        port = test_client.server.port
        assert port is not None
        assert await raw_post(port, b'/v1/events/repo_push', headers, body) == expected
        # The registry sources' endpoint also takes the token in the query, and says so.
        if expected == (401, {'error': UNAUTHORIZED}):
            expected = (401, {'error': SOURCES_UNAUTHORIZED})
        assert await raw_post(port, b'/v1/sources/quay/repo_push', headers, body) == expected
    assert len(engine.outbox) == 0
    # Nothing logged as an error either (aiohttp read an undecodable body again after the answer).
    assert [record.getMessage() for record in caplog.records if record.levelname == 'ERROR'] == []


async def test_escaped_surrogate_pairs_and_finite_numbers_are_accepted(client: TestClient, engine: Engine) -> None:
    """A pair of escapes is one character (an emoji): accepted, as are large numbers that fit a float."""
    body = b'{"repository": "acme/web", "updated_tags": ["\\ud83d\\ude00"], "x": 1e308, "y": -2.5e-300}'
    response = await client.post('/v1/events/repo_push', data=body, headers=AUTH)
    status, _ = await answer(response)
    assert status == 202
    delivery = await engine.outbox.take()
    assert delivery.event.payload['updated_tags'] == ['\U0001f600']
    assert (delivery.event.payload['x'], delivery.event.payload['y']) == (1e308, -2.5e-300)
