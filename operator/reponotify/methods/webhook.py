"""
The ``webhook`` method: POST the event payload (or a rendered template) as JSON.

As in Quay, the body is the event payload itself, not wrapped, unless the
notification has a ``template`` (see :mod:`reponotify.bodytemplate`). The URL
is treated as a secret: it may carry credentials, so it can come from a Secret
(``urlFrom``) and never appears in status, events or logs.

Secure webhooks, beyond Quay:

* ``tls: {caFrom, certFrom, keyFrom}`` (PEM, each from a Secret or inline):
  ``ca`` is the CA bundle to trust instead of the system's (a private CA);
  ``cert`` and ``key``, together, are the TLS client certificate presented to
  the target so that it can prove where requests come from. HTTPS URLs only.
  The ``ssl.SSLContext`` is built once per notification, when it is compiled.
* ``signingSecret`` / ``signingSecretFrom`` (``whsec_<base64>``): requests are
  signed as Standard Webhooks define: ``webhook-id`` (the delivery's id, the
  same on every retry of a delivery), ``webhook-timestamp`` (unix seconds, of
  the attempt) and ``webhook-signature: v1,<base64 HMAC-SHA256 of
  "{id}.{timestamp}.{body}">`` over the exact body bytes sent.
"""
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import re
import ssl
import tempfile
import time
from typing import Any, ClassVar

import pydantic
import yarl

from reponotify.bodytemplate import BodyTemplate, compile_template
from reponotify.events import Event
from reponotify.methods.base import (AttemptResult, DeliveryContext, Method, MethodConfig, http_url, post_json,
                                     url_target_key)

SIGNING_SECRET_PREFIX = 'whsec_'
SIGNING_KEY_BYTES = (24, 64)  # Standard Webhooks: a secret of 24 to 64 random bytes

# Where the client certificate and key are written for the moment OpenSSL reads them
# (it loads certificate chains from files only): memory-backed when the system has it.
KEY_DIRECTORY: str | None = '/dev/shm' if os.path.isdir('/dev/shm') and os.access('/dev/shm', os.W_OK) else None


class TlsConfig(MethodConfig):
    """TLS settings of a webhook: a CA bundle to trust and a client certificate, in PEM."""
    secret_fields: ClassVar[tuple[str, ...]] = ('ca', 'cert', 'key')
    ca: str | None = pydantic.Field(default=None, repr=False)
    cert: str | None = pydantic.Field(default=None, repr=False)
    key: pydantic.SecretStr | None = None

    @pydantic.model_validator(mode='after')
    def _usable(self) -> 'TlsConfig':
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both cert and key (certFrom and keyFrom)")
        if self.ca is None and self.cert is None:
            raise ValueError("give a CA bundle to trust (caFrom), a client certificate (certFrom and keyFrom), "
                             "or both")
        # A bad PEM or a mismatched key is reported now, not at delivery time (the system's CAs,
        # slow to load, are loaded once, by prepare()).
        build_ssl_context(self, system_trust=False)
        return self


class WebhookConfig(MethodConfig):
    secret_fields: ClassVar[tuple[str, ...]] = ('url', 'signingSecret')
    url: pydantic.SecretStr
    template: str | None = None
    tls: TlsConfig | None = None
    signingSecret: pydantic.SecretStr | None = None

    @pydantic.field_validator('url')
    @classmethod
    def _http_url(cls, value: pydantic.SecretStr) -> pydantic.SecretStr:
        http_url(value.get_secret_value())
        return value

    @pydantic.field_validator('template')
    @classmethod
    def _valid_template(cls, value: str | None) -> str | None:
        if value:
            compile_template(value)  # TemplateError is a ValueError: pydantic reports it on this field
        return value

    @pydantic.field_validator('signingSecret')
    @classmethod
    def _valid_signing_secret(cls, value: pydantic.SecretStr | None) -> pydantic.SecretStr | None:
        if value is not None:
            signing_key(value)
        return value

    @pydantic.model_validator(mode='after')
    def _tls_needs_https(self) -> 'WebhookConfig':
        if self.tls is not None and not self.url.get_secret_value().lower().startswith('https://'):
            raise ValueError("tls applies to https:// URLs only")
        return self


