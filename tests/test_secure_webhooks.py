"""
Secure webhooks: TLS client certificates, a private CA, and Standard Webhooks signatures.

Real peers only: ``trustme`` makes a CA, a server certificate for 127.0.0.1
and client certificates; the target is a real aiohttp HTTPS server on loopback
that requires a client certificate signed by that CA. Signatures are checked
with the independent ``standardwebhooks`` package, as a receiver would.
"""
import asyncio
import contextlib
import dataclasses
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import aiohttp
import pydantic
import pytest
import standardwebhooks
import trustme
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from conftest import HttpTarget, Reply
from reponotify.dispatcher import Dispatcher, DispatcherSettings
from reponotify.events import new_event, sample_payload
from reponotify.methods import AttemptResult, DeliveryContext, webhook
from reponotify.notifications import InvalidSpec, Notification, NotificationKey, SecretNotFound, compile_notification
from reponotify.outbox import Outbox
from reponotify.routing import RoutingTable
from reponotify.status import StatusBook

KEY = NotificationKey('team-a', 'ci-hook')
SIGNING_SECRET = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw'  # Standard Webhooks' own example secret (24 bytes)


@dataclasses.dataclass
class Pki:
    ca: trustme.CA
    server: trustme.LeafCert
    client: trustme.LeafCert
    stranger: trustme.LeafCert  # a client certificate from a CA the server does not trust

    @property
    def ca_pem(self) -> str:
        return self.ca.cert_pem.bytes().decode()

    @staticmethod
    def cert_pem(leaf: trustme.LeafCert) -> str:
        return ''.join(pem.bytes().decode() for pem in leaf.cert_chain_pems)

    @staticmethod
    def key_pem(leaf: trustme.LeafCert) -> str:
        return leaf.private_key_pem.bytes().decode()


@pytest.fixture(scope='module')
def pki() -> Pki:
    ca = trustme.CA()
    return Pki(ca=ca, server=ca.issue_cert('127.0.0.1'), client=ca.issue_cert('hooks.reponotify.test'),
               stranger=trustme.CA().issue_cert('hooks.reponotify.test'))


class Secrets:
    """A SecretSource over a dict {(namespace, name): {key: value}}."""

    def __init__(self, data: Mapping[tuple[str, str], Mapping[str, str]]) -> None:
        self.data = data

    async def read(self, namespace: str, name: str, key: str) -> str:
        try:
            return self.data[namespace, name][key]
        except KeyError:
            raise SecretNotFound(f"Secret {namespace}/{name} has no key {key}") from None


@pytest.fixture
def secrets(pki: Pki) -> Secrets:
    return Secrets({
        ('team-a', 'hook-tls'): {'ca.crt': pki.ca_pem, 'tls.crt': pki.cert_pem(pki.client),
                                 'tls.key': pki.key_pem(pki.client)},
        ('team-a', 'stranger-tls'): {'tls.crt': pki.cert_pem(pki.stranger), 'tls.key': pki.key_pem(pki.stranger)},
        ('team-a', 'hook-signing'): {'secret': SIGNING_SECRET},
    })


def ref(name: str, key: str) -> dict[str, Any]:
    return {'secretKeyRef': {'name': name, 'key': key}}


CA_REF = {'caFrom': ref('hook-tls', 'ca.crt')}
CLIENT_REF = {'certFrom': ref('hook-tls', 'tls.crt'), 'keyFrom': ref('hook-tls', 'tls.key')}
SIGNING_REF = {'signingSecretFrom': ref('hook-signing', 'secret')}


async def compiled(config: Mapping[str, Any], secrets: Secrets, **spec: Any) -> Notification:
    return await compile_notification(KEY, {'repository': 'acme/web', 'event': 'repo_push', 'method': 'webhook',
                                            'config': dict(config), **spec}, secrets)


class HttpsTarget(HttpTarget):
    """The conftest recording server, over HTTPS; also records each request's client certificate."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__()
        self.context = context
        self.peers: list[Any] = []

    @property
    def url(self) -> str:
        return f'https://127.0.0.1:{self.port}'

    async def _handle(self, request: web.Request) -> web.Response:
        self.peers.append(request.transport.get_extra_info('peercert') if request.transport else None)
        return await super()._handle(request)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route('*', '/{tail:.*}', self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, '127.0.0.1', 0, ssl_context=self.context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def server_context(pki: Pki) -> ssl.SSLContext:
    """A server context that REQUIRES a client certificate signed by the test CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki.server.configure_cert(context)
    pki.ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


