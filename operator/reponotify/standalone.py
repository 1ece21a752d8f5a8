"""
Standalone mode: the same notifications, from a folder of YAML, without a cluster.

Every ``RepositoryNotification`` document in the folder's ``*.yaml``/``*.yml``
files is compiled and routed exactly as the operator would; ``<field>From``
Secret references resolve against ``kind: Secret`` documents in the same folder
(``data`` base64, or ``stringData``). Each notification's status is kept in
``<state-dir>/status.json`` and served on ``GET /v1/notifications``.
"""
import asyncio
import base64
import binascii
import dataclasses
import json
import logging
import os
import pathlib
import signal
from typing import Any

import yaml
from aiohttp import web

from reponotify.config import Settings
from reponotify.engine import Engine
from reponotify.eventloop import freeze_startup_objects
from reponotify.models import API_VERSION, KIND
from reponotify.notifications import NotificationKey, SecretNotFound, SpecError, compile_notification
from reponotify.outbox import OutboxError
from reponotify.receiver import ENGINE, UNAUTHORIZED, authorized, error, make_receiver, serve, shut_down
from reponotify.status import ReadyCondition, now_rfc3339

logger = logging.getLogger(__name__)

STATUS_FILE = 'status.json'
OUTBOX_FILE = 'outbox.sqlite3'


class ManifestError(Exception):
    """The folder cannot be loaded; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class Manifests:
    notifications: dict[NotificationKey, dict[str, Any]]  # key -> the whole resource
    secrets: dict[tuple[str, str], dict[str, str]]  # (namespace, name) -> decoded data


def load_manifests(folder: pathlib.Path) -> Manifests:
    """Read every YAML document in a folder (not recursive); other kinds than ours and Secrets are ignored."""
    if not folder.is_dir():
        raise ManifestError(f"{folder} is not a folder")
    notifications: dict[NotificationKey, dict[str, Any]] = {}
    secrets: dict[tuple[str, str], dict[str, str]] = {}
    files = sorted([*folder.glob('*.yaml'), *folder.glob('*.yml')])
    for path in files:
        try:
            documents = [doc for doc in yaml.safe_load_all(path.read_text()) if isinstance(doc, dict)]
        except yaml.YAMLError as exc:
            raise ManifestError(f"{path}: not valid YAML: {exc}") from None
        for doc in documents:
            kind = doc.get('kind')
            if kind not in (KIND, 'Secret'):
                continue  # other kinds may share the folder
            metadata = doc.get('metadata') or {}
            if not isinstance(metadata, dict):
                raise ManifestError(f"{path}: metadata must be a mapping with a name")
            namespace = str(metadata.get('namespace') or 'default')
            name = str(metadata.get('name') or '')
            if not name:
                raise ManifestError(f"{path}: a {kind} has no metadata.name")
            if kind == KIND:
                if doc.get('apiVersion') != API_VERSION:  # a typo must not silently drop a notification
                    raise ManifestError(f"{path}: a {KIND} must have apiVersion {API_VERSION}, "
                                        f"not {doc.get('apiVersion')!r}")
                key = NotificationKey(namespace, name)
                if key in notifications:
                    raise ManifestError(f"{path}: {KIND} {key} is defined twice")
                notifications[key] = doc
            elif doc.get('apiVersion') == 'v1':
                secrets[(namespace, name)] = _secret_data(path, doc)
    return Manifests(notifications=notifications, secrets=secrets)


def _secret_data(path: pathlib.Path, doc: dict[str, Any]) -> dict[str, str]:
    data: dict[str, str] = {}
    for key, value in (doc.get('data') or {}).items():
        try:
            data[key] = base64.b64decode(str(value), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise ManifestError(f"{path}: Secret {doc['metadata'].get('name')} key {key!r} is not base64") from None
    data.update({key: str(value) for key, value in (doc.get('stringData') or {}).items()})
    return data


class ManifestSecrets:
    """Secret references resolved against the folder's Secret documents."""

    def __init__(self, secrets: dict[tuple[str, str], dict[str, str]]) -> None:
        self._secrets = secrets

    async def read(self, namespace: str, name: str, key: str) -> str:
        secret = self._secrets.get((namespace, name))
        if secret is None:
            raise SecretNotFound(f"Secret {namespace}/{name} not found")
        if key not in secret:
            raise SecretNotFound(f"Secret {namespace}/{name} has no key {key!r}")
        return secret[key]


