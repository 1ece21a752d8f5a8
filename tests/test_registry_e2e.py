"""
A real Docker Distribution registry as the event source, end to end.

Debian's ``docker-registry`` (the CNCF distribution registry, 2.8) runs on a loopback port
with a temporary config whose ``notifications.endpoints`` point at the receiver's
``/v1/sources/distribution`` with a bearer token (the configuration docs/sources/distribution.md
shows). ``skopeo`` pushes an OCI image that the test writes itself (a layer, a config, a
manifest, index.json, oci-layout; nothing is downloaded) under two tags. reponotify runs in
standalone mode (``run_standalone``) from a folder with two notifications on the push event:
one for ``acme/web`` exactly and one for the glob ``acme/*``.

Between the registry and the receiver sits a small recording proxy, so that the test can
see what the registry sent and make the receiver unavailable the way it happens in life:

* tag ``v1``: the receiver accepts the event, but the proxy loses the answer and tells the
  registry 503. The registry sends the same event again (same id): the receiver answers it
  as a replay and nothing is delivered twice.
* tag ``v2``: pushed while reponotify is stopped. The registry keeps retrying (the proxy
  answers 502), and after reponotify is started again (same state folder) the event
  arrives, once.

Each notification's webhook target (a real loopback server) gets exactly one ``repo_push``
per pushed tag, with that tag and the registry's ``docker_url``, and the status served on
``/v1/notifications`` shows the deliveries.

Needs ``docker-registry`` and ``skopeo`` (``apt-get install docker-registry skopeo``, which
.ci/run does); without them the test is skipped, unless ``REPONOTIFY_REQUIRE_REGISTRY`` is set
(CI sets it), where their absence fails it.
"""
import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import os
import pathlib
import shutil
import tarfile
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from conftest import HttpTarget, eventually, serve_on_loopback

from reponotify.config import ReceiverSettings, Settings
from reponotify.dispatcher import DispatcherSettings
from reponotify.email_verification import VerificationSettings
from reponotify.engine import EngineSettings
from reponotify.standalone import run_standalone

TOKEN = 'registry-e2e-token'
REPOSITORY = 'acme/web'
TOOLS = ('docker-registry', 'skopeo')
TIMEOUT = 30.0

def _require_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not missing:
        return
    message = (f"{' and '.join(missing)} not installed (apt-get install docker-registry skopeo; "
               ".ci/run installs them)")
    if os.environ.get('REPONOTIFY_REQUIRE_REGISTRY'):
        pytest.fail(message)
    pytest.skip(message)


# -- the image: an OCI layout written here -----------------------------------------------------

