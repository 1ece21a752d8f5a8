"""
The ``reponotify`` command, run as a real subprocess.

``standalone`` is configured only through ``REPONOTIFY_*`` environment variables; ``send``
talks to it over HTTP; ``crd`` must print the checked-in CRD byte for byte; ``demo`` runs end to end.
"""
import asyncio
import contextlib
import fcntl
import json
import math
import os
import pathlib
import signal
import socket
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import click
import pytest
from reponotify.cli import main
from reponotify.delivery_processes import cgroup_cpu_quota
from reponotify.events import sample_payload

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = pathlib.Path(sys.executable).parent / 'reponotify'
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, '-m', 'reponotify']
UNAUTHORIZED = "missing or wrong credentials (Authorization: Bearer <token>, or X-Signature: sha256=<hmac>)"
TOKEN = 'cli-test-token'


def environment(**variables: str) -> dict[str, str]:
    """The test's environment without any REPONOTIFY_* it may have, plus ``variables``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith('REPONOTIFY_')}
    env.update(variables)
    return env


async def run(*args: str, env: dict[str, str] | None = None, cwd: pathlib.Path = ROOT,
              timeout: float = 60) -> tuple[int, bytes, bytes]:
    process = await asyncio.create_subprocess_exec(
        *COMMAND, *args, env=env or environment(), cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"reponotify {' '.join(args)} did not finish within {timeout}s")
    assert process.returncode is not None
    return process.returncode, stdout, stderr


def manifests(folder: pathlib.Path, url: str) -> pathlib.Path:
    folder.mkdir()
    (folder / 'n.yaml').write_text(textwrap.dedent(f"""\
        apiVersion: reponotify.dev/v1alpha1
        kind: RepositoryNotification
        metadata: {{name: to-ci, namespace: demo}}
        spec:
          repository: acme/web
          event: repo_push
          method: webhook
          config: {{url: "{url}"}}
        """))
    return folder


@contextlib.asynccontextmanager
async def standalone_process(tmp_path: pathlib.Path, port: int, target_url: str, *, cpus: set[int] | None = None,
                             **extra: str) -> AsyncIterator[asyncio.subprocess.Process]:
    token_file = tmp_path / 'token'
    token_file.write_text(TOKEN + '\n')
    env = environment(
        REPONOTIFY_PORT=str(port),
        REPONOTIFY_MANIFESTS=str(manifests(tmp_path / 'manifests', target_url)),
        REPONOTIFY_STATE_DIR=str(tmp_path / 'state'),
        REPONOTIFY_TOKEN_FILE=str(token_file),
        **extra,
    )
    log = tmp_path / 'standalone.log'
    with log.open('wb') as output:
        process = await asyncio.create_subprocess_exec(
            *COMMAND, 'standalone', env=env, cwd=tmp_path, stdout=output, stderr=output,
            # The CPUs it may run on, as taskset would set them (None: this process's).
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus))
    try:
        await wait_until_listening(process, port, log)
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()


async def wait_until_listening(process: asyncio.subprocess.Process, port: int, log: pathlib.Path) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    async with aiohttp.ClientSession() as session:
        while True:
            if process.returncode is not None:
                pytest.fail(f"reponotify standalone exited with {process.returncode}:\n{log.read_text()}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f'http://127.0.0.1:{port}/healthz') as response:
                    if response.status == 200:
                        return
            if loop.time() > deadline:
                pytest.fail(f"reponotify standalone is not listening on {port}:\n{log.read_text()}")
            await asyncio.sleep(0.05)


async def post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body, headers=headers) as response:
        return response.status, await response.json()


async def test_standalone_is_configured_by_environment_variables(http_target, tmp_path: pathlib.Path,
                                                                 unused_tcp_port: int) -> None:
    port = unused_tcp_port
    async with standalone_process(tmp_path, port, f'{http_target.url}/hooks/ci') as process:
        url = f'http://127.0.0.1:{port}/v1/events/repo_push'
        payload = sample_payload('repo_push', 'acme/web')
        assert await post(url, payload) == (401, {'error': UNAUTHORIZED})
        assert await post(url, payload, {'Authorization': 'Bearer wrong'}) == (401, {'error': UNAUTHORIZED})
        status, body = await post(url, payload, {'Authorization': f'Bearer {TOKEN}'})
        assert (status, body['matched']) == (202, 1)
        async with aiohttp.ClientSession() as session, \
                session.get(f'http://127.0.0.1:{port}/v1/notifications',
                            headers={'Authorization': f'Bearer {TOKEN}'}) as response:
            listing = await response.json()
        assert [(item['namespace'], item['name']) for item in listing['items']] == [('demo', 'to-ci')]
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0  # SIGTERM stops it gracefully
    statuses = json.loads((tmp_path / 'state' / 'status.json').read_text())  # REPONOTIFY_STATE_DIR was used
    assert statuses['demo/to-ci']['conditions'][0]['reason'] == 'Accepted'


async def test_send_posts_to_a_running_receiver(http_target, tmp_path: pathlib.Path, unused_tcp_port: int) -> None:
    port = unused_tcp_port
    extra = {'REPONOTIFY_ALLOW_TARGETS': '127.0.0.1/32'}  # the target is on loopback, refused by default
    async with standalone_process(tmp_path, port, f'{http_target.url}/hooks/ci', **extra):
        base = f'http://127.0.0.1:{port}'
        token_file = str(tmp_path / 'token')

        code, stdout, stderr = await run('send', 'repo_push', '--url', base, '--repository', 'acme/web',
                                         '--token-file', token_file)
        assert code == 0, stderr
        answer = json.loads(stdout)
        assert sorted(answer) == ['id', 'matched'] and answer['matched'] == 1
        [received] = await http_target.wait_for(1, '/hooks/ci')
        assert received.json() == sample_payload('repo_push', 'acme/web')

        # configured through environment variables, with a payload file and an idempotency key
        payload_file = tmp_path / 'payload.json'
        payload = sample_payload('repo_push', 'acme/web') | {'updated_tags': ['v2']}
        payload_file.write_text(json.dumps(payload))
        env = environment(REPONOTIFY_URL=base, REPONOTIFY_TOKEN_FILE=token_file, REPONOTIFY_PAYLOAD=str(payload_file),
                          REPONOTIFY_IDEMPOTENCY_KEY='release-v2')
        code, stdout, stderr = await run('send', 'repo_push', env=env)
        assert code == 0, stderr
        assert json.loads(stdout)['matched'] == 1
        requests = await http_target.wait_for(2, '/hooks/ci')
        assert requests[1].json() == payload
        # the receiver remembers the key that came from REPONOTIFY_IDEMPOTENCY_KEY: the same key is accepted once
        status, replay = await post(f'{base}/v1/events/repo_push', payload,
                                    {'Authorization': f'Bearer {TOKEN}', 'Idempotency-Key': 'release-v2'})
        assert (status, replay) == (202, json.loads(stdout))

        code, stdout, _ = await run('send', 'repo_push', '--url', base, '--repository', 'acme/web')
        assert (code, json.loads(stdout)) == (1, {'error': UNAUTHORIZED})
    assert len(http_target.on('/hooks/ci')) == 2


async def test_send_to_nothing_fails_clearly(unused_tcp_port: int) -> None:
    code, stdout, stderr = await run('send', 'repo_push', '--url', f'http://127.0.0.1:{unused_tcp_port}')
    assert code == 1
    assert stdout == b''
    assert stderr.decode().startswith(f'Error: could not reach http://127.0.0.1:{unused_tcp_port}: ')


@pytest.mark.parametrize('arguments, message', [
    (['--idempotency-key', 'cl\u00e9'], "Error: --idempotency-key must be printable ASCII"),
    (['--url', 'http://[::1'], "Error: --url 'http://[::1' is not a usable URL"),
    (['--token-file', 'TOKEN'], "Error: --token-file holds characters that cannot go in a header (not ASCII)"),
])
async def test_send_refuses_unusable_values_with_one_line(tmp_path: pathlib.Path, arguments: list[str],
                                                           message: str) -> None:
    """They ended in Python tracebacks (UnicodeEncodeError, httpx.InvalidURL)."""
    token = tmp_path / 'token'
    token.write_text('caf\u00e9\n')
    arguments = [str(token) if argument == 'TOKEN' else argument for argument in arguments]
    code, stdout, stderr = await run('send', 'repo_push', '--url', 'http://127.0.0.1:9', *arguments)
    assert (code, stdout, stderr.decode().splitlines()) == (1, b'', [message])


@pytest.mark.parametrize('option, value', [
    ('--read-timeout', 'nan'), ('--timeout', 'nan'), ('--shutdown-grace', 'NaN'), ('--status-interval', 'nan'),
    ('--delivery-processes', '\u00b2'),
])
async def test_a_number_option_refuses_what_is_no_number(tmp_path: pathlib.Path, option: str, value: str) -> None:
    """nan passed click's ranges (every slow body then got a 500); "\u00b2" is a digit to str.isdigit."""
    code, _, stderr = await run('standalone', '--manifests', str(tmp_path), option, value, timeout=30)
    assert code == 2
    last = stderr.decode().splitlines()[-1]
    assert last.startswith(f"Error: Invalid value for '{option}'"), last


