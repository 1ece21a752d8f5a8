"""
Flowdock and HipChat: the exact requests a real loopback peer receives.

The operator's ``--flowdock-api-url`` and ``--hipchat-api-url`` point the
methods at the ``http_target`` server; everything else is the real path:
the spec is compiled by ``compile_notification`` (Secret references
resolved), and the method delivers through a real aiohttp session.
"""
import copy
import socket
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest

from conftest import HttpTarget, Reply
from reponotify.events import new_event, sample_payload
from reponotify.methods import AttemptResult, DeliveryContext
from reponotify.methods.base import MethodSettings
from reponotify.notifications import InvalidSpec, Notification, NotificationKey, SecretNotFound, compile_notification

FLOW_TOKEN = 'f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6'
HIPCHAT_TOKEN = 'Hq9xXvT2kLmN4pQrS6uVwY8zA0bC1dE3fG5hJ7kL'
KEY = NotificationKey('team-a', 'chat')
PUSH_HTML = ('Push of tags <a href="https://quay.io/repository/acme/web?tab=tags&amp;tag=latest">latest</a> '
             'in repository <a href="https://quay.io/repository/acme/web">acme/web</a>')


class Secrets:
    """A SecretSource over a dict {(namespace, name): {key: value}}."""

    def __init__(self, data: Mapping[tuple[str, str], Mapping[str, str]] | None = None) -> None:
        self.data = data or {}

    async def read(self, namespace: str, name: str, key: str) -> str:
        try:
            return self.data[namespace, name][key]
        except KeyError:
            raise SecretNotFound(f"Secret {namespace}/{name} has no key {key}") from None


SECRETS = Secrets({('team-a', 'chat-tokens'): {'flowdock': FLOW_TOKEN, 'hipchat': HIPCHAT_TOKEN}})


def spec(method: str, config: Mapping[str, Any], event: str = 'repo_push') -> dict[str, Any]:
    return {'repository': 'acme/web', 'event': event, 'method': method, 'config': dict(config)}


async def compiled(method: str, config: Mapping[str, Any], event: str = 'repo_push') -> Notification:
    return await compile_notification(KEY, spec(method, config, event), SECRETS)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def context(http: aiohttp.ClientSession, target_url: str, timeout: float = 5.0) -> DeliveryContext:
    settings = MethodSettings(flowdock_api_url=f'{target_url}/v1/messages/team_inbox',
                              hipchat_api_url=f'{target_url}/v2')
    return DeliveryContext(http=http, delivery_id='delivery-1', timeout=timeout, settings=settings)


async def deliver(notification: Notification, kind: str, ctx: DeliveryContext) -> AttemptResult:
    event = new_event(kind, sample_payload(kind, 'acme/web'))
    return await notification.method.deliver(notification.target, event, ctx)


# --- Flowdock ---------------------------------------------------------------------------------------------


async def test_flowdock_posts_quays_team_inbox_message(http_target: HttpTarget, http: aiohttp.ClientSession) -> None:
    notification = await compiled('flowdock', {'flow_api_tokenFrom': {
        'secretKeyRef': {'name': 'chat-tokens', 'key': 'flowdock'}}})

    result = await deliver(notification, 'repo_push', context(http, http_target.url))

    assert result == AttemptResult(ok=True, code=200, message="Flowdock answered 200")
    [request] = await http_target.wait_for(1)
    assert request.method == 'POST'
    assert request.path == f'/v1/messages/team_inbox/{FLOW_TOKEN}'
    assert request.query == {}
    assert request.headers['Content-Type'] == 'application/json'
    assert request.json() == {
        'source': 'reponotify',
        'from_address': 'reponotify@localhost',
        'subject': 'Repository acme/web updated',
        'content': PUSH_HTML,
        'from_name': 'acme',
        'project': 'acme web',
        'tags': ['#repo_push'],
        'link': 'https://quay.io/repository/acme/web',
    }


async def test_flowdock_build_event_links_to_the_build(http_target: HttpTarget, http: aiohttp.ClientSession) -> None:
    notification = await compiled('flowdock', {'flow_api_token': FLOW_TOKEN}, event='build_failure')

    result = await deliver(notification, 'build_failure', context(http, http_target.url))

    assert result.ok
    [request] = await http_target.wait_for(1)
    body = request.json()
    assert body['subject'] == 'Build failure for repository acme/web [5346a21]'
    assert body['tags'] == ['#build_failure']
    assert body['link'] == 'https://quay.io/repository/acme/web/build/5346a21d-3434-4764-85be-5be1296f293c'
    assert body['project'] == 'acme web'


