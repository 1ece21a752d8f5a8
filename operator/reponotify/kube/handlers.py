"""
The kopf operator: keeps the engine's routing table in step with the resources.

A thin shell: each handler turns a resource into a compiled notification (or a
reason why not), hands it to the engine, and sets the ``Ready`` condition in
the engine's status book; the book's flusher writes status through
:class:`~reponotify.kube.client.KubeClient`. Status writes do not change the
spec, so they never trigger these handlers again.

* create / update of ``spec`` / resume: compile and route; ``Ready`` says why not.
* a missing Secret: ``SecretNotFound``, retried every 30 s until it appears.
* ``suspend: true``: not routed, ``Ready=False`` with reason ``Suspended``.
* deletion: unrouted at once (no finalizer: there is nothing outside to clean).
"""
import asyncio
import base64
import binascii
import dataclasses
import logging
from typing import Any

import kopf

from reponotify.config import Settings
from reponotify.engine import Engine
from reponotify.kube.client import KubeClient
from reponotify.models import GROUP, PLURAL, VERSION
from reponotify.notifications import InvalidSpec, NotificationKey, SecretNotFound, SpecError, compile_notification
from reponotify.receiver import make_app, serve
from reponotify.status import ReadyCondition

logger = logging.getLogger(__name__)

SECRET_RETRY_DELAY = 30.0


@dataclasses.dataclass(frozen=True)
class OperatorSettings:
    """What the operator front end needs beyond the common settings."""
    common: Settings
    kube_api_url: str | None = None  # talk to this API server without credentials (development, tests)


class KubeSecrets:
    """Reads ``<field>From.secretKeyRef`` values from Secrets in the resource's namespace."""

    def __init__(self, client: KubeClient) -> None:
        self._client = client

    async def read(self, namespace: str, name: str, key: str) -> str:
        secret = await self._client.read_secret(namespace, name)
        if secret is None:
            raise SecretNotFound(f"Secret {namespace}/{name} not found")
        data = secret.get('data') or {}
        if key not in data:
            raise SecretNotFound(f"Secret {namespace}/{name} has no key {key!r}")
        try:
            return base64.b64decode(data[key], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise InvalidSpec(f"Secret {namespace}/{name} key {key!r} is not base64-encoded UTF-8 text") from None


class KubeStatusSink:
    """Writes a notification's status to its status subresource."""

    def __init__(self, client: KubeClient) -> None:
        self._client = client

    async def write(self, key: NotificationKey, status: dict[str, Any]) -> None:
        await self._client.patch_status(key.namespace, key.name, status)


def build_registry(options: OperatorSettings, engine: Engine | None = None) -> kopf.OperatorRegistry:
    """A registry with all of the operator's handlers, bound to one engine."""
    registry = kopf.OperatorRegistry()
    engine = engine or Engine(options.common.engine)
    credentials: list[kopf.ConnectionInfo] = []
    client = KubeClient(lambda: credentials[-1] if credentials else None)
    secrets = KubeSecrets(client)
    background: set[asyncio.Task[None]] = set()
    runners: list[Any] = []

    def announce(key: NotificationKey, old: ReadyCondition | None, new: ReadyCondition) -> None:
        # Ready transitions become Kubernetes Events: Normal when ready, Warning when not.
        if new.reason == 'Pending':
            return
        task = asyncio.get_running_loop().create_task(_post_event(client, key, new))
        background.add(task)
        task.add_done_callback(background.discard)

    engine.book.on_transition = announce

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        if options.kube_api_url:
            info = kopf.ConnectionInfo(server=options.kube_api_url, insecure=True)
        else:
            info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
        if info is not None:
            credentials.append(info)
            del credentials[:-1]
        return info

    @kopf.on.startup(registry=registry)
    async def start(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = f'{GROUP}/finalizer'
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
        settings.posting.enabled = False  # our own Events, about notifications, not handler logs
        await engine.start(KubeStatusSink(client))
        receiver = options.common.receiver
        runners.append(await serve(make_app(engine, token=receiver.token), receiver.host, receiver.port))

    @kopf.on.cleanup(registry=registry)
    async def stop(**_: Any) -> None:
        for runner in runners:
            await runner.cleanup()
        await engine.stop()
        await asyncio.gather(*background, return_exceptions=True)
        await client.close()

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, field='spec', registry=registry)
    async def reconcile(spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, namespace: str, name: str,
                        **_: Any) -> None:
        key = NotificationKey(namespace, name)
        generation = meta.get('generation')
        engine.book.seed(key, dict(status))
        if spec.get('suspend') is True:
            engine.remove_notification(key)
            engine.book.set_spec_condition(key, ReadyCondition('False', 'Suspended', "spec.suspend is true"),
                                           generation)
            await engine.flush_status()
            return
        try:
            notification = await compile_notification(key, dict(spec), secrets, generation=generation)
        except SpecError as exc:
            engine.remove_notification(key)
            engine.book.set_spec_condition(key, ReadyCondition('False', exc.reason, str(exc)), generation)
            await engine.flush_status()
            if isinstance(exc, SecretNotFound):
                raise kopf.TemporaryError(str(exc), delay=SECRET_RETRY_DELAY)
            return
        engine.put_notification(notification)
        message = f"Routing {notification.event} events of {notification.repository} to {notification.method.name}"
        engine.book.set_spec_condition(key, ReadyCondition('True', 'Accepted', message), generation)
        await engine.flush_status()

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def forget(type: str, body: kopf.Body, namespace: str, name: str, **_: Any) -> None:
        if type == 'DELETED' or body.metadata.get('deletionTimestamp'):
            key = NotificationKey(namespace, name)
            engine.remove_notification(key)
            engine.book.forget(key)

    return registry


async def _post_event(client: KubeClient, key: NotificationKey, condition: ReadyCondition) -> None:
    try:
        await client.post_event(key.namespace, key.name, None,
                                type='Normal' if condition.status == 'True' else 'Warning',
                                reason=condition.reason, message=condition.message)
    except Exception as exc:  # Events are best effort: never fail a reconciliation for them
        logger.warning("Could not post an Event for %s: %s", key, exc)


async def run_operator(options: OperatorSettings, *, namespaces: list[str], liveness_endpoint: str | None = None,
                       stop_flag: asyncio.Event | None = None, ready_flag: asyncio.Event | None = None,
                       engine: Engine | None = None) -> None:
    """Run the operator until ``stop_flag`` is set (or forever)."""
    await kopf.operator(
        registry=build_registry(options, engine),
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=True,  # one replica (the chart's Deployment uses strategy Recreate): no peering
        liveness_endpoint=liveness_endpoint,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
