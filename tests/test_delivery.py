"""
Delivery through the real engine (outbox, dispatcher, methods, status book) to a real loopback target.

Outcomes are read from the status book, polled with a deadline; no assertion depends on timing.
"""
import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp import web
from conftest import Reply, eventually, serve_on_loopback
from reponotify.dispatcher import DispatcherSettings
from reponotify.engine import Engine, EngineSettings
from reponotify.events import sample_payload
from reponotify.notifications import InvalidSpec, NotificationKey, compile_notification
from reponotify.standalone import ManifestSecrets, StatusFile
from reponotify.status import ReadyCondition

KEY = NotificationKey('team-a', 'push-to-ci')
REPOSITORY = 'acme/web'
FAST = (0.01, 0.01, 0.01, 0.01)  # four retries, 10 ms apart at most
DISABLED_MESSAGE = ("Disabled after 3 consecutive failed deliveries; events are dropped until it is reset "
                    "(annotate reponotify.dev/reset)")



def webhook(url: str, **config: Any) -> dict[str, Any]:
    return {'repository': REPOSITORY, 'event': 'repo_push', 'method': 'webhook', 'config': {'url': url, **config}}


# Every engine here makes its attempts in-process, then again through one delivery process
# (a child process: reponotify.delivery_processes): the outcomes must be the same.
DELIVERY_PROCESSES = [0]


@pytest.fixture(autouse=True, params=[0, 1], ids=['in-process', 'delivery-process'])
def delivery_processes(request: pytest.FixtureRequest) -> Iterator[int]:
    DELIVERY_PROCESSES[0] = request.param
    yield request.param
    DELIVERY_PROCESSES[0] = 0


@contextlib.asynccontextmanager
async def running(tmp_path, spec: dict[str, Any], *, schedule: tuple[float, ...] = FAST,
                  secrets: ManifestSecrets | None = None) -> AsyncIterator[Engine]:
    engine = Engine(EngineSettings(dispatcher=DispatcherSettings(workers=4, retry_schedule=schedule,
                                                                 delivery_processes=DELIVERY_PROCESSES[0]),
                                   status_interval=0.0))
    engine.put_notification(await compile_notification(KEY, spec, secrets or ManifestSecrets({})))
    engine.book.set_spec_condition(KEY, ReadyCondition('True', 'Accepted', 'routed'))
    await engine.start(StatusFile(tmp_path / 'status.json'))
    try:
        yield engine
    finally:
        await engine.stop()


def status(engine: Engine) -> dict[str, Any]:
    return engine.book.status(KEY)


async def outcome(engine: Engine, event_id: str, *outcomes: str) -> dict[str, Any]:
    """Wait until the last delivery is of ``event_id`` with one of ``outcomes``; return it."""
    def reached() -> dict[str, Any] | None:
        last = status(engine)['lastDelivery']
        return last if last and last['eventId'] == event_id and last['outcome'] in outcomes else None
    return await eventually(reached, f"{'/'.join(outcomes)} for event {event_id}")


def ready(engine: Engine) -> tuple[str, str, str]:
    condition = status(engine)['conditions'][0]
    assert condition['type'] == 'Ready'
    return condition['status'], condition['reason'], condition['message']


async def push(engine: Engine, **changes: Any) -> str:
    accepted = await engine.ingest('repo_push', sample_payload('repo_push', REPOSITORY) | changes)
    assert accepted.matched == 1
    return accepted.id


async def test_webhook_posts_the_exact_payload_bytes(http_target, tmp_path) -> None:
    payload = sample_payload('repo_push', REPOSITORY) | {'updated_tags': ['latest', 'v1.0'], 'ünïcode': 'ok'}
    async with running(tmp_path, webhook(f'{http_target.url}/hooks/ci?x=1')) as engine:
        accepted = await engine.ingest('repo_push', payload)
        [received] = await http_target.wait_for(1, '/hooks/ci')
        last = await outcome(engine, accepted.id, 'Succeeded')
    assert received.method == 'POST'
    assert received.query == {'x': '1'}
    assert received.headers['Content-Type'] == 'application/json'
    assert received.body == json.dumps(payload).encode()  # the payload itself, not wrapped
    assert 'webhook-signature' not in received.headers  # no signing secret configured
    assert {k: last[k] for k in ('event', 'outcome', 'attempts', 'code', 'message')} == {
        'event': 'repo_push', 'outcome': 'Succeeded', 'attempts': 1, 'code': 200,
        'message': 'webhook target answered 200'}
    final = status(engine)
    assert final['numberOfFailures'] == 0
    assert final['deliveries'] == {'succeeded': 1, 'failed': 0, 'dropped': 0}
    assert final['recentDeliveries'] == [last]


