"""
Delivery processes (``--delivery-processes N``): attempts made in child processes.

tests/test_delivery.py runs every delivery rule through one delivery process as well; here
is what only a child process can get wrong: the TLS material and signing key crossing the
process boundary, a child dying mid-attempt, the SSRF guard holding there, methods that must
stay in the operator's process, and secrets never reaching a command line.
"""
import contextlib
import datetime
import json
import os
import pathlib
import pickle
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
import standardwebhooks
from conftest import HttpTarget, Reply, eventually
from reponotify.delivery_processes import (AUTO_LIMIT, EXITED_MESSAGE, NICENESS, DeliveryProcessError,
                                          DeliveryProcesses, _event_fields, available_cpus, cgroup_cpu_quota,
                                          child_settings, process_count)
from reponotify.dispatcher import DispatcherSettings
from reponotify.engine import Engine, EngineSettings
from reponotify.events import event_from_json, new_event, sample_payload
from reponotify.methods.base import MethodSettings
from reponotify.notifications import NotificationKey, SecretSource, compile_notification
from reponotify.outbox import Outbox
from reponotify.standalone import ManifestSecrets
from reponotify.status import ReadyCondition
from reponotify.targets import TargetPolicy
from test_secure_webhooks import (CA_REF, CLIENT_REF, SIGNING_REF, SIGNING_SECRET, HttpsTarget, Pki,  # noqa: F401
                                  Secrets, https_target, pki, secrets)

KEY = NotificationKey('team-a', 'hook')


class NullSink:
    async def write(self, *_: object) -> None: ...


@contextlib.asynccontextmanager
async def engine_with(spec: dict[str, Any], secrets: SecretSource | None = None, *,
                      outbox: pathlib.Path | str = ':memory:', grace: float = 0.0,
                      **dispatcher: Any) -> AsyncIterator[Engine]:
    settings = DispatcherSettings(**{'workers': 4, 'retry_schedule': (0.01, 0.01), 'delivery_processes': 1,
                                     **dispatcher})
    engine = Engine(EngineSettings(dispatcher=settings, status_interval=0.0), outbox_path=outbox)
    engine.put_notification(await compile_notification(KEY, spec, secrets or ManifestSecrets({})))
    engine.book.set_spec_condition(KEY, ReadyCondition('True', 'Accepted', 'routed'))
    await engine.start(NullSink())
    try:
        yield engine
    finally:
        await engine.stop(grace)


def webhook(url: str, **config: Any) -> dict[str, Any]:
    return {'repository': 'acme/web', 'event': 'repo_push', 'method': 'webhook', 'config': {'url': url, **config}}


async def last_delivery(engine: Engine, *outcomes: str, attempts: int | None = None) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        last = engine.book.status(KEY).get('lastDelivery')
        if last and last['outcome'] in outcomes and attempts in (None, last['attempts']):
            return last
        return None
    return await eventually(reached, f"a delivery {'/'.join(outcomes)}")


def pids(engine: Engine) -> list[int]:
    processes = engine.dispatcher.processes
    assert processes is not None
    return processes.pids


async def test_mutual_tls_and_signing_work_in_a_delivery_process(https_target: HttpsTarget, pki: Pki,
                                                                 secrets: Secrets) -> None:
    # The SSLContext cannot be pickled: the child builds it again from the PEM it is sent.
    spec = webhook(f'{https_target.url}/hook', tls={**CA_REF, **CLIENT_REF}, **SIGNING_REF)
    async with engine_with(spec, secrets) as engine:
        [child] = pids(engine)
        assert child != os.getpid()
        await engine.ingest('repo_push', sample_payload('repo_push', 'acme/web'))
        [request] = await https_target.wait_for(1, '/hook')
        last = await last_delivery(engine, 'Succeeded')
    assert last['message'] == "webhook target answered 200"
    [peer] = https_target.peers
    assert peer['subjectAltName'] == (('DNS', 'hooks.reponotify.test'),)  # the client certificate
    assert request.body == json.dumps(sample_payload('repo_push', 'acme/web')).encode()  # the exact bytes
    verified = standardwebhooks.Webhook(SIGNING_SECRET).verify(request.body, request.headers)
    assert verified == sample_payload('repo_push', 'acme/web')


async def test_a_delivery_process_killed_mid_attempt_is_a_retried_failure_and_is_replaced(
        http_target: HttpTarget) -> None:
    http_target.script('/hook', Reply(delay=3), Reply())  # the first attempt hangs until the child is killed
    async with engine_with(webhook(f'{http_target.url}/hook')) as engine:
        [child] = pids(engine)
        accepted = await engine.ingest('repo_push', sample_payload('repo_push', 'acme/web'))
        await http_target.wait_for(1, '/hook')
        os.kill(child, signal.SIGKILL)
        retrying = await last_delivery(engine, 'Retrying', 'Succeeded', attempts=1)
        succeeded = await last_delivery(engine, 'Succeeded')
        [replacement] = pids(engine)
    assert retrying['outcome'] == 'Retrying'
    assert retrying['message'].startswith(f"{EXITED_MESSAGE}; retrying in ")
    assert (succeeded['eventId'], succeeded['attempts']) == (accepted.id, 2)
    assert replacement != child
    assert engine.book.status(KEY)['deliveries'] == {'succeeded': 1, 'failed': 0, 'dropped': 0}