async def test_standalone_reports_a_broken_manifest_and_exits(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / 'manifests'
    folder.mkdir()
    (folder / 'broken.yaml').write_text('kind: [Secret\n')
    env = environment(REPONOTIFY_MANIFESTS=str(folder), REPONOTIFY_STATE_DIR=str(tmp_path / 'state'),
                      REPONOTIFY_PORT='0')
    code, _, stderr = await run('standalone', env=env, timeout=30)
    assert code == 1
    assert stderr.decode().startswith(f'Error: {folder / "broken.yaml"}: not valid YAML: ')


async def test_an_unusable_state_dir_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    """It was a FileNotFoundError traceback from deep inside the outbox."""
    (tmp_path / 'a-file').write_text('')
    state = tmp_path / 'a-file' / 'state'
    env = environment(REPONOTIFY_MANIFESTS=str(tmp_path), REPONOTIFY_STATE_DIR=str(state), REPONOTIFY_PORT='0')
    code, _, stderr = await run('standalone', env=env, timeout=30)
    assert code == 2
    assert stderr.decode().splitlines()[-1] == (
        f"Error: Invalid value for '--state-dir' (env var: 'REPONOTIFY_STATE_DIR'): {state} cannot be created: "
        "Not a directory")


async def test_a_bad_delivery_process_count_is_refused(tmp_path: pathlib.Path) -> None:
    env = environment(REPONOTIFY_MANIFESTS=str(tmp_path), REPONOTIFY_DELIVERY_PROCESSES='many')
    code, _, stderr = await run('standalone', env=env, timeout=30)
    assert code == 2
    assert stderr.decode().splitlines()[-1] == (
        "Error: Invalid value for '--delivery-processes' (env var: 'REPONOTIFY_DELIVERY_PROCESSES'): "
        "'many' is not 'auto' or a number from 0 to 64")


@pytest.mark.parametrize('value', ['127.0.0.0/88', '999.0.0.0/33', '10.0.0.1:80', '-bad.example', 'hooks.exa mple'])
async def test_a_mistyped_allow_targets_entry_is_refused_not_taken_as_a_host_name(tmp_path: pathlib.Path,
                                                                                 value: str) -> None:
    """A typo in a CIDR was kept as a "host name" that matches nothing: deliveries failed, then disabled."""
    env = environment(REPONOTIFY_MANIFESTS=str(tmp_path), REPONOTIFY_ALLOW_TARGETS=f'10.0.0.0/8, {value}')
    code, _, stderr = await run('standalone', env=env, timeout=30)
    assert code == 2
    assert stderr.decode().splitlines()[-1] == (
        "Error: Invalid value for '--allow-targets' (env var: 'REPONOTIFY_ALLOW_TARGETS'): "
        f"'{value}' is neither a CIDR, an address nor a host name")


@pytest.mark.parametrize('cpu_count', [1, 2])
async def test_auto_starts_one_delivery_process_per_cpu_it_may_use(http_target, tmp_path: pathlib.Path,
                                                                   unused_tcp_port: int, cpu_count: int) -> None:
    cpus = set(sorted(os.sched_getaffinity(0))[:cpu_count])
    if len(cpus) < cpu_count:
        pytest.skip(f"this machine lets the tests use {len(cpus)} CPU(s)")
    quota = cgroup_cpu_quota()
    available = min(cpu_count, math.ceil(quota)) if quota is not None else cpu_count
    expected = 0 if available < 2 else available
    async with standalone_process(tmp_path, unused_tcp_port, f'{http_target.url}/hooks/ci', cpus=cpus,
                                  REPONOTIFY_ALLOW_TARGETS='127.0.0.0/8') as process:
        children = pathlib.Path(f'/proc/{process.pid}/task/{process.pid}/children').read_text().split()
        commands = [pathlib.Path(f'/proc/{pid}/cmdline').read_bytes().split(b'\0')[1:3] for pid in children]
        status, body = await post(f'http://127.0.0.1:{unused_tcp_port}/v1/events/repo_push',
                                  sample_payload('repo_push', 'acme/web'), {'Authorization': f'Bearer {TOKEN}'})
        assert (status, body['matched']) == (202, 1)
        await http_target.wait_for(1, '/hooks/ci')
    assert commands == [[b'-m', b'reponotify.delivery_processes']] * expected
    log = (tmp_path / 'standalone.log').read_text()
    assert f"Delivery processes: {expected} (auto, {available} CPU{'' if available == 1 else 's'} available)" in log


async def test_crd_output_is_the_checked_in_file() -> None:
    code, stdout, stderr = await run('crd')
    assert code == 0, stderr
    checked_in = (ROOT / 'crds' / 'repositorynotifications.yaml').read_bytes()
    assert stdout == checked_in, "crds/repositorynotifications.yaml drifted: regenerate it with `reponotify crd`"


@contextlib.asynccontextmanager
async def demo_port_lock(timeout: float = 120) -> AsyncIterator[None]:
    """The demo binds the fixed port 9911: test runs sharing this machine take turns."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    path = pathlib.Path(tempfile.gettempdir()) / 'reponotify-demo-9911.lock'
    with await asyncio.to_thread(path.open, 'w') as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if loop.time() > deadline:
                    pytest.fail("another test run kept the demo's port lock")
                await asyncio.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


async def test_demo_runs_end_to_end() -> None:
    async with demo_port_lock():
        with socket.socket() as probe:
            try:
                probe.bind(('127.0.0.1', 9911))
            except OSError:
                pytest.fail("127.0.0.1:9911 is in use by something else; the demo needs it")
        code, stdout, stderr = await run('demo', timeout=60)
    assert code == 0, stderr
    output = stdout.decode()
    rows = {line.split()[0]: line.split() for line in output.split('Notification status:', 1)[1].splitlines()[2:]
            if line.strip()}
    assert rows['push-to-ci'][:8] == ['push-to-ci', 'repo_push', 'True', 'Accepted', '0', '1', '0', 'Succeeded']
    assert rows['build-queued-broken'][:8] == [
        'build-queued-broken', 'build_queued', 'False', 'Disabled', '3', '0', '1', 'Failed']
    assert '  repo_push              -> 202 matched=1' in output


def test_every_option_has_a_reponotify_environment_variable() -> None:
    missing = []
    for name, command in main.commands.items():
        for param in command.params:
            if not isinstance(param, click.Option) or param.name in ('help', 'version'):
                continue
            long_name = next(opt for opt in param.opts if opt.startswith('--'))
            expected = 'REPONOTIFY_' + long_name[2:].upper().replace('-', '_')
            if param.envvar != expected:
                missing.append(f"{name} {long_name}: {param.envvar!r} instead of {expected}")
    assert missing == []