async def test_three_failed_attempts_disable_and_later_events_are_dropped(http_target, tmp_path) -> None:
    http_target.script('/hook', Reply(status=500))
    async with running(tmp_path, webhook(f'{http_target.url}/hook')) as engine:
        first = await push(engine)
        last = await outcome(engine, first, 'Failed')
        assert len(http_target.on('/hook')) == 3  # not the 5 the schedule allows: disabled at 3
        assert {k: last[k] for k in ('outcome', 'attempts', 'code', 'message')} == {
            'outcome': 'Failed', 'attempts': 3, 'code': 500,
            'message': 'webhook target answered 500; the notification is now disabled'}
        assert status(engine)['numberOfFailures'] == 3
        assert ready(engine) == ('False', 'Disabled', DISABLED_MESSAGE)

        second = await push(engine)
        dropped = await outcome(engine, second, 'Dropped')
        assert {k: dropped[k] for k in ('outcome', 'attempts', 'code', 'message')} == {
            'outcome': 'Dropped', 'attempts': 0, 'code': None,
            'message': 'Dropped: the notification is disabled after repeated failures'}
        assert len(http_target.on('/hook')) == 3  # the dropped event never reached the target
        final = status(engine)
        assert final['numberOfFailures'] == 3
        assert final['deliveries'] == {'succeeded': 0, 'failed': 1, 'dropped': 1}
        assert [d['outcome'] for d in final['recentDeliveries']] == ['Dropped', 'Failed']

        # Quay's "re-enable": a reset zeroes the count and events flow again.
        http_target.script('/hook', Reply(status=200))
        engine.book.reset(KEY)
        assert status(engine)['numberOfFailures'] == 0
        assert ready(engine) == ('True', 'Accepted', 'routed')
        third = await push(engine)
        await outcome(engine, third, 'Succeeded')
        assert len(http_target.on('/hook')) == 4


async def test_an_outcome_is_named_once_in_the_log(http_target, tmp_path, caplog) -> None:
    """A Dropped record's message starts with "Dropped: "; its log line read "Dropped: Dropped: ..."."""
    http_target.script('/hook', Reply(status=500))
    caplog.set_level('INFO', logger='reponotify.dispatcher')
    async with running(tmp_path, webhook(f'{http_target.url}/hook')) as engine:
        await outcome(engine, await push(engine), 'Failed')
        dropped = await push(engine)
        await outcome(engine, dropped, 'Dropped')
    [line] = [record.getMessage() for record in caplog.records if dropped in record.getMessage()]
    assert line.endswith(f"event {dropped} to team-a/push-to-ci: Dropped: the notification is disabled after "
                         "repeated failures"), line


async def test_a_failing_notification_makes_one_attempt_at_a_time_so_three_failures_mean_three_attempts(
        http_target, tmp_path) -> None:
    """
    Once an attempt has failed, the next ones go one at a time: ten events at once to a notification with
    one failure made up to a worker's worth of attempts after the third failure had disabled it.
    """
    http_target.script('/hook', Reply(status=400))  # final: each event is one attempt
    async with running(tmp_path, webhook(f'{http_target.url}/hook')) as engine:
        await outcome(engine, await push(engine), 'Failed')
        await asyncio.gather(*(push(engine) for _ in range(10)))
        await eventually(lambda: sum(status(engine)['deliveries'].values()) == 11, "every event's outcome")
    assert len(http_target.on('/hook')) == 3
    final = status(engine)
    assert final['numberOfFailures'] == 3
    assert final['deliveries'] == {'succeeded': 0, 'failed': 3, 'dropped': 8}


