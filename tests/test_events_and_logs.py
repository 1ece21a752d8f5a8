"""
Kubernetes Warning Events for failed deliveries, and the logs.

* Failed deliveries become ``Warning`` Events on the RepositoryNotification, at
  most one per notification per interval: a retry storm makes a couple of
  Events that count the failures, never one per attempt. (Against kmock's
  emulator, through the real operator, as ``kubectl describe`` would list them.)
* ``--log-format json`` writes one JSON object per line, for our loggers and kopf's.
* Secrets (webhook URLs with credentials, Slack URLs, API tokens, signing
  secrets, values from Secrets) never appear in any log record, at DEBUG, in
  the core, the operator (kopf's own debug logs included) and the command.
"""
import asyncio
import base64
import io
import json
import logging
import pathlib
import re
import signal
import sys
from typing import Any

import aiohttp
import kopf
import pytest
from conftest import HttpTarget, Reply
from reponotify.dispatcher import DispatcherSettings
from reponotify.engine import Engine, EngineSettings
from reponotify.events import sample_payload
from reponotify.kube.delivery_events import DeliveryWarnings
from reponotify.logs import JsonFormatter, TextFormatter, configure_logging
from reponotify.methods.base import MethodSettings
from reponotify.models import API_VERSION, KIND, DeliveryOutcome
from reponotify.notifications import NotificationKey, compile_notification
from reponotify.standalone import ManifestSecrets, StatusFile
from reponotify.status import DeliveryRecord
from test_cli import standalone_process
from test_delivery import eventually
from test_operator import (
    NS,
    Cluster,
    StartOperator,
    cluster,
    start_operator,
    webhook_spec,
)

__all__ = ['cluster', 'start_operator']  # fixtures used here

MORE = re.compile(r' \((\d+) more failures? since the last event\)$')


def record(outcome: DeliveryOutcome = DeliveryOutcome.FAILED, n: int = 1) -> DeliveryRecord:
    return DeliveryRecord(event_id=f'e{n}', event='repo_push', outcome=outcome, attempts=n,
                          message='webhook target answered 500')


# -- Warning Events ----------------------------------------------------------------------------


async def test_warnings_are_rate_limited_and_count_what_they_held_back() -> None:
    posted: list[tuple[NotificationKey, str, str, str, int]] = []
    warnings = DeliveryWarnings(lambda *event: posted.append(event), interval=0.3)
    a, b = NotificationKey(NS, 'a'), NotificationKey(NS, 'b')

    warnings(a, record(DeliveryOutcome.SUCCEEDED))  # not a failure: nothing
    warnings(a, record(DeliveryOutcome.DROPPED))
    assert posted == []
    warnings(a, record(DeliveryOutcome.RETRYING, 1))  # the first failure: posted at once
    assert posted == [(a, 'Warning', 'DeliveryRetrying',
                       'repo_push event e1, attempt 1: webhook target answered 500', 1)]
    for n in range(2, 6):  # four more within the interval: held back
        warnings(a, record(DeliveryOutcome.RETRYING if n < 5 else DeliveryOutcome.FAILED, n))
    warnings(b, record(DeliveryOutcome.FAILED, 1))  # another notification has its own allowance
    assert [event[0] for event in posted] == [a, b]
    await asyncio.sleep(0.45)  # the interval is over: the latest held one is posted, with the count of the others
    assert posted[2:] == [(a, 'Warning', 'DeliveryFailed', ('repo_push event e5, attempt 5: webhook target answered '
                                                            '500 (3 more failures since the last event)'), 4)]
    await asyncio.sleep(0.45)
    assert len(posted) == 3  # nothing more to tell

    warnings(a, record(DeliveryOutcome.FAILED, 6))  # a new failure after a quiet interval: at once, alone
    assert posted[3][2:] == ('DeliveryFailed', 'repo_push event e6, attempt 6: webhook target answered 500', 1)
    warnings(a, record(DeliveryOutcome.FAILED, 7))  # held ...
    warnings.forget(a)  # ... and dropped with the notification
    await asyncio.sleep(0.45)
    assert len(posted) == 4