@pytest.fixture
async def https_target(pki: Pki) -> AsyncIterator[HttpsTarget]:
    target = HttpsTarget(server_context(pki))
    await target.start()
    yield target
    await target.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def push_event() -> Any:
    return new_event('repo_push', sample_payload('repo_push', 'acme/web'))


async def deliver(notification: Notification, http: aiohttp.ClientSession, delivery_id: str = 'delivery-1',
                  event: Any = None) -> AttemptResult:
    context = DeliveryContext(http=http, delivery_id=delivery_id, timeout=5.0)
    return await notification.method.deliver(notification.target, event or push_event(), context)


# --- TLS client certificates ------------------------------------------------------------------------------


async def test_client_certificate_is_presented(https_target: HttpsTarget, http: aiohttp.ClientSession,
                                               secrets: Secrets) -> None:
    notification = await compiled({'url': f'{https_target.url}/hooks/registry',
                                   'tls': {**CA_REF, **CLIENT_REF}}, secrets)
    event = push_event()

    result = await deliver(notification, http, event=event)

    assert result == AttemptResult(ok=True, code=200, message="webhook target answered 200")
    [request] = await https_target.wait_for(1)
    assert (request.method, request.path, request.query) == ('POST', '/hooks/registry', {})
    assert request.headers['Content-Type'] == 'application/json'
    assert request.json() == event.payload
    assert 'webhook-signature' not in request.headers  # no signing secret, no signature headers
    [peer] = https_target.peers
    assert peer['subjectAltName'] == (('DNS', 'hooks.reponotify.test'),)


async def test_without_client_certificate_the_attempt_fails(https_target: HttpsTarget, http: aiohttp.ClientSession,
                                                            secrets: Secrets) -> None:
    notification = await compiled({'url': f'{https_target.url}/hooks', 'tls': CA_REF}, secrets)

    result = await deliver(notification, http)

    # asyncio's TLS server drops the connection without sending its alert: the sender says what it likely means.
    assert result == AttemptResult(ok=False, message="TLS error talking to webhook target: connection reset "
                                                     "(does the target require a TLS client certificate?)")
    assert https_target.requests == []


async def test_client_certificate_from_an_untrusted_ca_fails(https_target: HttpsTarget, http: aiohttp.ClientSession,
                                                             secrets: Secrets) -> None:
    notification = await compiled({'url': f'{https_target.url}/hooks', 'tls': {
        **CA_REF, 'certFrom': ref('stranger-tls', 'tls.crt'), 'keyFrom': ref('stranger-tls', 'tls.key')}}, secrets)

    result = await deliver(notification, http)

    assert not result.ok and result.retryable
    assert result.message.startswith("TLS error talking to webhook target: ")
    assert https_target.requests == []


@pytest.fixture
def alerting_server(pki: Pki) -> Iterator[int]:
    """A blocking-ssl server that, unlike asyncio's, sends its TLS alert when no client certificate comes."""
    listener = socket.create_server(('127.0.0.1', 0))
    context = server_context(pki)

    def serve() -> None:
        connection, _ = listener.accept()
        with context.wrap_socket(connection, server_side=True, do_handshake_on_connect=False) as tls:
            try:
                tls.do_handshake()
            except ssl.SSLError:
                # The alert is sent. Read what the client sent until it hangs up, so that closing does not
                # reset the connection (a reset can overtake the alert).
                with socket.socket(fileno=os.dup(tls.fileno())) as raw:
                    raw.settimeout(5)
                    with contextlib.suppress(OSError):
                        while raw.recv(65536):
                            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    thread.join(timeout=5)
    listener.close()


async def test_certificate_required_alert_is_reported(alerting_server: int, http: aiohttp.ClientSession,
                                                      secrets: Secrets) -> None:
    notification = await compiled({'url': f'https://127.0.0.1:{alerting_server}/hooks', 'tls': CA_REF}, secrets)

    result = await deliver(notification, http)

    assert result == AttemptResult(ok=False,
                                   message="TLS error talking to webhook target: tlsv13 alert certificate required")