async def test_a_notification_that_recovers_sends_everything_that_waited_for_its_one_attempt(
        http_target, tmp_path) -> None:
    """The deliveries that waited while it was failing all go once an attempt succeeds (none is left waiting)."""
    http_target.script('/hook', Reply(status=400), Reply(status=200))
    async with running(tmp_path, webhook(f'{http_target.url}/hook')) as engine:
        await outcome(engine, await push(engine), 'Failed')
        await asyncio.gather(*(push(engine) for _ in range(10)))
        await eventually(lambda: status(engine)['deliveries']['succeeded'] == 10, "ten deliveries")
        await eventually(lambda: len(engine.outbox) == 0, "the outbox to be empty")
    assert len(http_target.on('/hook')) == 11
    assert status(engine)['numberOfFailures'] == 0


async def test_failures_count_across_deliveries(http_target, tmp_path) -> None:
    http_target.script('/hook', Reply(status=400))
    async with running(tmp_path, webhook(f'{http_target.url}/hook')) as engine:
        for count in (1, 2):
            last = await outcome(engine, await push(engine), 'Failed')
            assert last['message'] == 'webhook target answered 400 (not retried)'
            assert status(engine)['numberOfFailures'] == count
            assert ready(engine)[:2] == ('True', 'Accepted')
        last = await outcome(engine, await push(engine), 'Failed')
        assert last['message'] == 'webhook target answered 400 (not retried); the notification is now disabled'
        assert status(engine)['numberOfFailures'] == 3
        assert ready(engine)[:2] == ('False', 'Disabled')
    assert len(http_target.on('/hook')) == 3


@pytest.mark.parametrize('code', [400, 401, 403, 404, 410, 422])
async def test_4xx_is_a_final_failure_after_one_attempt(http_target, tmp_path, code: int) -> None:
    http_target.script('/hook', Reply(status=code))
    async with running(tmp_path, webhook(f'{http_target.url}/hook')) as engine:
        event_id = await push(engine)
        last = await outcome(engine, event_id, 'Failed', 'Retrying')
        assert {k: last[k] for k in ('outcome', 'attempts', 'code', 'message')} == {
            'outcome': 'Failed', 'attempts': 1, 'code': code,
            'message': f'webhook target answered {code} (not retried)'}
        assert status(engine)['numberOfFailures'] == 1
        assert status(engine)['deliveries'] == {'succeeded': 0, 'failed': 1, 'dropped': 0}
    assert len(http_target.on('/hook')) == 1


async def test_redirects_are_not_followed(http_target, tmp_path) -> None:
    http_target.script('/hook', Reply(status=302, headers={'Location': '/elsewhere'}))
    async with running(tmp_path, webhook(f'{http_target.url}/hook')) as engine:
        last = await outcome(engine, await push(engine), 'Failed', 'Retrying')
    assert (last['outcome'], last['code'], last['message']) == (
        'Failed', 302, 'webhook target answered 302 (not retried)')
    assert [request.path for request in http_target.requests] == ['/hook']


async def test_cookies_a_target_sets_are_never_sent_back(http_target, tmp_path) -> None:
    # Deliveries are independent POSTs, not a browsing session: a target's Set-Cookie is not kept
    # (and not sent with the next event), whichever process made the attempt.
    # By host name: aiohttp's default jar would ignore cookies from an IP address anyway.
    http_target.script('/hook', Reply(headers={'Set-Cookie': 'session=abc123; Path=/'}))
    async with running(tmp_path, webhook(f'http://localhost:{http_target.port}/hook')) as engine:
        await outcome(engine, await push(engine), 'Succeeded')
        await outcome(engine, await push(engine), 'Succeeded')
    first, second = http_target.on('/hook')
    assert 'Cookie' not in first.headers and 'Cookie' not in second.headers


@pytest.mark.parametrize('code', [408, 429, 500, 502, 503])
async def test_retryable_codes_are_retried_until_success(http_target, tmp_path, code: int) -> None:
    http_target.script('/hook', Reply(status=code), Reply(status=200))
    async with running(tmp_path, webhook(f'{http_target.url}/hook')) as engine:
        last = await outcome(engine, await push(engine), 'Succeeded', 'Failed')
    assert (last['outcome'], last['attempts'], last['code']) == ('Succeeded', 2, 200)
    requests = http_target.on('/hook')
    assert len(requests) == 2
    assert requests[0].body == requests[1].body


