"""
Fault tests: an event that got 202 is delivered even if the process is SIGKILLed.

A real ``reponotify standalone`` subprocess, a real webhook target on loopback
(signed deliveries, so each request carries its ``webhook-id``), and SIGKILL
at the worst moments: while events arrive and while deliveries are in flight.
After a restart on the same state folder, every accepted event reaches the
target; a ``webhook-id`` arrives twice only when its first attempt was already
under way when the process died (its outcome was unknown); rejected requests
are never delivered.
"""
import asyncio
import base64
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from conftest import HttpTarget, Reply, free_port
from reponotify.events import sample_payload

SIGNING_SECRET = 'whsec_' + base64.b64encode(b'crash-recovery-secret-32-bytes!!').decode()
REPOSITORY = 'acme/web'



def write_manifests(folder: pathlib.Path, target_url: str) -> None:
    folder.mkdir()
    (folder / 'notification.yaml').write_text(f"""
apiVersion: v1
kind: Secret
metadata: {{name: signing, namespace: team-a}}
stringData: {{secret: "{SIGNING_SECRET}"}}
---
apiVersion: reponotify.dev/v1alpha1
kind: RepositoryNotification
metadata: {{name: push-hook, namespace: team-a}}
spec:
  repository: {REPOSITORY}
  event: repo_push
  method: webhook
  config:
    url: {target_url}/hook
    signingSecretFrom: {{secretKeyRef: {{name: signing, key: secret}}}}
""")


class Service:
    """``reponotify standalone`` as a child process on a fixed port and state folder."""

    def __init__(self, manifests: pathlib.Path, state_dir: pathlib.Path, delivery_processes: int = 0) -> None:
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self._command = [sys.executable, '-m', 'reponotify', 'standalone']
        self._environment = {
            **os.environ,
            'REPONOTIFY_MANIFESTS': str(manifests), 'REPONOTIFY_STATE_DIR': str(state_dir),
            'REPONOTIFY_HOST': '127.0.0.1', 'REPONOTIFY_PORT': str(self.port),
            'REPONOTIFY_ALLOW_TARGETS': '127.0.0.1', 'REPONOTIFY_RETRY_SCHEDULE': '0.3s,0.3s,0.3s,0.3s',
            'REPONOTIFY_STATUS_INTERVAL': '0.1', 'REPONOTIFY_LOG_LEVEL': 'warning',
            'REPONOTIFY_DELIVERY_PROCESSES': str(delivery_processes),  # on the default event loop, uvloop
        }
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.process = subprocess.Popen(self._command, env=self._environment)
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert self.process.poll() is None, "reponotify exited during start-up"
                try:
                    async with session.get(f'{self.url}/healthz') as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        pytest.fail("reponotify did not start within 20 s")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)


# Both process models: attempts in the process that is killed, and in a delivery process that
# outlives it (it sees its parent's end of the socket close, and exits).
@pytest.fixture(params=[0, 1], ids=['in-process', 'delivery-process'])
def service(request: pytest.FixtureRequest, tmp_path: pathlib.Path, http_target: HttpTarget) -> Iterator[Service]:
    write_manifests(tmp_path / 'manifests', http_target.url)
    running = Service(tmp_path / 'manifests', tmp_path / 'state', delivery_processes=request.param)
    yield running
    running.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def tagged_push(number: int) -> dict[str, object]:
    payload = sample_payload('repo_push', REPOSITORY)
    payload['updated_tags'] = [f'v{number}']
    return payload


async def post(session: aiohttp.ClientSession, service: Service, body: bytes) -> int | None:
    """The status answered, or None when the connection died with the process (outcome unknown)."""
    try:
        async with session.post(f'{service.url}/v1/events/repo_push', data=body,
                                timeout=aiohttp.ClientTimeout(total=5)) as response:
            await response.read()
            return response.status
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None