def signing_key(secret: pydantic.SecretStr) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` signing secret; errors never repeat the secret."""
    text = secret.get_secret_value().strip()
    if not text.startswith(SIGNING_SECRET_PREFIX):
        raise ValueError(f"must be a Standard Webhooks secret: {SIGNING_SECRET_PREFIX} followed by base64")
    try:
        key = base64.b64decode(text.removeprefix(SIGNING_SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"must be a Standard Webhooks secret: {SIGNING_SECRET_PREFIX} followed by base64 "
                         "(the part after the prefix is not valid base64)") from None
    low, high = SIGNING_KEY_BYTES
    if not low <= len(key) <= high:
        raise ValueError(f"must be a Standard Webhooks secret of {low} to {high} bytes "
                         f"(this one decodes to {len(key)})")
    return key


def build_ssl_context(tls: TlsConfig, *, system_trust: bool = True) -> ssl.SSLContext:
    """An SSL context trusting ``ca`` (else the system's CAs) and presenting the client certificate, if any."""
    if tls.ca is not None and _PEM_CERTIFICATE not in tls.ca:
        raise ValueError(f"ca must hold PEM certificates ({_PEM_CERTIFICATE}...)")
    if tls.cert is not None and _PEM_CERTIFICATE not in tls.cert:
        raise ValueError(f"cert must hold a PEM certificate ({_PEM_CERTIFICATE}...)")
    if tls.key is not None and not _PEM_KEY.search(tls.key.get_secret_value()):
        raise ValueError("key must hold a PEM private key (-----BEGIN PRIVATE KEY-----...)")
    try:
        if tls.ca is not None:
            context = ssl.create_default_context(cadata=tls.ca)
        elif system_trust:
            context = ssl.create_default_context()
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(f"ca is not a usable PEM CA bundle ({_ssl_words(exc)})") from None
    if tls.cert is not None and tls.key is not None:
        _load_client_certificate(context, tls.cert, tls.key.get_secret_value())
    return context


def _load_client_certificate(context: ssl.SSLContext, cert: str, key: str) -> None:
    # OpenSSL loads chains from files only: write them to a file only this process can read
    # (mkstemp creates it 0600), let OpenSSL read it, and remove it at once.
    descriptor, path = tempfile.mkstemp(prefix='reponotify-tls-', suffix='.pem', dir=KEY_DIRECTORY)
    try:
        with os.fdopen(descriptor, 'w') as file:
            file.write(cert.strip() + '\n' + key.strip() + '\n')
        context.load_cert_chain(path, password=_no_password)
    except _EncryptedKey:
        raise ValueError("key is encrypted; give an unencrypted PEM private key") from None
    except ssl.SSLError as exc:
        raise ValueError(f"cert and key are not a usable PEM certificate and matching private key "
                         f"({_ssl_words(exc)})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    # Without a password callback OpenSSL would prompt on the terminal for an encrypted key.
    raise _EncryptedKey()


_PEM_CERTIFICATE = '-----BEGIN CERTIFICATE-----'
_PEM_KEY = re.compile(r'-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----')
_SSL_WORDS = re.compile(r'^(?:\[[^\]]*\]\s*)?(?P<words>.*?)(?:\s*\(_ssl\.c:\d+\))?$')


def _ssl_words(exc: BaseException) -> str:
    """OpenSSL's reason without its ``[LIB: CODE]`` prefix and ``(_ssl.c:N)`` suffix (it never quotes PEM)."""
    match = _SSL_WORDS.match(str(exc))
    return (match.group('words') if match else '') or type(exc).__name__


@dataclasses.dataclass(frozen=True, slots=True)
class WebhookTarget:
    url: pydantic.SecretStr
    template: BodyTemplate | None
    ssl_context: ssl.SSLContext | None = dataclasses.field(default=None, repr=False)
    signing_key: bytes | None = dataclasses.field(default=None, repr=False)
    tls: TlsConfig | None = dataclasses.field(default=None, repr=False)  # what ssl_context was built from
    # The URL parsed at the first attempt and kept for the next ones (see post_json); a secret as ``url``
    # is, so never shown. Not parsed when loaded: about 550 bytes a notification (measured), which only
    # notifications that send should pay.
    _endpoint: yarl.URL | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    @property
    def endpoint(self) -> yarl.URL:
        endpoint = self._endpoint
        if endpoint is None:
            endpoint = yarl.URL(self.url.get_secret_value())
            object.__setattr__(self, '_endpoint', endpoint)  # frozen: set as the dataclass __init__ does
        return endpoint

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled for a delivery process: an SSLContext cannot be, so it is built again there from the PEM.
        return _webhook_target, (self.url, self.template, self.signing_key, self.tls)


def _webhook_target(url: pydantic.SecretStr, template: BodyTemplate | None, signing_key: bytes | None,
                    tls: TlsConfig | None) -> WebhookTarget:
    return WebhookTarget(url=url, template=template, signing_key=signing_key, tls=tls,
                         ssl_context=build_ssl_context(tls) if tls is not None else None)


def signature_headers(key: bytes, delivery_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """The Standard Webhooks headers signing ``body`` for the delivery ``delivery_id``."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    signature = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return {
        'webhook-id': delivery_id,
        'webhook-timestamp': str(timestamp),
        'webhook-signature': f"v1,{signature}",
    }


class WebhookMethod(Method):
    name: ClassVar[str] = 'webhook'
    config_model: ClassVar[type[MethodConfig]] = WebhookConfig

    def prepare(self, config: MethodConfig) -> WebhookTarget:
        assert isinstance(config, WebhookConfig)
        template = compile_template(config.template) if config.template else None
        return WebhookTarget(
            url=config.url,
            template=template,
            ssl_context=build_ssl_context(config.tls) if config.tls is not None else None,
            signing_key=signing_key(config.signingSecret) if config.signingSecret is not None else None,
            tls=config.tls,
        )

    def target_key(self, target: Any) -> str | None:
        return url_target_key(target.url.get_secret_value())  # the host: notifications share it

    async def deliver(self, target: Any, event: Event, context: DeliveryContext) -> AttemptResult:
        if target.template:
            data = json.dumps(target.template.render(event.payload)).encode()
        else:  # the payload as the outbox stored it: serialised once per event, not once per delivery
            data = event.payload_json.encode()
        headers = signature_headers(target.signing_key, context.delivery_id, data) if target.signing_key else None
        return await post_json(context, target.endpoint, data, headers=headers,
                               ssl=target.ssl_context or True, what='webhook target')