@pytest.mark.parametrize('code', [429, 503])
async def test_retry_after_is_the_minimum_delay(http_target, tmp_path, code: int) -> None:
    # The schedule would retry within 10 ms; Retry-After: 30 must win.
    http_target.script('/hook', Reply(status=code, headers={'Retry-After': '30'}))
    async with running(tmp_path, webhook(f'{http_target.url}/hook')) as engine:
        last = await outcome(engine, await push(engine), 'Retrying', 'Failed')
        assert {k: last[k] for k in ('outcome', 'attempts', 'code', 'message')} == {
            'outcome': 'Retrying', 'attempts': 1, 'code': code,
            'message': f'webhook target answered {code}; retrying in 30.0s'}
        assert status(engine)['numberOfFailures'] == 1
        assert len(engine.outbox) == 1  # still pending, due later
    assert len(http_target.on('/hook')) == 1


@pytest.mark.parametrize('retry_after', ['99999999999', 'Fri, 31 Dec 9999 23:59:59 GMT'])
async def test_retry_after_is_honoured_up_to_a_day(http_target, tmp_path, retry_after: str) -> None:
    """A target asking for centuries parked the delivery for them: it waits a day at most, then goes on."""
    http_target.script('/hook', Reply(status=429, headers={'Retry-After': retry_after}))
    async with running(tmp_path, webhook(f'{http_target.url}/hook')) as engine:
        last = await outcome(engine, await push(engine), 'Retrying', 'Failed')
    assert {k: last[k] for k in ('outcome', 'attempts', 'code', 'message')} == {
        'outcome': 'Retrying', 'attempts': 1, 'code': 429,
        'message': 'webhook target answered 429; retrying in 86400.0s'}


@pytest.mark.parametrize('value, seconds', [
    ('30', 30.0), (' 7 ', 7.0), ('99999999999', 86400.0), ('9' * 400, 86400.0),
    ('\u00b2', None), ('\u0663', None),  # digits to str.isdigit, not to float(): "unexpected errors" once
    ('soon', None), ('', None), (None, None),
])
def test_retry_after_values(value: str | None, seconds: float | None) -> None:
    from reponotify.methods.base import parse_retry_after
    assert parse_retry_after(value) == seconds


async def test_success_resets_the_failure_count_within_a_delivery(http_target, tmp_path) -> None:
    http_target.script('/hook', Reply(status=500), Reply(status=500), Reply(status=200))
    async with running(tmp_path, webhook(f'{http_target.url}/hook')) as engine:
        last = await outcome(engine, await push(engine), 'Succeeded', 'Failed')
        assert (last['outcome'], last['attempts'], last['code']) == ('Succeeded', 3, 200)
        assert status(engine)['numberOfFailures'] == 0
        assert ready(engine) == ('True', 'Accepted', 'routed')


async def test_success_resets_the_failure_count_across_deliveries(http_target, tmp_path) -> None:
    http_target.script('/hook', Reply(status=400), Reply(status=400), Reply(status=200))
    async with running(tmp_path, webhook(f'{http_target.url}/hook')) as engine:
        await outcome(engine, await push(engine), 'Failed')
        await outcome(engine, await push(engine), 'Failed')
        assert status(engine)['numberOfFailures'] == 2
        await outcome(engine, await push(engine), 'Succeeded')
        assert status(engine)['numberOfFailures'] == 0
        assert status(engine)['deliveries'] == {'succeeded': 1, 'failed': 2, 'dropped': 0}
        # one success wiped the slate: three more failures are needed to disable
        assert ready(engine)[:2] == ('True', 'Accepted')


async def test_gives_up_after_the_schedule_without_reaching_three_failures(http_target, tmp_path) -> None:
    http_target.script('/hook', Reply(status=500))
    async with running(tmp_path, webhook(f'{http_target.url}/hook'), schedule=(0.01,)) as engine:
        last = await outcome(engine, await push(engine), 'Failed')
    assert (last['attempts'], last['message']) == (2, 'webhook target answered 500; gave up after 2 attempts')
    assert status(engine)['numberOfFailures'] == 2
    assert len(http_target.on('/hook')) == 2


# -- secrets never show ------------------------------------------------------------------------------