def received_tags(target: HttpTarget) -> list[tuple[str, str, float]]:
    """(tag, webhook-id, arrival order) of each delivery the target received."""
    return [(request.json()['updated_tags'][0], request.headers['webhook-id'], index)
            for index, request in enumerate(target.on('/hook'))]


async def wait_until_all_received(target: HttpTarget, tags: set[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tags <= {tag for tag, _, _ in received_tags(target)}:
            return
        await asyncio.sleep(0.05)
    missing = tags - {tag for tag, _, _ in received_tags(target)}
    pytest.fail(f"accepted events never delivered: {sorted(missing)}")


async def test_sigkill_while_events_arrive_and_deliveries_are_in_flight(
        service: Service, http_target: HttpTarget, session: aiohttp.ClientSession) -> None:
    http_target.script('/hook', Reply(delay=3))  # slow target: deliveries are in flight at the kill
    await service.start()

    accepted: set[str] = set()
    unknown: set[str] = set()
    for number in range(60):
        if number == 40:
            service.kill()  # while events arrive and deliveries are under way
        status = await post(session, service, json.dumps(tagged_push(number)).encode())
        if status == 202:
            accepted.add(f'v{number}')
        elif status is None:
            unknown.add(f'v{number}')
        else:
            pytest.fail(f"unexpected answer {status}")
    # Requests the receiver rejects must never be delivered, before or after a crash.
    assert await post(session, service, b'{"repository": ') is None  # the process is dead: refused
    arrived_before_restart = len(http_target.on('/hook'))
    assert accepted == {f'v{number}' for number in range(40)}
    assert unknown == {f'v{number}' for number in range(40, 60)}
    assert arrived_before_restart < len(accepted)  # some accepted events existed only on disk at the kill

    http_target.script('/hook', Reply())  # fast again
    await service.start()
    assert await post(session, service, b'{"repository": ') == 400
    await wait_until_all_received(http_target, accepted)
    await asyncio.sleep(0.5)  # let any (wrong) extra deliveries arrive before counting

    deliveries = received_tags(http_target)
    assert {tag for tag, _, _ in deliveries} == accepted  # nothing posted after the kill was ever accepted
    by_id: dict[str, list[tuple[str, float]]] = {}
    for tag, webhook_id, order in deliveries:
        by_id.setdefault(webhook_id, []).append((tag, order))
    assert len({tag for tag, _, _ in deliveries}) == len(by_id)  # one webhook-id per delivery
    for webhook_id, arrivals in by_id.items():
        if len(arrivals) > 1:  # a repeat is only allowed when the first try was under way at the kill
            assert len(arrivals) == 2 and arrivals[0][1] < arrived_before_restart, (webhook_id, arrivals)


async def test_target_down_then_up_across_a_crash(
        service: Service, http_target: HttpTarget, session: aiohttp.ClientSession, tmp_path: pathlib.Path) -> None:
    # The target is down in the worst way: it takes requests and never answers. The process dies while
    # both attempts hang, so their outcome is unknown: no failure may be counted, and after the restart
    # both events are delivered again under the same webhook-ids.
    http_target.script('/hook', Reply(delay=3))
    await service.start()
    for number in range(2):
        assert await post(session, service, json.dumps(tagged_push(number)).encode()) == 202
    hanging = await http_target.wait_for(2, '/hook')
    service.kill()

    http_target.script('/hook', Reply())  # the target is back
    await service.start()
    await wait_until_all_received(http_target, {'v0', 'v1'})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        entry = json.loads((tmp_path / 'state' / 'status.json').read_text())['team-a/push-hook']
        if entry['deliveries']['succeeded'] == 2:
            break
        await asyncio.sleep(0.1)
    assert entry['deliveries'] == {'succeeded': 2, 'failed': 0, 'dropped': 0}
    assert entry['numberOfFailures'] == 0
    redelivered = http_target.on('/hook')[2:]
    assert sorted(request.headers['webhook-id'] for request in hanging) == sorted(
        request.headers['webhook-id'] for request in redelivered)