class StatusFile:
    """
    All statuses in one JSON file, replaced atomically.

    The file is written once per event-loop turn however many statuses changed in it, not
    once per status: a flush of thousands of changed notifications rewrote the whole file
    for each of them (quadratic, and all of it while nothing else ran).
    """

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.saves = 0  # how many times the file was written (for tests and diagnostics)
        self._statuses: dict[str, dict[str, Any]] = {}
        self._save_scheduled = False

    def load(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        try:
            loaded = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise ManifestError(f"{self.path}: unreadable status file ({exc}); move it away to start afresh") from None
        if not isinstance(loaded, dict):
            raise ManifestError(f"{self.path}: not a status file (expected a JSON object)")
        self._statuses = loaded
        return loaded

    async def write(self, key: NotificationKey, status: dict[str, Any]) -> None:
        self._statuses[str(key)] = status
        if not self._save_scheduled:
            self._save_scheduled = True
            asyncio.get_running_loop().call_soon(self.save)

    def save(self) -> None:
        """Write the file now if a status changed since it was last written (at shutdown: the last time)."""
        if not self._save_scheduled:
            return
        self._save_scheduled = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix('.tmp')
        temporary.write_text(json.dumps(self._statuses, indent=2, sort_keys=True))
        os.replace(temporary, self.path)
        self.saves += 1


async def load_into(engine: Engine, manifests: Manifests, previous: dict[str, dict[str, Any]]) -> None:
    """Compile every notification of the folder into the engine, recording why any is not ready."""
    secrets = ManifestSecrets(manifests.secrets)
    for key, resource in sorted(manifests.notifications.items()):
        engine.book.seed(key, previous.get(str(key)))
        spec = resource.get('spec') or {}
        if isinstance(spec, dict) and spec.get('suspend') is True:  # another shape: compiling says what is wrong
            engine.book.set_spec_condition(key, ReadyCondition('False', 'Suspended', "spec.suspend is true"))
            continue
        try:
            notification = await compile_notification(key, spec, secrets)
        except SpecError as exc:
            logger.warning("%s is not ready: %s: %s", key, exc.reason, exc)
            engine.book.set_spec_condition(key, ReadyCondition('False', exc.reason, str(exc)))
            continue
        engine.admit(notification)  # Accepted, or EmailNotVerified until its address is verified


MANIFESTS: web.AppKey[Manifests] = web.AppKey('manifests', Manifests)


async def list_notifications(request: web.Request) -> web.Response:
    if not authorized(request):
        return error(401, UNAUTHORIZED)
    engine = request.app[ENGINE]
    manifests = request.app[MANIFESTS]
    items = []
    for key, resource in sorted(manifests.notifications.items()):
        spec = resource.get('spec') or {}
        if not isinstance(spec, dict):  # an InvalidSpec (its status says so): no fields to show
            spec = {}
        items.append({
            'namespace': key.namespace, 'name': key.name,
            'repository': spec.get('repository'), 'event': spec.get('event'),
            'method': spec.get('method'), 'title': spec.get('title'),
            'status': engine.book.status(key),
        })
    return web.json_response({'items': items})


def _button_target(request: web.Request) -> NotificationKey | web.Response:
    """The notification a button request names, or the 401/404 answer."""
    if not authorized(request):
        return error(401, UNAUTHORIZED)
    key = NotificationKey(request.match_info['namespace'], request.match_info['name'])
    if key not in request.app[MANIFESTS].notifications:
        return error(404, f"no notification {key}")
    return key


async def test_notification(request: web.Request) -> web.Response:
    """The standalone "Test Notification" button: send the event's sample payload once."""
    key = _button_target(request)
    if isinstance(key, web.Response):
        return key
    engine = request.app[ENGINE]
    await engine.send_test(key, value=now_rfc3339())
    return web.json_response({'lastTest': engine.book.status(key)['lastTest']}, status=202)


async def reset_notification(request: web.Request) -> web.Response:
    """The standalone "re-enable" button: zero the failures of a notification."""
    key = _button_target(request)
    if isinstance(key, web.Response):
        return key
    engine = request.app[ENGINE]
    engine.reset(key)
    return web.json_response({'status': engine.book.status(key)})


async def run_standalone(settings: Settings, folder: pathlib.Path, *, stop: asyncio.Event | None = None,
                         started: asyncio.Event | None = None) -> None:
    """Serve the folder's notifications until ``stop`` is set (or forever)."""
    manifests = load_manifests(folder)
    status_file = StatusFile(settings.state_dir / STATUS_FILE)
    engine = Engine(settings.engine, outbox_path=settings.state_dir / OUTBOX_FILE)
    await load_into(engine, manifests, status_file.load())
    app = make_receiver(engine, settings.receiver)
    app[MANIFESTS] = manifests
    app.router.add_get('/v1/notifications', list_notifications)
    app.router.add_post('/v1/notifications/{namespace}/{name}/test', test_notification)
    app.router.add_post('/v1/notifications/{namespace}/{name}/reset', reset_notification)
    try:
        await engine.start(status_file)
    except OutboxError as exc:
        raise ManifestError(str(exc)) from None
    await engine.flush_status()
    runner = await serve(app, settings.receiver.host, settings.receiver.port)
    freeze_startup_objects()
    logger.info("Standalone: %d notifications from %s, %d routed", len(manifests.notifications), folder,
                len(engine.routing))
    if stop is None:  # run as a program: SIGTERM and SIGINT stop gracefully
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    try:
        if started is not None:
            started.set()
        await stop.wait()
    finally:
        await shut_down(app, runner, settings.shutdown_grace)
        status_file.save()  # what the last flush wrote, should the loop stop before the scheduled save