async def test_webhook_credentials_are_used_but_never_shown(http_target, tmp_path) -> None:
    http_target.script('/hook', Reply(status=500))
    url = f'http://alice:hunter2-secret@127.0.0.1:{http_target.port}/hook'
    async with running(tmp_path, webhook(url)) as engine:
        await outcome(engine, await push(engine), 'Failed')
        shown = json.dumps(status(engine))
    assert http_target.on('/hook')[0].headers['Authorization'] == \
        'Basic ' + base64.b64encode(b'alice:hunter2-secret').decode()
    assert 'hunter2' not in shown and 'alice' not in shown
    assert 'hunter2' not in (tmp_path / 'status.json').read_text()


async def test_unreachable_webhook_message_does_not_show_the_url(tmp_path, unused_tcp_port: int) -> None:
    url = f'http://alice:hunter2-secret@127.0.0.1:{unused_tcp_port}/hook'  # nothing listens there
    async with running(tmp_path, webhook(url), schedule=()) as engine:
        last = await outcome(engine, await push(engine), 'Failed')
        shown = json.dumps(status(engine))
    assert last['code'] is None
    assert last['message'].startswith('could not reach webhook target: ClientConnectorError: ')
    assert last['message'].endswith('; gave up after 1 attempts')
    assert 'hunter2' not in shown and 'alice' not in shown


async def test_slack_url_is_never_shown(http_target, tmp_path) -> None:
    http_target.script('/services/T000/B000/SECRETTOKEN', Reply(status=500))
    secrets = ManifestSecrets({('team-a', 'slack'): {'url': f'{http_target.url}/services/T000/B000/SECRETTOKEN'}})
    spec = {'repository': REPOSITORY, 'event': 'repo_push', 'method': 'slack',
            'config': {'urlFrom': {'secretKeyRef': {'name': 'slack', 'key': 'url'}}}}
    async with running(tmp_path, spec, secrets=secrets) as engine:
        last = await outcome(engine, await push(engine), 'Failed')
        shown = json.dumps(status(engine))
    assert last['message'] == 'Slack answered 500; the notification is now disabled'
    assert 'SECRETTOKEN' not in shown and '/services/' not in shown


async def test_an_unexpected_error_is_a_failed_attempt_retried_on_the_schedule_then_failed(
        http_target, tmp_path) -> None:
    """
    An exception from reponotify's own code (here Slack's template, given a string it cannot encode) was
    logged and retried forever, never counted and never shown. It is a failed attempt now: retried on the
    schedule, then Failed; it does not count towards disabling (the target never failed).
    """
    spec = {'repository': REPOSITORY, 'event': 'repo_push', 'method': 'slack',
            'config': {'url': f'{http_target.url}/slack'}}
    async with running(tmp_path, spec) as engine:  # FAST: 4 retries
        # The receiver refuses such a payload (400); the engine's own callers could still queue one.
        event_id = await push(engine, updated_tags=['\ud800'])
        failed = await outcome(engine, event_id, 'Failed')
        await eventually(lambda: len(engine.outbox) == 0, "the outbox to be empty")
    assert {k: failed[k] for k in ('outcome', 'attempts', 'code', 'message')} == {
        'outcome': 'Failed', 'attempts': 5, 'code': None,
        'message': "unexpected error (see the operator's log); gave up after 5 attempts"}
    assert http_target.on('/slack') == []
    final = status(engine)
    assert final['numberOfFailures'] == 0
    assert final['deliveries'] == {'succeeded': 0, 'failed': 1, 'dropped': 0}
    assert ready(engine) == ('True', 'Accepted', 'routed')


