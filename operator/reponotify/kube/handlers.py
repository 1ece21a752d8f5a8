"""
The kopf operator: keeps the engine's routing table in step with the resources.

A thin shell: each handler turns a resource into a compiled notification (or a
reason why not), hands it to the engine, and sets the ``Ready`` condition in
the engine's status book; the book's flusher writes status through
:class:`~reponotify.kube.client.KubeClient`. Status writes do not change the
spec, so they never trigger these handlers again.

* create / update of ``spec`` / resume: compile and route; ``Ready`` says why not.
* a missing Secret: ``SecretNotFound``, retried every 30 s (``secret_retry_delay``) until it appears.
* ``suspend: true``: not routed, ``Ready=False`` with reason ``Suspended``.
* deletion: unrouted at once (no finalizer: there is nothing outside to clean).
* annotation ``reponotify.dev/test``: each new value sends the event's sample once.
* annotation ``reponotify.dev/reset``: each new value re-enables a disabled notification.
* annotation ``reponotify.dev/refresh``: each new value reads the notification's Secrets again.
  Secrets are read when a spec is handled, not watched: watching them would take list and watch
  on every Secret the operator can see, where reading the referenced ones takes get.
* failed deliveries: ``Warning`` Events, at most one per resource per ``warning_interval``
  (:mod:`reponotify.kube.delivery_events`); Ready transitions: ``Normal``/``Warning`` Events.
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
from reponotify.eventloop import freeze_startup_objects
from reponotify.kube.client import KubeClient
from reponotify.kube.delivery_events import DEFAULT_INTERVAL, DeliveryWarnings
from reponotify.logs import redact_kopf_bodies
from reponotify.models import GROUP, PLURAL, VERSION
from reponotify.notifications import (InvalidSpec, NotificationKey, RepositoryNotPermitted, SecretNotFound, SpecError,
                                      compile_notification)
from reponotify.outbox import OutboxError
from reponotify.receiver import make_receiver, serve, shut_down
from reponotify.status import ReadyCondition
from reponotify.tenancy import Allowance, allowance_from

logger = logging.getLogger(__name__)

SECRET_RETRY_DELAY = 30.0
KOPF_PREFIX = f'kopf.{GROUP}'  # kopf's annotations: kopf.reponotify.dev/last-handled-configuration
TEST_ANNOTATION = f'{GROUP}/test'  # "Test Notification": any new value sends the sample event once
RESET_ANNOTATION = f'{GROUP}/reset'  # "Re-enable": any new value zeroes the failure count
REFRESH_ANNOTATION = f'{GROUP}/refresh'  # any new value reads the notification's Secrets again
# After a restart, pending deliveries wait at most this long (seconds) for kopf to resume their resources
# (Dispatcher.hold); a resource not resumed by then was deleted while the operator was down.
RESUME_HOLD = 300.0


@dataclasses.dataclass(frozen=True)
class OperatorSettings:
    """What the operator front end needs beyond the common settings."""
    common: Settings
    kube_api_url: str | None = None  # talk to this API server without credentials (development, tests)
    secret_retry_delay: float = SECRET_RETRY_DELAY  # seconds between checks for a missing Secret
    repository_policy: str = 'allow'  # without the namespace annotation: 'allow' or 'deny' (tenancy)
    warning_interval: float = DEFAULT_INTERVAL  # seconds between Warning Events about failed deliveries, per resource


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
    redact_kopf_bodies()  # kopf's DEBUG logs would show whole resources, inline secret-bearing config included
    engine = engine or Engine(options.common.engine, outbox_path=options.common.state_dir / 'outbox.sqlite3')
    credentials: list[kopf.ConnectionInfo] = []
    client = KubeClient(lambda: credentials[-1] if credentials else None)
    secrets = KubeSecrets(client)
    background: set[asyncio.Task[None]] = set()
    runners: list[Any] = []
    # Each resource's metadata.uid, for the Events' involvedObject: `kubectl describe` selects
    # Events by involvedObject.uid, so an Event without it is never shown there.
    uids: dict[NotificationKey, str] = {}
    specs: dict[NotificationKey, tuple[dict[str, Any], int | None]] = {}  # to re-check on namespace changes
    allowances: dict[str, Allowance] = {}  # namespace -> what it may subscribe to (tenancy)

    def post_event_later(key: NotificationKey, type: str, reason: str, message: str, count: int = 1) -> None:
        task = asyncio.get_running_loop().create_task(
            _post_event(client, key, uids.get(key), type, reason, message, count))
        background.add(task)
        task.add_done_callback(background.discard)

    def announce_transition(key: NotificationKey, old: ReadyCondition | None, new: ReadyCondition) -> None:
        # Ready transitions become Kubernetes Events: Normal when ready, Warning when not.
        if new.reason != 'Pending':
            post_event_later(key, 'Normal' if new.status == 'True' else 'Warning', new.reason, new.message)

    async def announce_delivery(namespace: str, name: str, reason: str, message: str) -> None:
        # The quay_notification method's Kubernetes Event: a failure fails (and retries) the delivery.
        await client.post_event(namespace, name, uids.get(NotificationKey(namespace, name)),
                                type='Normal', reason=reason, message=message)

    engine.book.on_transition = announce_transition
    # Failed deliveries become Warning Events too, at most one per resource per warning_interval.
    delivery_warnings = DeliveryWarnings(post_event_later, interval=options.warning_interval)
    engine.book.on_delivery = delivery_warnings
    engine.dispatcher.announce = announce_delivery

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
        # kopf's own bookkeeping under its own prefix: kopf leaves every annotation under that
        # prefix out of what it compares, so sharing ours would hide the test and reset buttons.
        settings.persistence.finalizer = f'{KOPF_PREFIX}/finalizer'
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=KOPF_PREFIX)
        settings.posting.enabled = False  # our own Events, about notifications, not handler logs
        try:
            await engine.start(KubeStatusSink(client), hold_unhandled=RESUME_HOLD)
        except OutboxError as exc:
            raise kopf.PermanentError(str(exc)) from None  # stop, saying why, rather than lose the queue
        receiver = options.common.receiver
        app = make_receiver(engine, receiver)
        runners.append((app, await serve(app, receiver.host, receiver.port)))
        freeze_startup_objects()

    @kopf.on.cleanup(registry=registry)
    async def stop(**_: Any) -> None:
        for app, runner in runners:
            await shut_down(app, runner, options.common.shutdown_grace)
        delivery_warnings.close()
        await asyncio.gather(*background, return_exceptions=True)
        await client.close()

    async def allowance_of(namespace: str) -> Allowance:
        if namespace not in allowances:  # not seen on the namespace watch yet (start-up): ask once
            found = await client.read_namespace(namespace)
            allowances[namespace] = allowance_from((found or {}).get('metadata', {}).get('annotations'),
                                                   default_allow=options.repository_policy == 'allow')
        return allowances[namespace]

    async def apply(key: NotificationKey, spec: dict[str, Any], generation: int | None) -> None:
        """Route a resource's spec, or record why not; raises SecretNotFound for kopf to retry."""
        if spec.get('suspend') is True:
            engine.remove_notification(key)
            engine.book.set_spec_condition(key, ReadyCondition('False', 'Suspended', "spec.suspend is true"),
                                           generation)
            return
        try:
            notification = await compile_notification(key, spec, secrets, generation=generation)
            allowance = await allowance_of(key.namespace)
            if not allowance.permits(notification.repository):
                raise RepositoryNotPermitted(allowance.explain(key.namespace, notification.repository))
        except SpecError as exc:
            engine.remove_notification(key)
            engine.book.set_spec_condition(key, ReadyCondition('False', exc.reason, str(exc)), generation)
            raise
        engine.admit(notification)  # Accepted, or EmailNotVerified until its address is verified

    async def handle(key: NotificationKey, spec: dict[str, Any], generation: int | None) -> None:
        """``apply`` for a handler: kopf retries a missing Secret; the status is written at once either way."""
        try:
            await apply(key, spec, generation)
        except SecretNotFound as exc:
            raise kopf.TemporaryError(str(exc), delay=options.secret_retry_delay) from None
        except SpecError:
            pass  # recorded in the Ready condition: a person has to change something
        finally:
            engine.dispatcher.release(key)  # its deliveries held since a restart go on, as it now is
            await engine.flush_status(key)

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, field='spec', registry=registry)
    async def reconcile(spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, namespace: str, name: str,
                        **_: Any) -> None:
        key = NotificationKey(namespace, name)
        engine.book.seed(key, dict(status))
        specs[key] = (dict(spec), meta.get('generation'))
        await handle(key, dict(spec), meta.get('generation'))

    @kopf.on.event('', 'v1', 'namespaces', registry=registry)
    async def namespace_changed(type: str, body: kopf.Body, name: str, **_: Any) -> None:
        """A namespace's allowed-repositories annotation changed: re-check its notifications."""
        allowance = allowance_from(body.metadata.get('annotations'), default_allow=options.repository_policy == 'allow')
        if type == 'DELETED' or allowances.get(name) == allowance:
            return
        known = name in allowances
        allowances[name] = allowance
        if not known:
            return  # first sight: the resources' own handlers check it
        applied = [key for key in sorted(specs) if key.namespace == name]
        for key in applied:
            spec, generation = specs[key]
            try:
                await apply(key, spec, generation)
            except SpecError:
                pass  # recorded in the Ready condition
        if applied:  # (no keys would mean: every pending status)
            await engine.flush_status(*applied)

    @kopf.on.field(GROUP, VERSION, PLURAL, field=('metadata', 'annotations', TEST_ANNOTATION),
                   registry=registry)
    async def test_button(new: Any, namespace: str, name: str, **_: Any) -> None:
        key = NotificationKey(namespace, name)
        if not new or engine.book.last_test_value(key) == str(new):
            return  # removed, or this value was handled already: one test per distinct value
        await engine.send_test(key, str(new))
        test = engine.book.status(key)['lastTest']
        post_event_later(key, 'Normal', 'TestRequested', f"Test notification: {test['outcome']}: {test['message']}")
        await engine.flush_status(key)

    @kopf.on.field(GROUP, VERSION, PLURAL, field=('metadata', 'annotations', RESET_ANNOTATION),
                   registry=registry)
    async def reset_button(new: Any, namespace: str, name: str, **_: Any) -> None:
        if not new:
            return
        key = NotificationKey(namespace, name)
        engine.reset(key)
        post_event_later(key, 'Normal', 'Reset', "Failure count reset by the reponotify.dev/reset annotation")
        await engine.flush_status(key)

    @kopf.on.field(GROUP, VERSION, PLURAL, field=('metadata', 'annotations', REFRESH_ANNOTATION),
                   registry=registry)
    async def refresh_button(new: Any, namespace: str, name: str, **_: Any) -> None:
        key = NotificationKey(namespace, name)
        known = specs.get(key)
        if not new or known is None:  # removed, or not handled yet (handling it reads its Secrets)
            return
        await handle(key, *known)
        post_event_later(key, 'Normal', 'Refreshed', "Secrets read again (the reponotify.dev/refresh annotation)")

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def forget(type: str, body: kopf.Body, namespace: str, name: str, **_: Any) -> None:
        # Event handlers run before the changing handlers of the same event: the uid is known to them.
        key = NotificationKey(namespace, name)
        if type == 'DELETED' or body.metadata.get('deletionTimestamp'):
            engine.remove_notification(key)
            engine.book.forget(key)
            engine.dispatcher.release(key)  # held deliveries of a deleted notification: removed, unrecorded
            delivery_warnings.forget(key)
            uids.pop(key, None)
            specs.pop(key, None)
        elif body.metadata.get('uid'):
            uids[key] = body.metadata['uid']

    return registry


async def _post_event(client: KubeClient, key: NotificationKey, uid: str | None, type: str, reason: str,
                      message: str, count: int = 1) -> None:
    try:
        await client.post_event(key.namespace, key.name, uid, type=type, reason=reason, message=message, count=count)
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