def _blob(root: pathlib.Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (root / 'blobs' / 'sha256' / digest).write_bytes(data)
    return f'sha256:{digest}', len(data)


def write_oci_layout(root: pathlib.Path, tags: list[str]) -> None:
    """A one-layer image (a single text file), its config and manifest, named by ``tags`` in index.json."""
    (root / 'blobs' / 'sha256').mkdir(parents=True)
    layer_tar = io.BytesIO()
    with tarfile.open(fileobj=layer_tar, mode='w', format=tarfile.PAX_FORMAT) as tar:
        content = b'hello from reponotify\n'
        info = tarfile.TarInfo('hello.txt')
        info.size, info.mode, info.mtime = len(content), 0o644, 0
        tar.addfile(info, io.BytesIO(content))
    tar_bytes = layer_tar.getvalue()
    layer_digest, layer_size = _blob(root, gzip.compress(tar_bytes, mtime=0))
    config = {'architecture': 'amd64', 'os': 'linux', 'config': {},
              'rootfs': {'type': 'layers', 'diff_ids': ['sha256:' + hashlib.sha256(tar_bytes).hexdigest()]}}
    config_digest, config_size = _blob(root, json.dumps(config).encode())
    manifest = {
        'schemaVersion': 2,
        'mediaType': 'application/vnd.oci.image.manifest.v1+json',
        'config': {'mediaType': 'application/vnd.oci.image.config.v1+json', 'digest': config_digest,
                   'size': config_size},
        'layers': [{'mediaType': 'application/vnd.oci.image.layer.v1.tar+gzip', 'digest': layer_digest,
                    'size': layer_size}],
    }
    manifest_digest, manifest_size = _blob(root, json.dumps(manifest).encode())
    index = {'schemaVersion': 2, 'manifests': [
        {'mediaType': 'application/vnd.oci.image.manifest.v1+json', 'digest': manifest_digest,
         'size': manifest_size, 'annotations': {'org.opencontainers.image.ref.name': tag}} for tag in tags]}
    (root / 'index.json').write_text(json.dumps(index))
    (root / 'oci-layout').write_text(json.dumps({'imageLayoutVersion': '1.0.0'}))


# -- the registry ------------------------------------------------------------------------------

def registry_config(storage: pathlib.Path, port: int, endpoint: str) -> dict[str, Any]:
    """The registry's configuration: what docs/sources/distribution.md shows, with test-sized retries."""
    return {
        'version': 0.1,
        'log': {'level': 'info', 'accesslog': {'disabled': True}},
        'storage': {'filesystem': {'rootdirectory': str(storage)}},
        'http': {'addr': f'127.0.0.1:{port}'},
        'notifications': {'endpoints': [{
            'name': 'reponotify',
            'url': endpoint,
            'headers': {'Authorization': [f'Bearer {TOKEN}']},
            'timeout': '2s',
            'threshold': 1,      # back off after each failure ...
            'backoff': '100ms',  # ... for this long (production: threshold 5, backoff 10s)
        }]},
    }


@contextlib.asynccontextmanager
async def registry(tmp_path: pathlib.Path, port: int, endpoint: str) -> AsyncIterator[pathlib.Path]:
    """Run docker-registry until the block ends; yields the file its log goes to."""
    config = tmp_path / 'registry.yml'
    config.write_text(yaml.safe_dump(registry_config(tmp_path / 'storage', port, endpoint)))
    log = tmp_path / 'registry.log'
    with log.open('wb') as log_file:
        process = await asyncio.create_subprocess_exec('docker-registry', 'serve', str(config),
                                                       stdout=log_file, stderr=log_file)
        try:
            await _wait_until_up(f'http://127.0.0.1:{port}/v2/', process, log)
            yield log
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 10)
                except TimeoutError:
                    process.kill()
                    await process.wait()


async def _wait_until_up(url: str, process: asyncio.subprocess.Process, log: pathlib.Path) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    async with aiohttp.ClientSession() as session:
        while True:
            if process.returncode is not None:
                pytest.fail(f"docker-registry exited ({process.returncode}): {log.read_text()[-2000:]}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            if loop.time() > deadline:
                pytest.fail(f"docker-registry did not start: {log.read_text()[-2000:]}")
            await asyncio.sleep(0.05)


async def skopeo_push(tmp_path: pathlib.Path, layout: pathlib.Path, registry_port: int, tag: str) -> None:
    policy = tmp_path / 'policy.json'
    policy.write_text(json.dumps({'default': [{'type': 'insecureAcceptAnything'}]}))
    process = await asyncio.create_subprocess_exec(
        'skopeo', '--policy', str(policy), 'copy', '--quiet', '--dest-tls-verify=false',
        f'oci:{layout}:{tag}', f'docker://127.0.0.1:{registry_port}/{REPOSITORY}:{tag}',
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, 'HOME': str(tmp_path)})
    output, _ = await asyncio.wait_for(process.communicate(), TIMEOUT)
    assert process.returncode == 0, f"skopeo copy failed: {output.decode()}"


# -- the proxy between registry and receiver ---------------------------------------------------

