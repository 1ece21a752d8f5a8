"""
Standalone mode: a folder of YAML served by ``run_standalone`` on a real port, delivering to a real target.
"""
import asyncio
import base64
import contextlib
import gc
import json
import pathlib
import textwrap
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from conftest import Reply, eventually
from reponotify.config import ReceiverSettings, Settings
from reponotify.dispatcher import DispatcherSettings
from reponotify.engine import EngineSettings
from reponotify.events import sample_payload
from reponotify.standalone import (
    STATUS_FILE,
    ManifestError,
    load_manifests,
    run_standalone,
)

FAST = (0.01, 0.01, 0.01, 0.01)
UNAUTHORIZED = "missing or wrong credentials (Authorization: Bearer <token>, or X-Signature: sha256=<hmac>)"



@contextlib.asynccontextmanager
async def standalone(folder: pathlib.Path, state_dir: pathlib.Path, port: int, *, token: str | None = None,
                     schedule: tuple[float, ...] = FAST) -> AsyncIterator[str]:
    settings = Settings(
        receiver=ReceiverSettings(host='127.0.0.1', port=port, token=token),
        engine=EngineSettings(dispatcher=DispatcherSettings(workers=4, retry_schedule=schedule), status_interval=0.0),
        state_dir=state_dir,
    )
    stop, started = asyncio.Event(), asyncio.Event()
    service = asyncio.create_task(run_standalone(settings, folder, stop=stop, started=started))
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait([service, waiter], timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if service.done():
        waiter.cancel()
        service.result()  # raises why it could not start
    assert started.is_set(), "standalone mode did not start"
    try:
        yield f'http://127.0.0.1:{port}'
    finally:
        stop.set()
        await service


def write(folder: pathlib.Path, name: str, text: str) -> pathlib.Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def notification(name: str, event: str, method: str, config: str, extra: str = '') -> str:
    return textwrap.dedent(f"""\
        apiVersion: reponotify.dev/v1alpha1
        kind: RepositoryNotification
        metadata: {{name: {name}, namespace: demo}}
        spec:
          repository: acme/web
          event: {event}
          method: {method}
          config: {config}
        """) + extra


async def get_json(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, await response.json()


async def post_json(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body, headers=headers) as response:
        return response.status, await response.json()


def by_name(listing: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item['name']: item for item in listing['items']}


def ready_of(item: dict[str, Any]) -> tuple[str, str, str]:
    condition = item['status']['conditions'][0]
    return condition['status'], condition['reason'], condition['message']


@pytest.fixture
def folder(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / 'manifests'
    path.mkdir()
    return path


async def test_folder_is_routed_with_secrets_and_statuses_are_served(
        http_target, folder: pathlib.Path, tmp_path: pathlib.Path, unused_tcp_port: int) -> None:
    hook_url = f'{http_target.url}/hooks/ci'
    slack_url = f'{http_target.url}/services/T0/B0/TOKEN'
    write(folder, 'secrets.yaml', f"""\
        apiVersion: v1
        kind: Secret
        metadata: {{name: hook, namespace: demo}}
        data:
          url: {base64.b64encode(hook_url.encode()).decode()}
        ---
        apiVersion: v1
        kind: Secret
        metadata: {{name: slack, namespace: demo}}
        stringData:
          url: {slack_url}
        """)
    write(folder, 'notifications.yml', '---\n'.join([
        notification('to-ci', 'repo_push', 'webhook', '{urlFrom: {secretKeyRef: {name: hook, key: url}}}'),
        notification('to-slack', 'repo_push', 'slack', '{urlFrom: {secretKeyRef: {name: slack, key: url}}}'),
        notification('no-secret', 'repo_push', 'webhook', '{urlFrom: {secretKeyRef: {name: missing, key: url}}}'),
        notification('no-key', 'repo_push', 'webhook', '{urlFrom: {secretKeyRef: {name: hook, key: nope}}}'),
        notification('paused', 'repo_push', 'webhook', f'{{url: "{hook_url}"}}', '  suspend: true\n'),
        notification('bad-template', 'repo_push', 'webhook', f'{{url: "{hook_url}", template: "{{}}x"}}'),
    ]))
    write(folder, 'unrelated.yaml', "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: b}\n")
    (folder / 'notes.txt').write_text('not a manifest: ignored')
    state_dir = tmp_path / 'state'

    async with standalone(folder, state_dir, unused_tcp_port) as base:
        status, listing = await get_json(f'{base}/v1/notifications')
        assert status == 200
        items = by_name(listing)
        assert sorted(items) == ['bad-template', 'no-key', 'no-secret', 'paused', 'to-ci', 'to-slack']
        assert ready_of(items['to-ci']) == ('True', 'Accepted', 'Routing repo_push events of acme/web to webhook')
        assert ready_of(items['to-slack']) == ('True', 'Accepted', 'Routing repo_push events of acme/web to slack')
        assert ready_of(items['no-secret']) == ('False', 'SecretNotFound', 'Secret demo/missing not found')
        assert ready_of(items['no-key']) == ('False', 'SecretNotFound', "Secret demo/hook has no key 'nope'")
        assert ready_of(items['paused']) == ('False', 'Suspended', 'spec.suspend is true')
        assert ready_of(items['bad-template']) == (
            'False', 'InvalidSpec',
            'spec.config.template: template is not valid JSON: Extra data: line 1 column 3 (char 2)')
        assert {k: items['to-ci'][k] for k in ('namespace', 'repository', 'event', 'method', 'title')} == {
            'namespace': 'demo', 'repository': 'acme/web', 'event': 'repo_push', 'method': 'webhook', 'title': None}

        payload = sample_payload('repo_push', 'acme/web')
        status, accepted = await post_json(f'{base}/v1/events/repo_push', payload)
        assert (status, accepted['matched']) == (202, 2)
        [ci] = await http_target.wait_for(1, '/hooks/ci')
        [slack] = await http_target.wait_for(1, '/services/T0/B0/TOKEN')
        assert ci.body == json.dumps(payload).encode()
        assert slack.json()['text'] == 'Repository acme/web updated'

        async def delivered() -> dict[str, Any] | None:
            items = by_name((await get_json(f'{base}/v1/notifications'))[1])
            done = all((items[name]['status']['lastDelivery'] or {}).get('outcome') == 'Succeeded'
                       for name in ('to-ci', 'to-slack'))
            return items if done else None
        items = await eventually(delivered, 'both deliveries to succeed')
        last = items['to-ci']['status']['lastDelivery']
        assert (last['eventId'], last['attempts'], last['code']) == (accepted['id'], 1, 200)

        def saved() -> dict[str, Any] | None:
            path = state_dir / STATUS_FILE
            statuses = json.loads(path.read_text()) if path.exists() else {}
            entry = statuses.get('demo/to-ci', {})
            return statuses if (entry.get('lastDelivery') or {}).get('outcome') == 'Succeeded' else None
        statuses = await eventually(saved, 'status.json to hold the delivery')
        assert statuses['demo/to-ci']['lastDelivery'] == last
        assert statuses['demo/to-ci']['deliveries'] == {'succeeded': 1, 'failed': 0, 'dropped': 0}
        assert statuses['demo/no-secret']['conditions'][0]['reason'] == 'SecretNotFound'
        assert 'TOKEN' not in (state_dir / STATUS_FILE).read_text()
    assert len(http_target.requests) == 2  # suspended and broken notifications got nothing


async def test_start_up_objects_are_left_out_of_later_garbage_collections(
        http_target, folder: pathlib.Path, tmp_path: pathlib.Path, unused_tcp_port: int) -> None:
    """Once serving, what start-up made is frozen (gc.freeze): a full collection no longer walks it."""
    gc.unfreeze()  # whatever an earlier test froze
    assert gc.get_freeze_count() == 0
    write(folder, 'hook.yaml', notification('hook', 'repo_push', 'webhook', f'{{url: "{http_target.url}/hook"}}'))
    try:
        async with standalone(folder, tmp_path / 'state', unused_tcp_port):
            # Imports alone leave tens of thousands of objects alive.
            assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()


async def test_statuses_survive_a_restart(http_target, folder: pathlib.Path, tmp_path: pathlib.Path,
                                          unused_tcp_port: int) -> None:
    http_target.script('/broken', Reply(status=500))
    write(folder, 'broken.yaml', notification('broken', 'repo_push', 'webhook', f'{{url: "{http_target.url}/broken"}}'))
    state_dir = tmp_path / 'state'
    payload = sample_payload('repo_push', 'acme/web')

    async with standalone(folder, state_dir, unused_tcp_port) as base:
        status, accepted = await post_json(f'{base}/v1/events/repo_push', payload)
        assert (status, accepted['matched']) == (202, 1)

        async def failed() -> dict[str, Any] | None:
            item = by_name((await get_json(f'{base}/v1/notifications'))[1])['broken']
            return item if (item['status']['lastDelivery'] or {}).get('outcome') == 'Failed' else None
        item = await eventually(failed, 'the delivery to fail')
        assert item['status']['numberOfFailures'] == 3
        assert ready_of(item)[:2] == ('False', 'Disabled')
    saved = json.loads((state_dir / STATUS_FILE).read_text())['demo/broken']
    assert saved['numberOfFailures'] == 3
    assert len(http_target.on('/broken')) == 3

    async with standalone(folder, state_dir, unused_tcp_port) as base:
        item = by_name((await get_json(f'{base}/v1/notifications'))[1])['broken']
        assert item['status']['numberOfFailures'] == 3  # seeded from status.json
        assert ready_of(item)[:2] == ('False', 'Disabled')
        assert item['status']['deliveries'] == {'succeeded': 0, 'failed': 1, 'dropped': 0}
        assert item['status']['lastDelivery'] == saved['lastDelivery']

        status, accepted = await post_json(f'{base}/v1/events/repo_push', payload)
        assert (status, accepted['matched']) == (202, 1)

        async def dropped() -> dict[str, Any] | None:
            item = by_name((await get_json(f'{base}/v1/notifications'))[1])['broken']
            last = item['status']['lastDelivery'] or {}
            return item if last.get('eventId') == accepted['id'] and last.get('outcome') == 'Dropped' else None
        item = await eventually(dropped, 'the new event to be dropped')
        assert item['status']['deliveries'] == {'succeeded': 0, 'failed': 1, 'dropped': 1}
    assert len(http_target.on('/broken')) == 3  # still disabled after the restart: nothing more was sent


async def test_token_guards_events_in_standalone_mode(folder: pathlib.Path, tmp_path: pathlib.Path,
                                                      unused_tcp_port: int) -> None:
    write(folder, 'n.yaml', notification('n', 'repo_push', 'webhook', '{url: "http://127.0.0.1:9/x"}'))
    async with standalone(folder, tmp_path / 'state', unused_tcp_port, token='tok') as base:
        payload = sample_payload('repo_push', 'acme/web')
        assert await post_json(f'{base}/v1/events/repo_push', payload) == (
            401, {'error': UNAUTHORIZED})
        status, body = await post_json(f'{base}/v1/events/repo_push', payload, {'Authorization': 'Bearer tok'})
        assert (status, body['matched']) == (202, 1)
        # Statuses are guarded as the buttons are.
        assert await get_json(f'{base}/v1/notifications') == (401, {'error': UNAUTHORIZED})
        status, listing = await get_json(f'{base}/v1/notifications', {'Authorization': 'Bearer tok'})
        assert status == 200 and [item['name'] for item in listing['items']] == ['n']


# -- manifests that cannot be loaded ----------------------------------------------------------------

async def test_invalid_yaml_is_a_manifest_error_naming_the_file(folder: pathlib.Path, tmp_path: pathlib.Path,
                                                                unused_tcp_port: int) -> None:
    write(folder, 'a-good.yaml', notification('n', 'repo_push', 'webhook', '{url: "http://127.0.0.1:9/x"}'))
    broken = write(folder, 'broken.yaml', "apiVersion: v1\nkind: [Secret\n")
    with pytest.raises(ManifestError) as caught:
        load_manifests(folder)
    assert str(caught.value).startswith(f"{broken}: not valid YAML: ")
    assert 'line 3' in str(caught.value)  # the parser's position is kept

    settings = Settings(receiver=ReceiverSettings(host='127.0.0.1', port=unused_tcp_port),
                        state_dir=tmp_path / 'state')
    with pytest.raises(ManifestError) as caught:
        await run_standalone(settings, folder, stop=asyncio.Event())
    assert str(caught.value).startswith(f"{broken}: not valid YAML: ")


@pytest.mark.parametrize('text, message', [
    ("apiVersion: reponotify.dev/v1alpha1\nkind: RepositoryNotification\nmetadata: {namespace: demo}\nspec: {}\n",
     "a RepositoryNotification has no metadata.name"),
    ("apiVersion: reponotify.dev/v1alpha1\nkind: RepositoryNotification\nmetadata: {name: n, namespace: demo}\n"
     "spec: {}\n---\n" * 2,
     "RepositoryNotification demo/n is defined twice"),
    ("apiVersion: v1\nkind: Secret\nmetadata: {name: s, namespace: demo}\ndata: {url: 'not base64!'}\n",
     "Secret s key 'url' is not base64"),
])
def test_unusable_manifests_are_errors_naming_the_file(folder: pathlib.Path, text: str, message: str) -> None:
    path = write(folder, 'bad.yaml', text)
    with pytest.raises(ManifestError) as caught:
        load_manifests(folder)
    assert str(caught.value) == f"{path}: {message}"


def test_a_missing_folder_is_a_manifest_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ManifestError) as caught:
        load_manifests(tmp_path / 'nope')
    assert str(caught.value) == f"{tmp_path / 'nope'} is not a folder"


def test_secret_data_and_string_data_are_decoded(folder: pathlib.Path) -> None:
    write(folder, 's.yaml', f"""\
        apiVersion: v1
        kind: Secret
        metadata: {{name: s}}
        data: {{a: {base64.b64encode('ünï'.encode()).decode()}, both: {base64.b64encode(b'from-data').decode()}}}
        stringData: {{b: plain, both: from-stringData}}
        """)
    manifests = load_manifests(folder)
    assert manifests.secrets == {('default', 's'): {'a': 'ünï', 'b': 'plain', 'both': 'from-stringData'}}


@pytest.mark.parametrize(('document', 'message'), [
    ("apiVersion: reponotify.dev/v1\nkind: RepositoryNotification\nmetadata: {name: a}\nspec: {}\n",
     "a RepositoryNotification must have apiVersion reponotify.dev/v1alpha1, not 'reponotify.dev/v1'"),
    ("apiVersion: reponotify.dev/v1alpha1\nkind: RepositoryNotification\nmetadata: [a]\nspec: {}\n",
     "metadata must be a mapping with a name"),
    ("apiVersion: v1\nkind: Secret\nstringData: {url: x}\n",
     "a Secret has no metadata.name"),
])
def test_manifest_mistakes_are_reported_not_ignored(tmp_path: pathlib.Path, document: str, message: str) -> None:
    from reponotify.standalone import ManifestError, load_manifests
    (tmp_path / 'bad.yaml').write_text(document)
    with pytest.raises(ManifestError) as info:
        load_manifests(tmp_path)
    assert str(info.value) == f"{tmp_path / 'bad.yaml'}: {message}"


@pytest.mark.parametrize(('spec_update', 'message'), [
    ({'suspend': 'yes'}, "spec.suspend: Input should be a valid boolean"),
    ({'event': 'repo_image_expiry', 'eventConfig': {'days': True}}, "spec.eventConfig.days: Input should be a valid integer"),
])
def test_standalone_is_as_strict_as_the_crd(spec_update: dict[str, object], message: str) -> None:
    from reponotify.notifications import InvalidSpec, parse_spec
    spec = {'repository': 'acme/web', 'event': 'repo_push', 'method': 'webhook',
            'config': {'url': 'https://x.example.com'}, **spec_update}
    with pytest.raises(InvalidSpec) as info:
        parse_spec(spec)
    assert str(info.value) == message


@pytest.mark.parametrize('spec, message', [
    ('[1, 2]', "spec: Input should be a valid dictionary or instance of RepositoryNotificationSpec"),
    ('just text', "spec: Input should be a valid dictionary or instance of RepositoryNotificationSpec"),
])
async def test_a_spec_that_is_not_a_mapping_is_an_invalid_spec_not_a_crash(folder: pathlib.Path, spec: str,
                                                                            message: str) -> None:
    """It raised AttributeError and stopped the start; the other notifications must still be routed."""
    from reponotify.engine import Engine
    from reponotify.notifications import NotificationKey
    from reponotify.standalone import load_into

    write(folder, 'bad.yaml', f"""\
        apiVersion: reponotify.dev/v1alpha1
        kind: RepositoryNotification
        metadata: {{name: bad, namespace: team-a}}
        spec: {spec}
        """)
    write(folder, 'good.yaml', """\
        apiVersion: reponotify.dev/v1alpha1
        kind: RepositoryNotification
        metadata: {name: good, namespace: team-a}
        spec: {repository: acme/web, event: repo_push, method: webhook, config: {url: "https://ci.example.com/hook"}}
        """)
    engine = Engine(EngineSettings())
    await load_into(engine, load_manifests(folder), {})
    [condition] = engine.book.status(NotificationKey('team-a', 'bad'))['conditions']
    assert (condition['status'], condition['reason'], condition['message']) == ('False', 'InvalidSpec', message)
    assert engine.routing.get(NotificationKey('team-a', 'good')) is not None
    assert engine.routing.get(NotificationKey('team-a', 'bad')) is None


async def test_the_listing_shows_a_spec_that_is_not_a_mapping_as_invalid(folder: pathlib.Path, tmp_path: pathlib.Path,
                                                                          unused_tcp_port: int) -> None:
    """The listing read such a spec's fields and answered 500 for every notification."""
    write(folder, 'bad.yaml', """\
        apiVersion: reponotify.dev/v1alpha1
        kind: RepositoryNotification
        metadata: {name: bad, namespace: demo}
        spec: [1, 2]
        """)
    (folder / 'good.yaml').write_text(notification('good', 'repo_push', 'webhook', '{url: "https://ci.example.com/x"}'))
    async with standalone(folder, tmp_path / 'state', unused_tcp_port) as url:
        code, listing = await get_json(f'{url}/v1/notifications')
    assert code == 200
    items = by_name(listing)
    assert {key: items['bad'][key] for key in ('repository', 'event', 'method', 'title')} == dict.fromkeys(
        ('repository', 'event', 'method', 'title'))
    assert ready_of(items['bad']) == (
        'False', 'InvalidSpec', "spec: Input should be a valid dictionary or instance of RepositoryNotificationSpec")
    assert ready_of(items['good'])[:2] == ('True', 'Accepted')