async def test_the_configured_ca_replaces_the_system_trust(https_target: HttpsTarget, http: aiohttp.ClientSession,
                                                          secrets: Secrets) -> None:
    # Without caFrom the system's CAs are trusted, and they do not know the test CA.
    notification = await compiled({'url': f'{https_target.url}/hooks', 'tls': CLIENT_REF}, secrets)

    result = await deliver(notification, http)

    assert not result.ok and result.retryable
    assert result.message.startswith("TLS error talking to webhook target: certificate verify failed: ")
    assert 'self' in result.message and 'signed certificate' in result.message
    assert https_target.requests == []


async def test_ssl_context_is_prepared_once(https_target: HttpsTarget, http: aiohttp.ClientSession,
                                            secrets: Secrets) -> None:
    notification = await compiled({'url': f'{https_target.url}/hooks', 'tls': {**CA_REF, **CLIENT_REF}}, secrets)
    context = notification.target.ssl_context
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED

    for delivery_id in ('one', 'two'):
        assert (await deliver(notification, http, delivery_id)).ok
    assert notification.target.ssl_context is context
    assert len(await https_target.wait_for(2)) == 2


async def test_key_file_is_private_and_removed(monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
                                               secrets: Secrets) -> None:
    monkeypatch.setattr(webhook, 'KEY_DIRECTORY', str(tmp_path))
    seen: list[tuple[str, int]] = []
    load = ssl.SSLContext.load_cert_chain

    def spy(self: ssl.SSLContext, certfile: str, *args: Any, **kwargs: Any) -> None:
        seen.append((os.path.dirname(certfile), stat.S_IMODE(os.stat(certfile).st_mode)))
        return load(self, certfile, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, 'load_cert_chain', spy)
    await compiled({'url': 'https://127.0.0.1:1/hooks', 'tls': {**CA_REF, **CLIENT_REF}}, secrets)

    assert seen and all(where == (str(tmp_path), 0o600) for where in seen)
    assert list(tmp_path.iterdir()) == []


async def test_tls_values_may_be_inline(https_target: HttpsTarget, http: aiohttp.ClientSession, pki: Pki) -> None:
    notification = await compiled({'url': f'{https_target.url}/hooks', 'tls': {
        'ca': pki.ca_pem, 'cert': pki.cert_pem(pki.client), 'key': pki.key_pem(pki.client)}}, Secrets({}))
    assert (await deliver(notification, http)).ok
    assert pki.key_pem(pki.client) not in repr(notification.target)


def encrypted_key(pki: Pki) -> str:
    key = serialization.load_pem_private_key(pki.client.private_key_pem.bytes(), password=None)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.BestAvailableEncryption(b'passphrase')).decode()


@pytest.mark.parametrize(('tls', 'message'), [
    ({}, "spec.config.tls: give a CA bundle to trust (caFrom), a client certificate (certFrom and keyFrom), "
         "or both"),
    ({'certFrom': ref('hook-tls', 'tls.crt')},
     "spec.config.tls: a client certificate needs both cert and key (certFrom and keyFrom)"),
    ({'keyFrom': ref('hook-tls', 'tls.key')},
     "spec.config.tls: a client certificate needs both cert and key (certFrom and keyFrom)"),
    ({'ca': 'not a certificate'},
     "spec.config.tls: ca must hold PEM certificates (-----BEGIN CERTIFICATE-----...)"),
    ({'ca': '-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n'},
     "spec.config.tls: ca is not a usable PEM CA bundle (no start line: cadata does not contain a certificate)"),
    ({'certFrom': ref('hook-tls', 'tls.key'), 'keyFrom': ref('hook-tls', 'tls.key')},
     "spec.config.tls: cert must hold a PEM certificate (-----BEGIN CERTIFICATE-----...)"),
    ({'certFrom': ref('hook-tls', 'tls.crt'), 'keyFrom': ref('hook-tls', 'tls.crt')},
     "spec.config.tls: key must hold a PEM private key (-----BEGIN PRIVATE KEY-----...)"),
    ({'certFrom': ref('hook-tls', 'tls.crt'), 'keyFrom': ref('stranger-tls', 'tls.key')},
     "spec.config.tls: cert and key are not a usable PEM certificate and matching private key "
     "(key values mismatch)"),
    ({'certFrom': ref('hook-tls', 'tls.crt'), 'key': 'ENCRYPTED'},
     "spec.config.tls: key is encrypted; give an unencrypted PEM private key"),
    ({'caFrom': ref('hook-tls', 'ca.crt'), 'ca': 'x'}, "spec.config.tls: give either ca or caFrom, not both"),
    ({'passwordFrom': ref('hook-tls', 'tls.key')},
     "spec.config.tls.passwordFrom: webhook does not take this field from a Secret "
     "(it takes: caFrom, certFrom, keyFrom)"),
    ({'caFrom': {'name': 'hook-tls', 'key': 'ca.crt'}},
     "spec.config.tls.caFrom must be {secretKeyRef: {name: ..., key: ...}}"),
    ({'ca': 'x', 'verify': False}, "spec.config.tls.verify: Extra inputs are not permitted"),
])
async def test_invalid_tls_is_rejected(tls: dict[str, Any], message: str, secrets: Secrets, pki: Pki) -> None:
    if tls.get('key') == 'ENCRYPTED':
        tls = {**tls, 'key': encrypted_key(pki)}
    with pytest.raises(InvalidSpec) as info:
        await compiled({'url': 'https://127.0.0.1:1/hooks', 'tls': tls}, secrets)
    assert str(info.value) == message
    assert '-----END' not in str(info.value)  # no PEM content, whatever was given