@pytest.mark.parametrize('method', ['webhook', 'slack'])
@pytest.mark.parametrize('url, message', [
    ('ftp://alice:SECRET@hooks.example/x', "spec.config.url: must be an http:// or https:// URL"),
    ('http://:SECRET@/x', "spec.config.url: must be a URL with a host name"),
    # urlsplit's own errors repeat the URL (and its credentials): they must not reach the message
    ('https://alice:pa\uff03ssSECRET@hooks.example/x', "spec.config.url: is not a valid URL"),
    ('http://[SECRET/x', "spec.config.url: is not a valid URL"),
    # A port aiohttp cannot use was accepted, then every attempt raised (retried forever, never counted).
    ('http://alice:SECRET@hooks.example:99999/x', "spec.config.url: has an invalid port (1 to 65535)"),
    ('http://alice:SECRET@hooks.example:0/x', "spec.config.url: has an invalid port (1 to 65535)"),
    ('http://alice:SECRET@hooks.example:abc/x', "spec.config.url: has an invalid port (1 to 65535)"),
])
async def test_invalid_spec_messages_never_show_the_url(method: str, url: str, message: str) -> None:
    secrets = ManifestSecrets({('team-a', 'hook'): {'url': url}})
    for config in ({'url': url}, {'urlFrom': {'secretKeyRef': {'name': 'hook', 'key': 'url'}}}):
        spec = {'repository': REPOSITORY, 'event': 'repo_push', 'method': method, 'config': config}
        with pytest.raises(InvalidSpec) as caught:
            await compile_notification(KEY, spec, secrets)
        assert str(caught.value) == message
        assert 'SECRET' not in str(caught.value)


async def test_a_notification_repr_never_shows_inline_secrets() -> None:
    from reponotify.notifications import NotificationKey, compile_notification
    from reponotify.standalone import ManifestSecrets

    spec = {'repository': 'acme/web', 'event': 'repo_push', 'method': 'slack',
            'config': {'url': 'https://hooks.slack.example/services/T0/B0/inline-secret-token'}}
    notification = await compile_notification(NotificationKey('team-a', 'n'), spec, ManifestSecrets({}))
    assert 'inline-secret-token' not in repr(notification)
    assert 'inline-secret-token' not in str(notification)


async def test_a_webhook_url_is_parsed_once_and_stays_secret() -> None:
    """The target keeps its URL parsed for every attempt; neither form shows in a repr, and a delivery process gets both."""
    import pickle

    import yarl

    from reponotify.notifications import NotificationKey, compile_notification
    from reponotify.standalone import ManifestSecrets

    url = 'https://alice:inline-secret@hooks.example/path%20x?token=inline-secret'
    spec = {'repository': 'acme/web', 'event': 'repo_push', 'method': 'webhook', 'config': {'url': url}}
    notification = await compile_notification(NotificationKey('team-a', 'n'), spec, ManifestSecrets({}))
    target = notification.target
    assert target.endpoint == yarl.URL(url)
    assert str(target.endpoint) == url
    assert 'inline-secret' not in repr(notification) and 'inline-secret' not in repr(target)
    copy = pickle.loads(pickle.dumps(target))
    assert copy.endpoint == target.endpoint and copy.url == target.url


# -- deliveries queued before the notification changed --------------------------------------------

async def first_attempt_retrying(engine: Engine) -> str:
    """Push one event; return its id once its first attempt failed and the retry waits (Retry-After: 1 s)."""
    event_id = await push(engine)
    await outcome(engine, event_id, 'Retrying')
    return event_id


RETRY_LATER = Reply(status=503, headers={'Retry-After': '1'})  # the retry waits 1 s: time to change the notification


@pytest.mark.parametrize('changes', [
    {'repository': 'team-b/other'},
    {'event': 'repo_mirror_sync_started'},
    {'repository': 'team-b/*'},
], ids=['repository', 'event', 'glob'])
async def test_a_queued_retry_is_dropped_when_the_changed_notification_no_longer_matches_its_event(
        http_target, tmp_path, changes: dict[str, str]) -> None:
    """A notification changed to another repository or event must not get an event it no longer subscribes to."""
    http_target.script('/old', RETRY_LATER)
    async with running(tmp_path, webhook(f'{http_target.url}/old')) as engine:
        event_id = await first_attempt_retrying(engine)
        changed = webhook(f'{http_target.url}/new') | changes
        engine.put_notification(await compile_notification(KEY, changed, ManifestSecrets({})))
        dropped = await outcome(engine, event_id, 'Dropped')
    assert {k: dropped[k] for k in ('event', 'outcome', 'attempts', 'code', 'message')} == {
        'event': 'repo_push', 'outcome': 'Dropped', 'attempts': 1, 'code': None,
        'message': 'Dropped: the notification was changed and no longer matches this event '
                   '(repository, event or eventConfig)'}
    assert http_target.on('/new') == []
    assert len(http_target.on('/old')) == 1
    assert status(engine)['deliveries'] == {'succeeded': 0, 'failed': 0, 'dropped': 1}