async def test_start_waits_until_the_child_is_ready(http_target: HttpTarget) -> None:
    # Ready means imported and answering: the first attempts do not wait for a child's imports.
    async with engine_with(webhook(f'{http_target.url}/hook')) as engine:
        [child] = pids(engine)
        modules = pathlib.Path(f'/proc/{child}/maps').read_text()
        assert '_http_parser' in modules  # aiohttp's C parser: loaded before start() returned
        await engine.ingest('repo_push', sample_payload('repo_push', 'acme/web'))
        await last_delivery(engine, 'Succeeded')


async def test_a_child_runs_at_a_lower_cpu_priority_than_its_parent(http_target: HttpTarget) -> None:
    """Sending is background work: under contention the parent, which answers registries, runs first."""
    async with engine_with(webhook(f'{http_target.url}/hook')) as engine:
        [child] = pids(engine)
        parent_niceness = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, child) == min(parent_niceness + NICENESS, 19)
        assert NICENESS == 15
        await engine.ingest('repo_push', sample_payload('repo_push', 'acme/web'))
        await last_delivery(engine, 'Succeeded')


async def test_a_child_that_cannot_start_is_a_clear_error(tmp_path: pathlib.Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # A broken installation, as the children see it: an aiohttp that fails to import. Both start at
    # once; the error is the first one's, and none is left running.
    (tmp_path / 'aiohttp').mkdir()
    (tmp_path / 'aiohttp' / '__init__.py').write_text('raise ImportError("broken on purpose")\n')
    monkeypatch.setenv('PYTHONPATH', str(tmp_path))
    processes = DeliveryProcesses(2, child_settings(MethodSettings(), None, connections=4))
    with pytest.raises(DeliveryProcessError) as error:
        await processes.start()
    assert str(error.value) == "delivery process 0 did not start (exit code 1; see its log)"
    assert processes.pids == []
    await processes.stop()


async def test_the_ssrf_guard_holds_in_a_delivery_process(http_target: HttpTarget) -> None:
    async with engine_with(webhook(f'http://127.0.0.1:{http_target.port}/hook'),
                           target_policy=TargetPolicy.parse('')) as engine:
        await engine.ingest('repo_push', sample_payload('repo_push', 'acme/web'))
        failed = await last_delivery(engine, 'Failed')
    assert failed['message'] == ("target refused: 127.0.0.1 is a loopback address "
                                 "(an operator may allow it with --allow-targets)")
    assert failed['attempts'] == 1
    assert http_target.requests == []


async def test_quay_notifications_stay_in_the_operator_process() -> None:
    # The inbox is this process's: a child could not write to it.
    spec = {'repository': 'acme/web', 'event': 'repo_push', 'method': 'quay_notification',
            'config': {'target': {'kind': 'team', 'name': 'owners'}}}
    async with engine_with(spec) as engine:
        await engine.ingest('repo_push', sample_payload('repo_push', 'acme/web'))
        await last_delivery(engine, 'Succeeded')
        [entry] = engine.inbox.latest('team', 'owners')
    assert (entry.event, entry.repository, entry.notification) == ('repo_push', 'acme/web', 'team-a/hook')


async def test_no_secret_reaches_a_delivery_process_command_line(http_target: HttpTarget) -> None:
    async with engine_with(webhook(f'http://user:s3cret-password@127.0.0.1:{http_target.port}/hook')) as engine:
        [child] = pids(engine)
        await engine.ingest('repo_push', sample_payload('repo_push', 'acme/web'))
        await last_delivery(engine, 'Succeeded')
        command = pathlib.Path(f'/proc/{child}/cmdline').read_bytes().split(b'\0')[:-1]
    assert command[:3] == [sys.executable.encode(), b'-m', b'reponotify.delivery_processes']
    # The socket's descriptor and the event loop to run, nothing else.
    assert len(command) == 5 and command[3].isdigit() and command[4] == b'asyncio'
    [request] = http_target.on('/hook')
    assert request.headers['Authorization'] == 'Basic dXNlcjpzM2NyZXQtcGFzc3dvcmQ='


async def test_a_graceful_stop_waits_for_attempts_in_a_delivery_process(http_target: HttpTarget,
                                                                         tmp_path: pathlib.Path) -> None:
    http_target.script('/slow', Reply(delay=0.5))
    database = tmp_path / 'outbox.sqlite3'
    async with engine_with(webhook(f'{http_target.url}/slow'), outbox=database, grace=10) as engine:
        await engine.ingest('repo_push', sample_payload('repo_push', 'acme/web'))
        await http_target.wait_for(1, '/slow')
    # stop() returned: the attempt finished within the grace period and its outcome is recorded.
    assert engine.book.status(KEY)['deliveries'] == {'succeeded': 1, 'failed': 0, 'dropped': 0}
    reopened = Outbox(database)
    assert await reopened.open() == 0
    await reopened.close()


async def test_an_attempt_cut_short_by_the_stop_stays_in_the_outbox(http_target: HttpTarget,
                                                                    tmp_path: pathlib.Path) -> None:
    http_target.script('/slow', Reply(delay=5))
    database = tmp_path / 'outbox.sqlite3'
    async with engine_with(webhook(f'{http_target.url}/slow'), outbox=database, grace=0.2) as engine:
        await engine.ingest('repo_push', sample_payload('repo_push', 'acme/web'))
        await http_target.wait_for(1, '/slow')
        [child] = pids(engine)
    assert not pathlib.Path(f'/proc/{child}').exists() or _zombie(child)  # the child is gone too
    reopened = Outbox(database)
    assert await reopened.open() == 1
    delivery = await reopened.take()
    assert (delivery.key, delivery.attempts) == (KEY, 0)
    await reopened.close()


def _zombie(pid: int) -> bool:
    return pathlib.Path(f'/proc/{pid}/stat').read_text().split()[2] == 'Z'


async def test_a_deleted_notification_is_forgotten_by_the_delivery_processes(http_target: HttpTarget) -> None:
    async with engine_with(webhook(f'{http_target.url}/hook')) as engine:
        await engine.ingest('repo_push', sample_payload('repo_push', 'acme/web'))
        await last_delivery(engine, 'Succeeded')
        processes = engine.dispatcher.processes
        assert processes is not None and processes.holds(KEY)
        engine.remove_notification(KEY)
        assert not processes.holds(KEY)


def test_an_event_crosses_to_a_delivery_process_unchanged() -> None:
    """What the parent sends of an event (as pickled on the socket) is the same event in the child, to the microsecond."""
    event = new_event('repo_push', sample_payload('repo_push', 'acme/web'))
    fields = pickle.loads(pickle.dumps(_event_fields(event), protocol=pickle.HIGHEST_PROTOCOL))
    received = event_from_json(*fields)
    assert received == event
    assert received.received_at.utcoffset() == datetime.timedelta(0)
    assert received.payload_json == event.payload_json


# -- how many: --delivery-processes auto -----------------------------------------------------------

def cgroup_tree(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    """A cgroup file tree as a container sees it under /sys/fs/cgroup."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(('files', 'quota'), [
    ({'cpu.max': '150000 100000\n'}, 1.5),  # cgroup v2, limits.cpu: 1500m
    ({'cpu.max': '50000 100000\n'}, 0.5),
    ({'cpu.max': 'max 100000\n'}, None),  # v2 without a limit
    ({'cpu.max': 'max 100000\n', 'cpu/cpu.cfs_quota_us': '100000\n', 'cpu/cpu.cfs_period_us': '100000\n'}, None),
    ({'cpu/cpu.cfs_quota_us': '200000\n', 'cpu/cpu.cfs_period_us': '100000\n'}, 2.0),  # cgroup v1
    ({'cpu/cpu.cfs_quota_us': '-1\n', 'cpu/cpu.cfs_period_us': '100000\n'}, None),  # v1 without a limit
    ({'cpu.max': 'lots 100000\n'}, None),  # unreadable: as if there were none
    ({'cpu.max': '100000 0\n'}, None),
    ({}, None),  # no cgroup filesystem at all
], ids=['v2-1.5', 'v2-0.5', 'v2-max', 'v2-first', 'v1-2', 'v1-none', 'garbage', 'zero-period', 'none'])
def test_the_cgroup_cpu_quota_is_read_from_v2_else_v1(tmp_path: pathlib.Path, files: dict[str, str],
                                                       quota: float | None) -> None:
    assert cgroup_cpu_quota(cgroup_tree(tmp_path, files)) == quota


def test_available_cpus_are_the_affinity_lowered_by_the_quota_rounded_up(tmp_path: pathlib.Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(cgroup_tree(tmp_path / 'none', {})) == affinity
    assert available_cpus(cgroup_tree(tmp_path / 'half', {'cpu.max': '50000 100000'})) == 1  # never 0
    assert available_cpus(cgroup_tree(tmp_path / 'one-and-a-half', {'cpu.max': '150000 100000'})) == min(affinity, 2)
    assert available_cpus(cgroup_tree(tmp_path / 'many', {'cpu.max': '6400000 100000'})) == affinity


@pytest.mark.parametrize(('value', 'cpus', 'count'), [
    ('auto', 1, 0),  # one CPU: a child would only add the cost of talking to it
    ('auto', 2, 2),
    ('auto', 3, 3),
    ('auto', 64, AUTO_LIMIT),
    (0, 8, 0),  # a number is taken as it is
    (7, 2, 7),
])
def test_auto_is_one_delivery_process_per_cpu_within_limits(value: int | str, cpus: int, count: int,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level('INFO', logger='reponotify.delivery_processes')
    assert process_count(value, cpus) == count
    if value == 'auto':
        assert caplog.messages == [f"Delivery processes: {count} (auto, {cpus} CPU{'' if cpus == 1 else 's'} "
                                   "available)"]
    else:
        assert caplog.messages == []
