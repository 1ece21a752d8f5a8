"""
The SSRF guard, through the real dispatcher and aiohttp connector.

Refused targets are final failures with the reason in status; nothing is
connected to. Safety interlock: the guard is first proven on loopback targets
(which would be harmless if it failed) before any test names the metadata
address or a private network, so a broken guard can never send a packet there.
"""
import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from conftest import HttpTarget, Reply
from reponotify.dispatcher import DispatcherSettings
from reponotify.engine import Engine, EngineSettings
from reponotify.events import sample_payload
from reponotify.notifications import NotificationKey, compile_notification
from reponotify.standalone import ManifestSecrets
from reponotify.status import ReadyCondition
from reponotify.targets import TargetPolicy

Deliver = Callable[..., Awaitable[dict[str, Any]]]


async def final_outcome(engine: Engine, key: NotificationKey, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = engine.book.status(key).get('lastDelivery')
        if last and last['outcome'] in ('Succeeded', 'Failed'):
            return last
        await asyncio.sleep(0.02)
    pytest.fail(f"no final outcome for {key}")


@pytest.fixture
async def deliver_with() -> AsyncIterator[Deliver]:
    engines: list[Engine] = []

    async def deliver(url: str, allow: str = '') -> dict[str, Any]:
        settings = EngineSettings(dispatcher=DispatcherSettings(
            retry_schedule=(0.01,), target_policy=TargetPolicy.parse(allow), timeout=2))
        engine = Engine(settings)
        engines.append(engine)
        key = NotificationKey('team-a', 'hook')
        spec = {'repository': 'acme/web', 'event': 'repo_push', 'method': 'webhook', 'config': {'url': url}}
        engine.put_notification(await compile_notification(key, spec, ManifestSecrets({})))
        engine.book.set_spec_condition(key, ReadyCondition('True', 'Accepted', 'routed'))

        class Sink:
            async def write(self, *_: object) -> None: ...

        await engine.start(Sink())
        await engine.ingest('repo_push', sample_payload('repo_push', 'acme/web'))
        return await final_outcome(engine, key)

    yield deliver
    for engine in engines:
        await engine.stop()


LOOPBACK_CASES = [
    ('http://127.0.0.1:{port}/hook', "target refused: 127.0.0.1 is a loopback address"),
    ('http://[::1]:{port}/hook', "target refused: ::1 is a loopback address"),
    ('http://[::ffff:127.0.0.1]:{port}/hook', "target refused: 127.0.0.1 is a loopback address"),
    ('http://localhost:{port}/hook', "target refused: "),  # a name resolving to loopback (either family)
]
FORBIDDEN_CASES = [
    ('http://169.254.169.254/latest/meta-data/',
     "target refused: 169.254.169.254 is a link-local (cloud metadata service) address"),
    ('http://10.0.0.1/hook', "target refused: 10.0.0.1 is a private address"),
    ('http://192.168.1.1:8080/hook', "target refused: 192.168.1.1 is a private address"),
]
HINT = " (an operator may allow it with --allow-targets)"


async def test_refused_targets_fail_finally_with_the_reason_and_nothing_is_connected(
        http_target: HttpTarget, deliver_with: Deliver) -> None:
    for template, reason in LOOPBACK_CASES:
        outcome = await deliver_with(template.format(port=http_target.port))
        assert outcome['outcome'] == 'Failed' and outcome['attempts'] == 1, outcome
        assert str(outcome['message']).startswith(reason) and str(outcome['message']).endswith(HINT), outcome
    assert http_target.requests == []  # the guard held on every loopback form

    # Only now, with the guard proven on this machine, name addresses that must never see a packet.
    for policy_address in ('169.254.169.254', '10.0.0.1', '192.168.1.1'):
        assert TargetPolicy().refusal('x', policy_address) is not None
    for url, reason in FORBIDDEN_CASES:
        outcome = await deliver_with(url)
        assert outcome == {**outcome, 'outcome': 'Failed', 'attempts': 1, 'message': reason + HINT}


async def test_the_allow_list_lets_a_named_network_or_host_through(
        http_target: HttpTarget, deliver_with: Deliver) -> None:
    by_network = await deliver_with(f'http://127.0.0.1:{http_target.port}/hook', allow='127.0.0.0/8')
    assert by_network['outcome'] == 'Succeeded'
    by_name = await deliver_with(f'http://localhost:{http_target.port}/hook', allow='localhost')
    assert by_name['outcome'] == 'Succeeded'
    assert len(http_target.on('/hook')) == 2


async def test_redirects_are_not_followed(http_target: HttpTarget, deliver_with: Deliver) -> None:
    http_target.script('/hook', Reply(status=302, headers={'Location': f'http://127.0.0.1:{http_target.port}/inner'}))
    outcome = await deliver_with(f'http://localhost:{http_target.port}/hook', allow='localhost')
    assert outcome['outcome'] == 'Failed' and outcome['code'] == 302
    assert outcome['message'] == "webhook target answered 302 (not retried)"
    assert [request.path for request in http_target.requests] == ['/hook']  # /inner was never requested