async def test_a_queued_retry_goes_to_the_changed_notification_that_still_matches_its_event(
        http_target, tmp_path) -> None:
    """A new URL (or a glob that still covers the repository) is honoured for deliveries queued before."""
    http_target.script('/old', RETRY_LATER)
    async with running(tmp_path, webhook(f'{http_target.url}/old')) as engine:
        event_id = await first_attempt_retrying(engine)
        changed = webhook(f'{http_target.url}/new') | {'repository': 'acme/*'}
        engine.put_notification(await compile_notification(KEY, changed, ManifestSecrets({})))
        succeeded = await outcome(engine, event_id, 'Succeeded')
        [received] = await http_target.wait_for(1, '/new')
    assert succeeded['attempts'] == 2
    assert json.loads(received.body)['repository'] == REPOSITORY
    assert status(engine)['deliveries'] == {'succeeded': 1, 'failed': 0, 'dropped': 0}


@pytest.mark.parametrize('reason, message', [
    ('Suspended', 'spec.suspend is true'),
    ('InvalidSpec', 'spec.config.url: must be an http:// or https:// URL'),
])
async def test_a_queued_retry_of_a_notification_no_longer_routed_is_recorded_as_dropped(
        http_target, tmp_path, reason: str, message: str) -> None:
    """Suspended (or made invalid) while a retry waits: the delivery is recorded as Dropped, never silently lost."""
    http_target.script('/old', RETRY_LATER)
    async with running(tmp_path, webhook(f'{http_target.url}/old')) as engine:
        event_id = await first_attempt_retrying(engine)
        engine.remove_notification(KEY)  # as the front ends do for a suspended or invalid spec
        engine.book.set_spec_condition(KEY, ReadyCondition('False', reason, message))
        dropped = await outcome(engine, event_id, 'Dropped')
        await eventually(lambda: len(engine.outbox) == 0, "the outbox to be empty")
    assert {k: dropped[k] for k in ('outcome', 'attempts', 'code', 'message')} == {
        'outcome': 'Dropped', 'attempts': 1, 'code': None,
        'message': f'Dropped: the notification is not ready ({reason}: {message})'}
    assert len(http_target.on('/old')) == 1
    assert status(engine)['deliveries'] == {'succeeded': 0, 'failed': 0, 'dropped': 1}
    assert ready(engine) == ('False', reason, message)


async def test_a_queued_retry_of_a_deleted_notification_leaves_nothing_behind(http_target, tmp_path) -> None:
    """Deleted while a retry waits: the delivery goes, and no status entry is made again for the key."""
    http_target.script('/old', RETRY_LATER)
    async with running(tmp_path, webhook(f'{http_target.url}/old')) as engine:
        await first_attempt_retrying(engine)
        engine.remove_notification(KEY)  # as the front ends do for a deleted resource
        engine.book.forget(KEY)
        await eventually(lambda: len(engine.outbox) == 0, "the outbox to be empty")
        assert engine.book.keys() == []
    assert len(http_target.on('/old')) == 1


# -- a graceful stop keeps what was written ----------------------------------------------------------

async def test_after_a_restart_deliveries_wait_for_their_notification_to_be_handled(http_target, tmp_path) -> None:
    """
    A front end that routes its notifications after starting the engine (the operator: kopf resumes them)
    holds their pending deliveries: one handled meanwhile is delivered, one never handled (deleted while
    reponotify was down) is removed when the hold ends, with nothing recorded for it.
    """
    from reponotify.events import new_event
    from reponotify.outbox import Outbox

    path = tmp_path / 'outbox.sqlite3'
    gone = NotificationKey('team-a', 'deleted-meanwhile')
    outbox = Outbox(path)
    await outbox.open()
    await outbox.accept(new_event('repo_push', sample_payload('repo_push', REPOSITORY)), [KEY, gone])
    await outbox.close()

    engine = Engine(EngineSettings(dispatcher=DispatcherSettings(workers=4, retry_schedule=FAST,
                                                                 delivery_processes=DELIVERY_PROCESSES[0]),
                                   status_interval=0.0), outbox_path=path)
    await engine.start(StatusFile(tmp_path / 'status.json'), hold_unhandled=1.0)
    try:
        await asyncio.sleep(0.3)  # both due, neither handled: nothing may go, nothing may be removed
        assert len(engine.outbox) == 2 and http_target.requests == []
        engine.put_notification(await compile_notification(KEY, webhook(f'{http_target.url}/hook'),
                                                           ManifestSecrets({})))
        engine.book.set_spec_condition(KEY, ReadyCondition('True', 'Accepted', 'routed'))
        engine.dispatcher.release(KEY)  # handled: its delivery goes now
        await http_target.wait_for(1, '/hook')
        await eventually(lambda: (status(engine)['lastDelivery'] or {}).get('outcome') == 'Succeeded', "the delivery")
        assert len(engine.outbox) == 1  # the other one still waits for its notification
        await eventually(lambda: len(engine.outbox) == 0, "the hold to end", timeout=5)
    finally:
        await engine.stop()
    assert engine.book.keys() == [KEY]
    assert len(http_target.requests) == 1