class RecordingProxy:
    """
    Forwards POSTs to the receiver and records (registry event ids, receiver status, status answered).

    ``lose_answers``: for this many requests carrying a manifest push, forward the request and then
    answer 503 instead of the receiver's answer (an answer lost on the way back).
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.lose_answers = 0
        self.log: list[tuple[list[str], int | None, int]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def _forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        ids = [event.get('id') for event in json.loads(body).get('events', [])]
        tagged = any(event.get('target', {}).get('tag') for event in json.loads(body).get('events', []))
        assert self._session is not None
        try:
            async with self._session.post(self.upstream + request.path_qs, data=body,
                                          headers={k: v for k, v in request.headers.items()
                                                   if k.lower() in ('authorization', 'content-type')}) as answer:
                status, text = answer.status, await answer.text()
        except aiohttp.ClientError:
            self.log.append((ids, None, 502))
            return web.Response(status=502, text='receiver unavailable')
        if tagged and self.lose_answers > 0:
            self.lose_answers -= 1
            self.log.append((ids, status, 503))
            return web.Response(status=503, text='answer lost')
        self.log.append((ids, status, status))
        return web.Response(status=status, text=text, content_type='application/json')

    def sent(self, event_id: str) -> list[tuple[int | None, int]]:
        """Every time the registry sent this event: (receiver's status or None, status answered)."""
        return [(upstream, answered) for ids, upstream, answered in self.log if event_id in ids]

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_post('/{tail:.*}', self._forward)
        self._runner, self.port = await serve_on_loopback(app)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()


# -- reponotify in standalone mode -------------------------------------------------------------

def write_manifests(folder: pathlib.Path, target: HttpTarget) -> None:
    folder.mkdir()
    documents = [
        {'apiVersion': 'reponotify.dev/v1alpha1', 'kind': 'RepositoryNotification',
         'metadata': {'name': 'web-pushes', 'namespace': 'team-a'},
         'spec': {'repository': REPOSITORY, 'event': 'repo_push', 'method': 'webhook',
                  'config': {'url': f'{target.url}/hooks/web'}}},
        {'apiVersion': 'reponotify.dev/v1alpha1', 'kind': 'RepositoryNotification',
         'metadata': {'name': 'all-acme-pushes', 'namespace': 'team-a'},
         'spec': {'repository': 'acme/*', 'event': 'repo_push', 'method': 'webhook',
                  'config': {'url': f'{target.url}/hooks/acme'}}},
    ]
    (folder / 'notifications.yaml').write_text(yaml.safe_dump_all(documents))


class Standalone:
    """``run_standalone`` in a task, stoppable and restartable on the same port and state folder."""

    def __init__(self, settings: Settings, folder: pathlib.Path) -> None:
        self.settings, self.folder = settings, folder
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None

    async def start(self) -> None:
        self._stop, started = asyncio.Event(), asyncio.Event()
        self._task = asyncio.create_task(run_standalone(self.settings, self.folder, stop=self._stop,
                                                        started=started))
        done, _ = await asyncio.wait([self._task, asyncio.create_task(started.wait())], timeout=TIMEOUT,
                                     return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            self._task.result()  # raises what went wrong
        assert started.is_set(), "standalone mode did not start"

    async def stop(self) -> None:
        if self._task is not None and self._stop is not None:
            self._stop.set()
            await asyncio.wait_for(self._task, TIMEOUT)
            self._task = None

    @property
    def url(self) -> str:
        return f'http://127.0.0.1:{self.settings.receiver.port}'




async def statuses(receiver: Standalone) -> dict[str, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, \
            session.get(f'{receiver.url}/v1/notifications', headers={'Authorization': f'Bearer {TOKEN}'}) as response:
        assert response.status == 200
        items = (await response.json())['items']
    return {item['name']: item['status'] for item in items}


async def test_registry_pushes_become_one_repo_push_per_tag_per_notification(
        tmp_path: pathlib.Path, http_target: HttpTarget, unused_tcp_port_factory: Any) -> None:
    _require_tools()
    receiver_port, registry_port = unused_tcp_port_factory(), unused_tcp_port_factory()
    manifests = tmp_path / 'manifests'
    write_manifests(manifests, http_target)
    settings = Settings(
        receiver=ReceiverSettings(host='127.0.0.1', port=receiver_port, token=TOKEN),
        engine=EngineSettings(dispatcher=DispatcherSettings(retry_schedule=(0.05, 0.05), target_policy=None),
                              status_interval=0.0, verification=VerificationSettings(enabled=False)),
        state_dir=tmp_path / 'state', shutdown_grace=2.0)
    reponotify = Standalone(settings, manifests)
    proxy = RecordingProxy(reponotify.url)
    await proxy.start()
    layout = tmp_path / 'image'
    write_oci_layout(layout, ['v1', 'v2'])
    docker_url = f'127.0.0.1:{registry_port}/{REPOSITORY}'
    await reponotify.start()
    try:
        async with registry(tmp_path, registry_port, f'http://127.0.0.1:{proxy.port}/v1/sources/distribution') as log:
            # v1: accepted, but the answer is lost; the registry sends the same event again.
            proxy.lose_answers = 1
            await skopeo_push(tmp_path, layout, registry_port, 'v1')
            [web_v1] = await http_target.wait_for(1, '/hooks/web')
            [acme_v1] = await http_target.wait_for(1, '/hooks/acme')
            expected_v1 = {'repository': REPOSITORY, 'namespace': 'acme', 'name': 'web', 'docker_url': docker_url,
                           'homepage': f'http://127.0.0.1:{registry_port}/v2/{REPOSITORY}/tags/list',
                           'updated_tags': ['v1']}
            assert web_v1.json() == expected_v1
            assert acme_v1.json() == expected_v1
            [[v1_event]] = await eventually(
                lambda: [ids for ids, upstream, answered in proxy.log if (upstream, answered) == (202, 503)],
                "the proxy to lose the receiver's answer to the v1 push")
            await eventually(lambda: len(proxy.sent(v1_event)) >= 2, "the registry to resend the v1 event")
            assert proxy.sent(v1_event)[:2] == [(202, 503), (202, 202)]  # accepted, then answered as a replay

            # v2: pushed while reponotify is down; the registry retries until it is back.
            await reponotify.stop()
            await skopeo_push(tmp_path, layout, registry_port, 'v2')
            await eventually(lambda: any(upstream is None for _, upstream, _ in proxy.log),
                             "the registry to try the receiver while it is down")
            await eventually(lambda: 'retryingsink' in log.read_text(), "the registry to log its retries")
            await reponotify.start()
            [_, web_v2] = await http_target.wait_for(2, '/hooks/web')
            [_, acme_v2] = await http_target.wait_for(2, '/hooks/acme')
            assert web_v2.json() == acme_v2.json() == {**expected_v1, 'updated_tags': ['v2']}

            # Nothing more arrives: each tag once per notification, although the registry sent events
            # for blobs and pulls as well, and sent both tag pushes more than once.
            await asyncio.sleep(1.0)
            assert [request.json()['updated_tags'] for request in http_target.on('/hooks/web')] == [['v1'], ['v2']]
            assert [request.json()['updated_tags'] for request in http_target.on('/hooks/acme')] == [['v1'], ['v2']]
            assert len(http_target.requests) == 4
            assert proxy.log[-1][2] == 202  # the registry's queue drained

            # The status shows both deliveries to each notification.
            status = await eventually(
                lambda: _two_succeeded(reponotify), "both notifications to show two deliveries")
            for name in ('web-pushes', 'all-acme-pushes'):
                assert status[name]['deliveries'] == {'succeeded': 2, 'failed': 0, 'dropped': 0}
                assert status[name]['lastDelivery']['outcome'] == 'Succeeded'
                assert status[name]['lastDelivery']['event'] == 'repo_push'
                assert status[name]['numberOfFailures'] == 0
    finally:
        await reponotify.stop()
        await proxy.stop()


async def _two_succeeded(reponotify: Standalone) -> dict[str, dict[str, Any]] | None:
    status = await statuses(reponotify)
    done = all(status[name]['deliveries']['succeeded'] == 2 for name in ('web-pushes', 'all-acme-pushes'))
    return status if done else None
