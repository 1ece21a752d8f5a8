"""
Graceful shutdown and unusable state, for real: a receiver on a port, a hanging
target, and the outbox file on disk.
"""
import asyncio
import pathlib
import subprocess
import sys

import aiohttp
import pytest

from conftest import HttpTarget, Reply
from reponotify.config import ReceiverSettings, Settings
from reponotify.dispatcher import DispatcherSettings
from reponotify.engine import Engine, EngineSettings
from reponotify.events import sample_payload
from reponotify.notifications import NotificationKey, compile_notification
from reponotify.outbox import Outbox
from reponotify.receiver import make_app, serve, shut_down
from reponotify.standalone import ManifestError, ManifestSecrets, run_standalone
from reponotify.status import ReadyCondition

KEY = NotificationKey('team-a', 'hook')


class NullSink:
    async def write(self, *_: object) -> None: ...


async def test_sigterm_answers_503_lets_attempts_finish_within_the_grace_and_keeps_the_rest(
        http_target: HttpTarget, tmp_path: pathlib.Path, unused_tcp_port: int) -> None:
    http_target.script('/hook', Reply(delay=5))  # an attempt that outlives the grace period
    database = tmp_path / 'outbox.sqlite3'
    engine = Engine(EngineSettings(dispatcher=DispatcherSettings(workers=4)), outbox_path=database)
    spec = {'repository': 'acme/web', 'event': 'repo_push', 'method': 'webhook',
            'config': {'url': f'{http_target.url}/hook'}}
    engine.put_notification(await compile_notification(KEY, spec, ManifestSecrets({})))
    engine.book.set_spec_condition(KEY, ReadyCondition('True', 'Accepted', 'routed'))
    await engine.start(NullSink())
    app = make_app(engine)
    runner = await serve(app, '127.0.0.1', unused_tcp_port)
    url = f'http://127.0.0.1:{unused_tcp_port}/v1/events/repo_push'
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=sample_payload('repo_push', 'acme/web')) as response:
            assert response.status == 202
        await http_target.wait_for(1, '/hook')  # the attempt is in flight

        stopping = asyncio.create_task(shut_down(app, runner, grace=0.3))
        await asyncio.sleep(0.05)
        async with session.post(url, json=sample_payload('repo_push', 'acme/web')) as response:
            assert response.status == 503
            assert response.headers['Retry-After'] == '5'
            assert await response.json() == {'error': "shutting down: not accepting events; retry shortly"}
        await asyncio.wait_for(stopping, 10)  # the grace (0.3 s) bounds the wait, not the 5 s target

    # The attempt was cut short: its outcome is unknown, so the delivery is still queued for the next start.
    reopened = Outbox(database)
    assert await reopened.open() == 1
    delivery = await reopened.take()
    assert (delivery.key, delivery.attempts, delivery.event.payload['repository']) == (KEY, 0, 'acme/web')
    await reopened.close()
    assert engine.book.status(KEY)['deliveries'] == {'succeeded': 0, 'failed': 0, 'dropped': 0}


@pytest.mark.parametrize('name', ['outbox.sqlite3', 'status.json'])
async def test_unreadable_state_is_a_clear_error_not_an_empty_queue(tmp_path: pathlib.Path, name: str,
                                                                    unused_tcp_port: int) -> None:
    (tmp_path / 'manifests').mkdir()
    state = tmp_path / 'state'
    state.mkdir()
    (state / name).write_bytes(b'this is not what reponotify wrote\x00\xff' * 100)
    settings = Settings(receiver=ReceiverSettings(host='127.0.0.1', port=unused_tcp_port), state_dir=state)
    with pytest.raises(ManifestError) as info:
        await run_standalone(settings, tmp_path / 'manifests')
    message = str(info.value)
    assert message.startswith(f"{state / name}: ")
    assert 'move' in message and 'away' in message  # it says what to do
    assert (state / name).read_bytes().startswith(b'this is not what reponotify wrote')  # and keeps the file


def test_the_command_exits_with_the_reason(tmp_path: pathlib.Path) -> None:
    (tmp_path / 'manifests').mkdir()
    (tmp_path / 'state').mkdir()
    (tmp_path / 'state' / 'outbox.sqlite3').write_bytes(b'garbage' * 1000)
    result = subprocess.run([sys.executable, '-m', 'reponotify', 'standalone', '--manifests',
                             str(tmp_path / 'manifests'), '--state-dir', str(tmp_path / 'state'), '--port', '0'],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"Error: {tmp_path / 'state' / 'outbox.sqlite3'}: cannot use the outbox database" in result.stderr