async def test_a_delivery_completed_before_a_graceful_stop_is_not_resumed(tmp_path) -> None:
    """
    ``Outbox.close`` must let a commit already handed to its database thread finish. It used to
    cancel the writer as soon as nothing was left in the submission queue, and a batch waiting for
    the (busy) database thread was then never written: after a restart, a delivery whose final
    outcome was already recorded ran again (seen as Failed, then Dropped, for one event).
    """
    import threading

    from reponotify.events import new_event
    from reponotify.outbox import Outbox

    path = tmp_path / 'outbox.sqlite3'
    outbox = Outbox(path)
    assert await outbox.open() == 0
    await outbox.accept(new_event('repo_push', sample_payload('repo_push', REPOSITORY)), [KEY])
    delivery = await outbox.take()

    busy = threading.Event()  # keeps the outbox's one database thread busy (say, a slow fsync)
    blocker = asyncio.get_running_loop().run_in_executor(outbox._thread, busy.wait)
    await outbox.complete(delivery)  # the final outcome is recorded: the row must go
    closing = asyncio.create_task(outbox.close())
    try:
        for _ in range(50):  # event-loop turns (not wall time): the writer takes the delete, close() acts
            await asyncio.sleep(0)
        assert not outbox._submissions  # the delete is in the writer's hands, waiting for the thread
    finally:
        busy.set()  # also when the assertion fails: a thread left waiting would keep pytest from exiting
    await blocker
    await asyncio.wait_for(closing, 10)

    reopened = Outbox(path)
    try:
        assert await reopened.open() == 0  # nothing to resume
    finally:
        await reopened.close()


async def test_per_target_limits_the_attempts_in_flight_to_one_webhook_host(tmp_path) -> None:
    # Six notifications, each with a URL of its own on one host that answers slowly: with
    # --per-target 2, two attempts are in flight there at a time, whatever the free workers.
    in_flight, most = 0, 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.2)
        in_flight -= 1
        return web.Response(text='ok')

    app = web.Application()
    app.router.add_post('/hooks/{name}', slow)
    runner, port = await serve_on_loopback(app)
    engine = Engine(EngineSettings(dispatcher=DispatcherSettings(workers=8, per_target=2, retry_schedule=FAST,
                                                                 delivery_processes=DELIVERY_PROCESSES[0]),
                                   status_interval=0.0))
    keys = [NotificationKey('team-a', f'hook-{i}') for i in range(6)]
    for key in keys:
        engine.put_notification(await compile_notification(
            key, webhook(f'http://127.0.0.1:{port}/hooks/{key.name}'), ManifestSecrets({})))
    await engine.start(StatusFile(tmp_path / 'status.json'))
    try:
        assert (await engine.ingest('repo_push', sample_payload('repo_push', REPOSITORY))).matched == 6
        # The other four wait, parked rather than taken and put back again and again, until one ends.
        await eventually(lambda: engine.dispatcher.parked == 4, "four deliveries parked")
        await eventually(lambda: all(engine.book.status(key)['deliveries']['succeeded'] == 1 for key in keys),
                         "every notification's delivery to succeed")
        assert engine.dispatcher.parked == 0
    finally:
        await engine.stop()
        await runner.cleanup()
    assert most == 2