async def test_flowdock_api_url_with_trailing_slash(http_target: HttpTarget, http: aiohttp.ClientSession) -> None:
    notification = await compiled('flowdock', {'flow_api_token': FLOW_TOKEN})
    ctx = DeliveryContext(http=http, delivery_id='d', settings=MethodSettings(
        flowdock_api_url=f'{http_target.url}/inbox/'))

    assert (await deliver(notification, 'repo_push', ctx)).ok
    [request] = await http_target.wait_for(1)
    assert request.path == f'/inbox/{FLOW_TOKEN}'


@pytest.mark.parametrize('token', ['', 'abc/def', '../x', 'abc?x=1', 'abc def', 'tok#en', 'ab.cd'])
async def test_flowdock_token_that_is_not_a_path_segment_is_rejected(token: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        await compiled('flowdock', {'flow_api_token': token})
    assert str(info.value) == ("spec.config.flow_api_token: must be a Flowdock flow API token "
                               "(letters, digits, '-' and '_' only)")


async def test_flowdock_token_is_required() -> None:
    with pytest.raises(InvalidSpec, match=r"^spec\.config\.flow_api_token: Field required$"):
        await compiled('flowdock', {})


async def test_flowdock_token_from_a_missing_secret() -> None:
    with pytest.raises(SecretNotFound, match="Secret team-a/nope has no key flowdock"):
        await compiled('flowdock', {'flow_api_tokenFrom': {'secretKeyRef': {'name': 'nope', 'key': 'flowdock'}}})


# --- HipChat ----------------------------------------------------------------------------------------------


async def test_hipchat_posts_quays_room_notification(http_target: HttpTarget, http: aiohttp.ClientSession) -> None:
    notification = await compiled('hipchat', {
        'room_id': '12345',
        'notification_tokenFrom': {'secretKeyRef': {'name': 'chat-tokens', 'key': 'hipchat'}},
    })

    result = await deliver(notification, 'repo_push', context(http, http_target.url))

    assert result == AttemptResult(ok=True, code=200, message="HipChat answered 200")
    [request] = await http_target.wait_for(1)
    assert request.method == 'POST'
    assert request.path == '/v2/room/12345/notification'
    assert request.query == {'auth_token': HIPCHAT_TOKEN}
    assert request.headers['Content-Type'] == 'application/json'
    assert request.json() == {
        'color': 'purple',
        'message': PUSH_HTML,
        'notify': False,
        'message_format': 'html',
    }


@pytest.mark.parametrize(('kind', 'colour', 'notify'), [
    ('repo_push', 'purple', False),          # primary
    ('build_queued', 'gray', False),         # info
    ('build_success', 'green', False),       # success
    ('build_failure', 'red', True),          # error
    ('repo_mirror_sync_failed', 'red', True),
    ('vulnerability_found', 'red', True),    # Critical: error
    ('repo_image_expiry', 'gray', False),
])
async def test_hipchat_colour_and_notify_by_level(http_target: HttpTarget, http: aiohttp.ClientSession,
                                                  kind: str, colour: str, notify: bool) -> None:
    config = {'room_id': 7, 'notification_token': HIPCHAT_TOKEN}
    event_config = {'eventConfig': {'days': 30}} if kind == 'repo_image_expiry' else {}
    notification = await compile_notification(KEY, {**spec('hipchat', config, kind), **event_config}, SECRETS)

    assert (await deliver(notification, kind, context(http, http_target.url))).ok
    [request] = await http_target.wait_for(1)
    body = request.json()
    assert (body['color'], body['notify'], body['message_format']) == (colour, notify, 'html')
    assert request.path == '/v2/room/7/notification'


async def test_hipchat_warning_is_yellow(http_target: HttpTarget, http: aiohttp.ClientSession) -> None:
    notification = await compiled('hipchat', {'room_id': '7', 'notification_token': HIPCHAT_TOKEN},
                                  event='vulnerability_found')
    payload = copy.deepcopy(sample_payload('vulnerability_found', 'acme/web'))
    payload['vulnerability']['priority'] = 'High'

    result = await notification.method.deliver(notification.target, new_event('vulnerability_found', payload),
                                               context(http, http_target.url))

    assert result.ok
    [request] = await http_target.wait_for(1)
    assert (request.json()['color'], request.json()['notify']) == ('yellow', False)


async def test_hipchat_token_is_query_encoded(http_target: HttpTarget, http: aiohttp.ClientSession) -> None:
    token = 'a&b=c d+e'
    notification = await compiled('hipchat', {'room_id': '1', 'notification_token': token})

    assert (await deliver(notification, 'repo_push', context(http, http_target.url))).ok
    [request] = await http_target.wait_for(1)
    assert request.path == '/v2/room/1/notification'
    assert request.query == {'auth_token': token}


@pytest.mark.parametrize('room_id', ['abc', '12a', '', ' 12', '12 ', '-1', '1.5', '１２', -1, 1.5, True, None,
                                     ['12'], {'id': 12}])
async def test_hipchat_room_id_must_be_digits(room_id: Any) -> None:
    with pytest.raises(InvalidSpec) as info:
        await compiled('hipchat', {'room_id': room_id, 'notification_token': HIPCHAT_TOKEN})
    assert str(info.value) == "spec.config.room_id: must be the HipChat room's numeric ID (digits only, e.g. 12345)"


@pytest.mark.parametrize('room_id', ['12345', 12345, '0'])
async def test_hipchat_room_id_as_digits_or_integer(room_id: Any) -> None:
    notification = await compiled('hipchat', {'room_id': room_id, 'notification_token': HIPCHAT_TOKEN})
    assert notification.target.room_id == str(room_id)


async def test_hipchat_needs_room_and_token() -> None:
    with pytest.raises(InvalidSpec) as info:
        await compiled('hipchat', {})
    assert str(info.value) == ("spec.config.notification_token: Field required; "
                               "spec.config.room_id: Field required")
    with pytest.raises(InvalidSpec, match=r"^spec\.config\.notification_token: must be a HipChat room "
                                          r"notification token \(it is empty\)$"):
        await compiled('hipchat', {'room_id': '1', 'notification_token': ' '})


async def test_unknown_config_fields_are_rejected() -> None:
    with pytest.raises(InvalidSpec, match=r"^spec\.config\.room: Extra inputs are not permitted$"):
        await compiled('hipchat', {'room_id': '1', 'notification_token': HIPCHAT_TOKEN, 'room': 'x'})
    with pytest.raises(InvalidSpec, match=r"^spec\.config\.room_idFrom: hipchat does not take this field from a "
                                          r"Secret \(it takes: notification_tokenFrom\)$"):
        await compiled('hipchat', {'notification_token': HIPCHAT_TOKEN,
                                   'room_idFrom': {'secretKeyRef': {'name': 'chat-tokens', 'key': 'x'}}})


# --- Tokens never leak ------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(('method', 'config', 'path', 'what'), [
    ('flowdock', {'flow_api_token': FLOW_TOKEN}, f'/v1/messages/team_inbox/{FLOW_TOKEN}', 'Flowdock'),
    ('hipchat', {'room_id': '42', 'notification_token': HIPCHAT_TOKEN}, '/v2/room/42/notification', 'HipChat'),
])
async def test_tokens_never_appear_in_results(http_target: HttpTarget, http: aiohttp.ClientSession,
                                              method: str, config: dict[str, str], path: str, what: str) -> None:
    notification = await compiled(method, config)
    assert FLOW_TOKEN not in repr(notification.target) and HIPCHAT_TOKEN not in repr(notification.target)
    ctx = context(http, http_target.url, timeout=0.2)
    results: list[AttemptResult] = []

    http_target.script(path, Reply(status=500))
    results.append(await deliver(notification, 'repo_push', ctx))
    assert results[-1] == AttemptResult(ok=False, code=500, message=f"{what} answered 500")

    http_target.script(path, Reply(status=401, body=f'bad token {FLOW_TOKEN} {HIPCHAT_TOKEN}'))
    results.append(await deliver(notification, 'repo_push', ctx))
    assert results[-1] == AttemptResult(ok=False, code=401, retryable=False,
                                        message=f"{what} answered 401 (not retried)")

    http_target.script(path, Reply(status=429, headers={'Retry-After': '7'}))
    results.append(await deliver(notification, 'repo_push', ctx))
    assert results[-1] == AttemptResult(ok=False, code=429, retry_after=7.0, message=f"{what} answered 429")

    http_target.script(path, Reply(delay=0.5))
    results.append(await deliver(notification, 'repo_push', ctx))
    assert results[-1] == AttemptResult(ok=False, message=f"{what} did not answer within 0.2s")

    port = closed_port()
    results.append(await deliver(notification, 'repo_push', context(http, f'http://127.0.0.1:{port}')))
    assert results[-1] == AttemptResult(ok=False, message=f"could not reach {what}: ClientConnectorError: "
                                                          f"Connect call failed ('127.0.0.1', {port})")

    assert len(await http_target.wait_for(4, path)) == 4
    for result in results:
        assert FLOW_TOKEN not in result.message and HIPCHAT_TOKEN not in result.message
        assert 'http' not in result.message and '/' not in result.message