async def test_tls_needs_an_https_url(secrets: Secrets) -> None:
    with pytest.raises(InvalidSpec) as info:
        await compiled({'url': 'http://127.0.0.1:1/hooks?token=s3cret', 'tls': CA_REF}, secrets)
    assert str(info.value) == "spec.config: tls applies to https:// URLs only"


async def test_tls_secret_not_found(secrets: Secrets) -> None:
    with pytest.raises(SecretNotFound, match=r"^Secret team-a/nope has no key tls\.key$"):
        await compiled({'url': 'https://127.0.0.1:1/', 'tls': {**CLIENT_REF, 'keyFrom': ref('nope', 'tls.key')}},
                       secrets)


# --- Standard Webhooks signatures -------------------------------------------------------------------------


def verify(request: Any, secret: str = SIGNING_SECRET) -> Any:
    """What a receiver does: the independent standardwebhooks package checks the exact bytes received."""
    return standardwebhooks.Webhook(secret).verify(request.body, request.headers)


async def test_signed_delivery_verifies(http_target: HttpTarget, http: aiohttp.ClientSession,
                                        secrets: Secrets) -> None:
    notification = await compiled({'url': f'{http_target.url}/hooks', **SIGNING_REF}, secrets)
    event = push_event()

    before = int(time.time())
    result = await deliver(notification, http, 'msg_2KWPBgLlAfxdpx2AI54pPJ85f4W', event)
    after = int(time.time())

    assert result.ok
    [request] = await http_target.wait_for(1)
    assert request.headers['webhook-id'] == 'msg_2KWPBgLlAfxdpx2AI54pPJ85f4W'
    assert before <= int(request.headers['webhook-timestamp']) <= after
    assert request.headers['webhook-signature'].startswith('v1,')
    assert request.headers['Content-Type'] == 'application/json'
    assert verify(request) == event.payload
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        verify(dataclasses.replace(request, body=request.body.replace(b'latest', b'lateST')))
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        verify(request, 'whsec_' + 'A' * 32)


def test_signature_matches_the_standard_webhooks_example() -> None:
    # The worked example of the Standard Webhooks specification and its reference libraries.
    body = b'{"test": 2432232314}'
    headers = webhook.signature_headers(webhook.signing_key(pydantic.SecretStr(SIGNING_SECRET)),
                                        'msg_p5jXN8AQM9LWM0D4loKWxJek', body, timestamp=1614265330)
    assert headers == {
        'webhook-id': 'msg_p5jXN8AQM9LWM0D4loKWxJek',
        'webhook-timestamp': '1614265330',
        'webhook-signature': 'v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=',
    }


async def test_templated_body_is_signed_as_sent(http_target: HttpTarget, http: aiohttp.ClientSession,
                                                secrets: Secrets) -> None:
    template = '{"repo": "${repository}", "tags": "tags: ${updated_tags}", "text": "caf\\u00e9 \\u2713"}'
    notification = await compiled({'url': f'{http_target.url}/hooks', 'template': template, **SIGNING_REF},
                                  secrets)

    assert (await deliver(notification, http)).ok
    [request] = await http_target.wait_for(1)
    assert verify(request) == {'repo': 'acme/web', 'tags': 'tags: latest', 'text': 'café ✓'}