def delivery_warnings(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    return [event for event in cluster.events(name) if event['reason'] in ('DeliveryFailed', 'DeliveryRetrying')]


async def test_a_final_failure_posts_a_warning_event(cluster: Cluster, start_operator: StartOperator,
                                                     http_target: HttpTarget) -> None:
    http_target.script('/hook', Reply(status=400))
    operator = await start_operator()
    created = await cluster.create('refused', webhook_spec(f'{http_target.url}/hook'))
    await cluster.wait_ready('refused', 'True', 'Accepted', 1)
    accepted = await operator.post_event('repo_push', sample_payload('repo_push', 'acme/web'))
    [event] = await eventually(lambda: delivery_warnings(cluster, 'refused'), "the DeliveryFailed Event")
    assert (event['type'], event['reason'], event['message'], event['count']) == (
        'Warning', 'DeliveryFailed',
        f"repo_push event {accepted['id']}, attempt 1: webhook target answered 400 (not retried)", 1)
    # `kubectl describe rn refused` lists it: it names the resource by uid.
    assert event['involvedObject'] == {'apiVersion': API_VERSION, 'kind': KIND, 'name': 'refused', 'namespace': NS,
                                       'uid': created['metadata']['uid']}
    assert http_target.url not in json.dumps(event)


async def test_a_retry_storm_makes_a_couple_of_events_not_one_per_failure(
        cluster: Cluster, start_operator: StartOperator, http_target: HttpTarget) -> None:
    """Ten events to a target that fails every first attempt: ten failures, at most one Event per interval."""
    interval = 2.0
    http_target.script('/hook', *[Reply(status=status) for _ in range(10) for status in (503, 200)])
    operator = await start_operator(warning_interval=interval, retry_schedule=(0.02,) * 4)
    await cluster.create('storm', webhook_spec(f'{http_target.url}/hook'))
    await cluster.wait_ready('storm', 'True', 'Accepted', 1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for n in range(1, 11):  # one at a time: every failure is followed by a success, so it is never disabled
        await operator.post_event('repo_push', sample_payload('repo_push', 'acme/web'))
        await http_target.wait_for(2 * n, '/hook')
        await cluster.wait_status('storm', lambda s, n=n: s['deliveries']['succeeded'] == n, f"success {n}")
    elapsed = loop.time() - started

    def all_counted() -> list[dict[str, Any]] | None:
        events = delivery_warnings(cluster, 'storm')
        return events if sum(event['count'] for event in events) == 10 else None
    events = await eventually(all_counted, "Events counting all ten failures", timeout=interval + 10)

    assert len(events) <= 2 + int(elapsed / interval)  # 2 here: the first at once, one for the rest
    assert all(event['type'] == 'Warning' and event['reason'] == 'DeliveryRetrying' for event in events)
    first, *later = events
    assert first['count'] == 1 and not MORE.search(first['message'])
    for event in later:
        match = MORE.search(event['message'])
        assert match and int(match[1]) == event['count'] - 1, event['message']
    assert [condition['status'] for condition in cluster.status('storm')['conditions']] == ['True']
    assert len(http_target.on('/hook')) == 20


# -- log format --------------------------------------------------------------------------------


def test_json_log_lines_have_the_documented_fields() -> None:
    logger = logging.getLogger('reponotify.test')
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        exc_info = sys.exc_info()
    entry = logger.makeRecord('reponotify.test', logging.WARNING, __file__, 1, "Delivery %s: %s", ('d1', 'Failed'),
                              exc_info, extra={'notification': 'ns1/hook', 'attempts': 3, 'code': None,
                                               'key': NotificationKey('ns1', 'hook')})
    line = JsonFormatter().format(entry)
    assert '\n' not in line
    parsed = json.loads(line)
    assert re.fullmatch(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z', parsed.pop('timestamp'))
    assert parsed.pop('exception').startswith('Traceback (most recent call last):')
    assert parsed == {'level': 'warning', 'logger': 'reponotify.test', 'message': 'Delivery d1: Failed',
                      'notification': 'ns1/hook', 'attempts': 3, 'code': None, 'key': 'ns1/hook'}


def test_kopf_per_object_logs_carry_the_object() -> None:
    """kopf's own records (its ObjectLogger) get the resource as "object" in JSON, "[ns/name]" in text."""
    stream = io.StringIO()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        for log_format in ('json', 'text'):
            configure_logging('debug', log_format, stream)
            body = kopf.Body({'apiVersion': API_VERSION, 'kind': KIND,
                              'metadata': {'name': 'hook', 'namespace': NS, 'uid': 'u-1'}})
            kopf.ObjectLogger(body=body, settings=kopf.OperatorSettings()).info("Handler %r succeeded.", 'reconcile')
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    json_line, text_line = stream.getvalue().splitlines()
    parsed = json.loads(json_line)
    assert parsed['logger'] == 'kopf.objects' and parsed['level'] == 'info'
    assert parsed['message'] == "Handler 'reconcile' succeeded."
    assert parsed['object'] == {'apiVersion': API_VERSION, 'kind': KIND, 'name': 'hook', 'namespace': NS,
                                'uid': 'u-1'}
    assert not {'settings', 'k8s_ref', 'k8s_skip'} & set(parsed)
    assert text_line.endswith(" INFO    kopf.objects: [ns1/hook] Handler 'reconcile' succeeded.")


# -- secrets never logged --------------------------------------------------------------------------

SECRETS = {
    'password': 'pa55-w0rd-in-url',
    'query_token': 'query-t0ken-in-url',
    'slack': 'T000SLACK/B000SLACK/slackSecretPath123',
    'flowdock': 'flowdockApiToken0123456789',
    'hipchat': 'hipchatNotificationToken42',
    'signing': 'whsec_' + base64.b64encode(b'signing-key-that-is-32-bytes-ok!').decode(),
}


def with_credentials(base_url: str) -> str:
    return base_url.replace('://', '://user:' + SECRETS['password'] + '@')


def assert_no_secret(records: list[logging.LogRecord], secrets: list[str]) -> None:
    """No secret in any record: its message, its arguments or extras, and as either formatter writes it."""
    for entry in records:
        rendered = [JsonFormatter().format(entry), TextFormatter().format(entry), repr(entry.__dict__)]
        for secret in secrets:
            for text in rendered:
                assert secret not in text, f"secret {secret[:6]}... logged by {entry.name}: {text[:300]}"


async def test_secrets_never_appear_in_core_logs(http_target: HttpTarget, tmp_path: pathlib.Path,
                                                 caplog: pytest.LogCaptureFixture, unused_tcp_port: int) -> None:
    caplog.set_level(logging.DEBUG)
    http_target.script('/hook', Reply(status=500, body=f"echo {SECRETS['password']}"))
    http_target.script(f"/services/{SECRETS['slack']}", Reply(status=404))
    http_target.script('/slow', Reply(delay=1.0))
    http_target.default = Reply(status=403)  # Flowdock and HipChat refuse
    closed = f'127.0.0.1:{unused_tcp_port}'  # nothing listens there
    host = http_target.url.removeprefix('http://')
    credentials = f"user:{SECRETS['password']}"
    specs = {
        'hook': ('webhook', {'url': f"http://{credentials}@{host}/hook?token={SECRETS['query_token']}",
                             'signingSecret': SECRETS['signing']}),
        'unreachable': ('webhook', {'url': f"http://{credentials}@{closed}/hook?token={SECRETS['query_token']}"}),
        'slow': ('webhook', {'url': f"http://{credentials}@{host}/slow?token={SECRETS['query_token']}"}),
        'slack': ('slack', {'url': f"{http_target.url}/services/{SECRETS['slack']}"}),
        'flowdock': ('flowdock', {'flow_api_token': SECRETS['flowdock']}),
        'hipchat': ('hipchat', {'notification_token': SECRETS['hipchat'], 'room_id': '42'}),
    }
    methods = MethodSettings(flowdock_api_url=f'{http_target.url}/flowdock', hipchat_api_url=f'{http_target.url}/hc')
    engine = Engine(EngineSettings(dispatcher=DispatcherSettings(workers=8, retry_schedule=(0.01, 0.01), timeout=0.3,
                                                                 methods=methods), status_interval=0.0))
    for name, (method, config) in specs.items():
        spec = {'repository': f'acme/{name}', 'event': 'repo_push', 'method': method, 'config': config}
        engine.admit(await compile_notification(NotificationKey(NS, name), spec, ManifestSecrets({})))
    await engine.start(StatusFile(tmp_path / 'status.json'))
    try:
        for name in specs:
            assert (await engine.ingest('repo_push', sample_payload('repo_push', f'acme/{name}'))).matched == 1
        await eventually(lambda: all(engine.book.status(NotificationKey(NS, name))['deliveries']['failed'] == 1
                                     for name in specs), "every delivery to fail", timeout=20)
    finally:
        await engine.stop()

    failures = [entry for entry in caplog.records if entry.name == 'reponotify.dispatcher'
                and getattr(entry, 'outcome', None) == 'Failed']
    assert sorted(entry.notification for entry in failures) == sorted(f'{NS}/{name}' for name in specs)  # type: ignore[attr-defined]
    assert any(getattr(entry, 'outcome', None) == 'Retrying' for entry in caplog.records)
    assert_no_secret(caplog.records, list(SECRETS.values()) + [credentials])


async def test_secrets_never_appear_in_operator_logs(
        cluster: Cluster, start_operator: StartOperator, http_target: HttpTarget,
        caplog: pytest.LogCaptureFixture) -> None:
    """
    The operator at DEBUG, kopf's own logs included: neither a URL from a Secret nor one written
    inline in spec.config shows in any record (kopf's body, diff and patch dumps are cut off).
    """
    caplog.set_level(logging.DEBUG)
    http_target.script('/hook', Reply(status=500))
    secret_url = with_credentials(http_target.url) + '/hook?token=' + SECRETS['query_token']
    await cluster.create_secret('hook-secret', {'url': secret_url})
    operator = await start_operator()
    spec = {'repository': 'acme/web', 'event': 'repo_push', 'method': 'webhook',
            'config': {'urlFrom': {'secretKeyRef': {'name': 'hook-secret', 'key': 'url'}}}}
    await cluster.create('from-secret', spec)
    inline_url = f"{http_target.url}/services/{SECRETS['slack']}"
    await cluster.create('inline', {'repository': 'acme/web', 'event': 'repo_push', 'method': 'slack',
                                    'config': {'url': inline_url}})
    await cluster.wait_ready('from-secret', 'True', 'Accepted', 1)
    await cluster.wait_ready('inline', 'True', 'Accepted', 1)
    await cluster.patch_spec('inline', {'config': {'url': inline_url + '-changed'}})  # kopf logs the diff
    await cluster.wait_ready('inline', 'True', 'Accepted', 2)
    await operator.post_event('repo_push', sample_payload('repo_push', 'acme/web'))
    await cluster.wait_ready('from-secret', 'False', 'Disabled', 1)
    await eventually(lambda: delivery_warnings(cluster, 'from-secret'), "a Warning Event")
    await operator.stop()

    messages = [entry.getMessage() for entry in caplog.records if entry.name == 'kopf.objects']
    assert "Creation is in progress (not logged: a spec may hold secrets)" in messages
    assert "Updating diff (not logged: a spec may hold secrets)" in messages
    assert "Handler 'build_registry.<locals>.reconcile' succeeded." in messages  # the rest is kept
    assert any(getattr(entry, 'outcome', None) == 'Failed' for entry in caplog.records)
    encoded = base64.b64encode(secret_url.encode()).decode()
    assert_no_secret(caplog.records, [SECRETS['password'], SECRETS['query_token'], SECRETS['slack'], encoded])
    assert SECRETS['password'] not in json.dumps(cluster.events('from-secret'))


async def test_standalone_json_logs(http_target: HttpTarget, tmp_path: pathlib.Path, unused_tcp_port: int) -> None:
    """The command with --log-format json (by its environment variable) at debug: JSON lines, no secret."""
    http_target.script('/hook', Reply(status=400))
    url = with_credentials(http_target.url) + '/hook?token=' + SECRETS['query_token']
    extra = {'REPONOTIFY_LOG_FORMAT': 'json', 'REPONOTIFY_LOG_LEVEL': 'debug',
             'REPONOTIFY_ALLOW_TARGETS': '127.0.0.1/32'}
    async with standalone_process(tmp_path, unused_tcp_port, url, **extra) as process:
        async with aiohttp.ClientSession() as session, session.post(
                f'http://127.0.0.1:{unused_tcp_port}/v1/events/repo_push', json=sample_payload('repo_push', 'acme/web'),
                headers={'Authorization': 'Bearer cli-test-token'}) as response:
            assert response.status == 202
        await http_target.wait_for(1, '/hook')
        log = tmp_path / 'standalone.log'
        await eventually(lambda: '"outcome": "Failed"' in log.read_text(), "the failure to be logged")
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines()]  # every line is one JSON object
    assert all({'timestamp', 'level', 'logger', 'message'} <= set(line) for line in lines)
    [failure] = [line for line in lines if line.get('outcome') == 'Failed']
    assert failure['level'] == 'warning' and failure['logger'] == 'reponotify.dispatcher'
    assert failure['notification'] == 'demo/to-ci' and failure['method'] == 'webhook' and failure['code'] == 400
    assert any(line['logger'] == 'reponotify.receiver' and 'listening' in line['message'] for line in lines)
    text = log.read_text()
    assert SECRETS['password'] not in text and SECRETS['query_token'] not in text