async def test_retries_keep_the_webhook_id(http_target: HttpTarget, http: aiohttp.ClientSession,
                                           secrets: Secrets) -> None:
    notification = await compiled({'url': f'{http_target.url}/hooks', **SIGNING_REF}, secrets)
    http_target.script('/hooks', Reply(status=503), Reply(status=200))
    event = push_event()

    first = await deliver(notification, http, 'delivery-42', event)
    await asyncio.sleep(1.1)  # a later attempt gets a later timestamp, and a signature of its own
    second = await deliver(notification, http, 'delivery-42', event)

    assert (first.ok, first.code, second.ok) == (False, 503, True)
    one, two = await http_target.wait_for(2, '/hooks')
    assert one.headers['webhook-id'] == two.headers['webhook-id'] == 'delivery-42'
    assert int(two.headers['webhook-timestamp']) > int(one.headers['webhook-timestamp'])
    assert one.body == two.body
    assert verify(one) == verify(two) == event.payload


async def test_dispatcher_retries_keep_the_webhook_id(http_target: HttpTarget, secrets: Secrets,
                                                      tmp_path: Any) -> None:
    notification = await compiled({'url': f'{http_target.url}/hooks', **SIGNING_REF}, secrets)
    http_target.script('/hooks', Reply(status=500), Reply(status=503), Reply(status=200))
    routing = RoutingTable()
    routing.put(notification)
    book = StatusBook()
    outbox = Outbox(tmp_path / 'outbox.db')
    await outbox.open()
    dispatcher = Dispatcher(outbox, routing, book, DispatcherSettings(workers=2, retry_schedule=(0.05, 0.05)))
    await dispatcher.start()
    try:
        event = push_event()
        await outbox.accept(event, [KEY])
        requests = await http_target.wait_for(3, '/hooks')
    finally:
        await dispatcher.stop()
        await outbox.close()

    ids = {request.headers['webhook-id'] for request in requests}
    assert len(ids) == 1 and ids != {event.id}  # one id per delivery, not the event's id
    for request in requests:
        assert verify(request) == event.payload


async def test_signed_and_mutual_tls(https_target: HttpsTarget, http: aiohttp.ClientSession,
                                     secrets: Secrets) -> None:
    notification = await compiled({'url': f'{https_target.url}/hooks', 'tls': {**CA_REF, **CLIENT_REF},
                                   **SIGNING_REF}, secrets)
    event = push_event()

    assert (await deliver(notification, http, 'both', event)).ok
    [request] = await https_target.wait_for(1)
    assert request.headers['webhook-id'] == 'both'
    assert verify(request) == event.payload


@pytest.mark.parametrize(('secret', 'message'), [
    ('MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw',
     "must be a Standard Webhooks secret: whsec_ followed by base64"),
    ('whsec_not base64!',
     "must be a Standard Webhooks secret: whsec_ followed by base64 (the part after the prefix is not valid base64)"),
    ('whsec_', "must be a Standard Webhooks secret of 24 to 64 bytes (this one decodes to 0)"),
    ('whsec_c2hvcnQ=', "must be a Standard Webhooks secret of 24 to 64 bytes (this one decodes to 5)"),
    ('whsec_' + 'A' * 88, "must be a Standard Webhooks secret of 24 to 64 bytes (this one decodes to 66)"),
])
async def test_invalid_signing_secret_is_rejected(secret: str, message: str) -> None:
    spec_secrets = Secrets({('team-a', 'hook-signing'): {'secret': secret}})
    with pytest.raises(InvalidSpec) as info:
        await compiled({'url': 'https://127.0.0.1:1/', **SIGNING_REF}, spec_secrets)
    assert str(info.value) == f"spec.config.signingSecret: {message}"
    with pytest.raises(InvalidSpec) as inline:
        await compiled({'url': 'https://127.0.0.1:1/', 'signingSecret': secret}, Secrets({}))
    assert str(inline.value) == f"spec.config.signingSecret: {message}"


async def test_signing_secret_never_shows(secrets: Secrets) -> None:
    notification = await compiled({'url': 'https://127.0.0.1:1/', **SIGNING_REF}, secrets)
    assert SIGNING_SECRET.removeprefix('whsec_') not in repr(notification.target)
    assert 'signing_key' not in repr(notification.target)
