"""
The e-mail method against a real SMTP server (aiosmtpd) on loopback.

The server runs in the test's own event loop and records every mail exactly
as it arrived (envelope, raw content, whether the connection was TLS, who
logged in); replies to RCPT and DATA can be scripted. TLS uses trustme
certificates, trusted by the client only through ``ca_file``.
"""
import asyncio
import dataclasses
import datetime
import email
import email.message
import email.policy
import re
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pydantic
import pytest
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from reponotify.dispatcher import Dispatcher, DispatcherSettings
from reponotify.events import Event, new_event, sample_payload
from reponotify.methods import METHODS
from reponotify.methods.base import AttemptResult, DeliveryContext, MethodSettings, SmtpSettings
from reponotify.methods.email import EmailConfig, EmailMethod, EmailTarget, build_message, html_to_text
from reponotify.notifications import NotificationKey, compile_notification
from reponotify.outbox import Outbox
from reponotify.routing import RoutingTable
from reponotify.status import StatusBook

SENDER = 'reponotify@example.com'
RECIPIENT = 'ops@example.com'
PASSWORD = 's3cret-Pa55word'

PUSH_PAYLOAD = {
    'repository': 'acme/web',
    'namespace': 'acme',
    'name': 'web',
    'docker_url': 'quay.io/acme/web',
    'homepage': 'https://quay.io/repository/acme/web',
    'updated_tags': ['latest', 'v1.2'],
}


# -- a real SMTP server --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ReceivedMail:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls: bool
    login: str | None
    reply: str

    def parse(self) -> email.message.EmailMessage:
        message = email.message_from_bytes(self.content, policy=email.policy.default)
        assert isinstance(message, email.message.EmailMessage)
        return message


class Recorder:
    """An aiosmtpd handler that records every DATA it gets and answers what the test scripts."""

    def __init__(self) -> None:
        self.mails: list[ReceivedMail] = []  # every DATA, accepted or not
        self.replies: dict[str, list[str]] = {}  # 'RCPT' | 'DATA' -> replies used in order, then 250

    def script(self, stage: str, *replies: str) -> None:
        self.replies[stage] = list(replies)

    def _scripted(self, stage: str) -> str | None:
        queue = self.replies.get(stage)
        return queue.pop(0) if queue else None

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        reply = self._scripted('RCPT')
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return '250 OK'

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = self._scripted('DATA') or '250 2.0.0 Message accepted for delivery'
        assert server.transport is not None and isinstance(envelope.content, bytes)
        login = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None
        self.mails.append(ReceivedMail(
            mail_from=str(envelope.mail_from), rcpt_tos=list(envelope.rcpt_tos), content=envelope.content,
            tls=server.transport.get_extra_info('ssl_object') is not None, login=login, reply=reply))
        return reply

    @property
    def accepted(self) -> list[ReceivedMail]:
        return [mail for mail in self.mails if mail.reply.startswith('250')]


class Authenticator:
    """Accepts one user name and password; remembers every attempt."""

    def __init__(self, username: str, password: str) -> None:
        self.expected = (username.encode(), password.encode())
        self.attempts: list[tuple[str, bytes]] = []

    def __call__(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                 auth_data: Any) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        self.attempts.append((mechanism, auth_data.login))
        ok = (auth_data.login, auth_data.password) == self.expected
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


@dataclasses.dataclass
class SmtpServer:
    recorder: Recorder
    port: int


StartServer = Callable[..., 'asyncio.Future[SmtpServer]']


@pytest.fixture(scope='module')
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / 'ca.pem'
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert('127.0.0.1', 'localhost').configure_cert(context)
    return context


@pytest.fixture
async def start_server() -> AsyncIterator[Callable[..., Any]]:
    """Start an aiosmtpd server on loopback: ``await start_server(implicit_tls=..., **smtp_kwargs)``."""
    servers: list[asyncio.Server] = []
    loop = asyncio.get_running_loop()

    async def start(*, implicit_tls: ssl.SSLContext | None = None, **kwargs: Any) -> SmtpServer:
        recorder = Recorder()
        server = await loop.create_server(
            lambda: SMTP(recorder, hostname='mail.test', loop=loop, **kwargs),
            '127.0.0.1', 0, ssl=implicit_tls)
        servers.append(server)
        return SmtpServer(recorder=recorder, port=server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def smtp_settings(port: int, **kwargs: Any) -> MethodSettings:
    return MethodSettings(smtp=SmtpSettings(host='127.0.0.1', port=port, sender=SENDER, **kwargs))


def push_event() -> Event:
    return new_event('repo_push', dict(PUSH_PAYLOAD), event_id='event-1')


async def deliver(http: aiohttp.ClientSession, settings: MethodSettings, event: Event | None = None, *,
                  recipient: str = RECIPIENT, delivery_id: str = 'delivery-1') -> AttemptResult:
    method = EmailMethod()
    target = method.prepare(method.config_model.model_validate({'email': recipient}))
    context = DeliveryContext(http=http, delivery_id=delivery_id, timeout=5.0, settings=settings)
    return await method.deliver(target, event or push_event(), context)


# -- the mail as received ------------------------------------------------------------------------

EXPECTED_MESSAGE_HTML = (
    'Push of tags <a href="https://quay.io/repository/acme/web?tab=tags&amp;tag=latest">latest</a>, '
    '<a href="https://quay.io/repository/acme/web?tab=tags&amp;tag=v1.2">v1.2</a> in repository '
    '<a href="https://quay.io/repository/acme/web">acme/web</a>'
)

EXPECTED_PLAIN = (
    'Push of tags latest <https://quay.io/repository/acme/web?tab=tags&tag=latest>, '
    'v1.2 <https://quay.io/repository/acme/web?tab=tags&tag=v1.2> in repository '
    'acme/web <https://quay.io/repository/acme/web>\n'
    '\n'
    '-- \n'
    'You get this mail because a repository notification sends repo_push events of acme/web '
    'to ops@example.com.\n'
)

EXPECTED_HTML = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Repository acme/web updated</title>
</head>
<body style="margin: 0; padding: 16px; font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; \
font-size: 14px; line-height: 1.5; color: #1f2328;">
<p style="margin: 0 0 12px 0;">{EXPECTED_MESSAGE_HTML}</p>
<hr style="border: none; border-top: 1px solid #d0d7de; margin: 16px 0;">
<p style="margin: 0; font-size: 12px; color: #59636e;">You get this mail because a repository notification \
sends repo_push events of acme/web to ops@example.com.</p>
</body>
</html>
"""


async def test_the_mail_as_the_server_receives_it(start_server: Any, http: aiohttp.ClientSession) -> None:
    server = await start_server()
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)

    result = await deliver(http, smtp_settings(server.port), delivery_id='2b1c6f0e-delivery')

    assert result.ok and result.code == 250, result
    assert result.message.startswith("SMTP server accepted the mail")
    [mail] = server.recorder.mails
    assert mail.mail_from == SENDER
    assert mail.rcpt_tos == [RECIPIENT]
    assert mail.tls is False and mail.login is None

    message = mail.parse()
    assert message['From'] == SENDER
    assert message['To'] == RECIPIENT
    assert message['Subject'] == 'Repository acme/web updated'
    assert message['Message-ID'] == '<2b1c6f0e-delivery@example.com>'
    assert message['Auto-Submitted'] == 'auto-generated'
    assert message['X-Reponotify-Event'] == 'repo_push'
    assert message['X-Reponotify-Repository'] == 'acme/web'
    assert message['MIME-Version'] == '1.0'
    assert before <= message['Date'].datetime <= datetime.datetime.now(datetime.timezone.utc)
    assert message.get_content_type() == 'multipart/alternative'
    plain, rich = message.iter_parts()
    assert plain.get_content_type() == 'text/plain' and plain.get_content_charset() == 'utf-8'
    assert rich.get_content_type() == 'text/html' and rich.get_content_charset() == 'utf-8'
    assert 'MIME-Version' not in plain and 'MIME-Version' not in rich
    assert plain.get_content().replace('\r\n', '\n') == EXPECTED_PLAIN
    assert rich.get_content().replace('\r\n', '\n') == EXPECTED_HTML
    assert b'\r\n' in mail.content and b'\n' not in mail.content.replace(b'\r\n', b'')


async def test_retries_of_one_delivery_share_the_message_id(start_server: Any, http: aiohttp.ClientSession) -> None:
    server = await start_server()
    settings = smtp_settings(server.port)

    for delivery_id in ('delivery-a', 'delivery-a', 'delivery-b'):
        assert (await deliver(http, settings, delivery_id=delivery_id)).ok

    ids = [mail.parse()['Message-ID'] for mail in server.recorder.mails]
    assert ids == ['<delivery-a@example.com>', '<delivery-a@example.com>', '<delivery-b@example.com>']


async def test_a_display_name_in_the_sender_stays_out_of_the_envelope(
        start_server: Any, http: aiohttp.ClientSession) -> None:
    server = await start_server()
    settings = MethodSettings(smtp=SmtpSettings(host='127.0.0.1', port=server.port,
                                                sender='Registry Bot <bot@registry.example.org>'))

    assert (await deliver(http, settings)).ok

    [mail] = server.recorder.mails
    assert mail.mail_from == 'bot@registry.example.org'
    message = mail.parse()
    assert message['From'] == 'Registry Bot <bot@registry.example.org>'
    assert message['Message-ID'] == '<delivery-1@registry.example.org>'


@pytest.mark.parametrize('kind', ['repo_push', 'build_queued', 'build_start', 'build_success', 'build_failure',
                                  'build_cancelled', 'vulnerability_found', 'repo_mirror_sync_started',
                                  'repo_mirror_sync_success', 'repo_mirror_sync_failed', 'repo_image_expiry'])
async def test_every_event_kind_is_mailed_with_its_summary(
        kind: str, start_server: Any, http: aiohttp.ClientSession) -> None:
    server = await start_server()
    event = new_event(kind, sample_payload(kind, 'acme/web'))

    assert (await deliver(http, smtp_settings(server.port), event)).ok

    message = server.recorder.mails[0].parse()
    assert message['Subject'] == event.summary
    plain, rich = message.iter_parts()
    assert 'acme/web' in plain.get_content() and '<' not in plain.get_content().split('<http', 1)[0]
    assert 'href="https://quay.io/repository/acme/web' in rich.get_content()


# -- escaping and header safety ------------------------------------------------------------------

async def test_payload_values_are_escaped_in_html_and_plain_in_text(
        start_server: Any, http: aiohttp.ClientSession) -> None:
    server = await start_server()
    payload = sample_payload('build_failure', 'acme/web')
    payload['error_message'] = 'bad <script>alert("x")</script> & <b>bold</b>'
    payload['trigger_metadata']['ref'] = 'refs/heads/<img src=x onerror=alert(1)>'
    event = new_event('build_failure', payload)

    assert (await deliver(http, smtp_settings(server.port), event)).ok

    plain, rich = server.recorder.mails[0].parse().iter_parts()
    html_body = rich.get_content()
    assert '<script>' not in html_body and '<img' not in html_body and '<b>bold' not in html_body
    assert '&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;' in html_body
    assert '<b>&lt;img src=x onerror=alert(1)&gt;</b>' in html_body  # the template's own markup stays
    text = plain.get_content()
    assert 'bad <script>alert("x")</script> & <b>bold</b>' in text  # plain text is not HTML: shown as written
    assert 'branch <img src=x onerror=alert(1)>' in text


async def test_line_breaks_in_payload_values_cannot_inject_headers(
        start_server: Any, http: aiohttp.ClientSession) -> None:
    server = await start_server()
    payload = sample_payload('repo_mirror_sync_failed', 'acme/web')
    payload['message'] = 'upstream down\r\nBcc: victim@example.net\r\n\r\nfake body'
    event = new_event('repo_mirror_sync_failed', payload)

    assert (await deliver(http, smtp_settings(server.port), event)).ok

    [mail] = server.recorder.mails
    assert mail.rcpt_tos == [RECIPIENT]
    message = mail.parse()
    assert message['Bcc'] is None
    assert message['Subject'] == 'Repository Mirror failed for upstream down Bcc: victim@example.net fake body'


async def test_non_ascii_subject_and_body_survive(start_server: Any, http: aiohttp.ClientSession) -> None:
    server = await start_server()
    payload = sample_payload('repo_mirror_sync_success', 'acme/web')
    payload['message'] = 'Spiegel für Zürich ✓'
    event = new_event('repo_mirror_sync_success', payload)

    assert (await deliver(http, smtp_settings(server.port), event)).ok

    [mail] = server.recorder.mails
    assert mail.content.isascii()  # encoded words and a transfer encoding: no 8-bit data on the wire
    message = mail.parse()
    assert message['Subject'] == 'Repository Mirror success for Spiegel für Zürich ✓'
    plain, rich = message.iter_parts()
    assert 'Spiegel für Zürich ✓' in plain.get_content()
    assert 'Spiegel für Zürich ✓' in rich.get_content()


async def test_long_values_keep_lines_within_the_limit(start_server: Any, http: aiohttp.ClientSession) -> None:
    server = await start_server()
    payload = sample_payload('repo_mirror_sync_failed', 'acme/web')
    payload['message'] = 'x' * 3000
    event = new_event('repo_mirror_sync_failed', payload)

    assert (await deliver(http, smtp_settings(server.port), event)).ok

    [mail] = server.recorder.mails
    assert max(len(line) for line in mail.content.split(b'\r\n')) <= 998
    message = mail.parse()
    assert len(message['Subject']) == 250 and message['Subject'].endswith('x…')
    assert 'x' * 3000 in message.get_body(('plain',)).get_content()  # type: ignore[union-attr]


def test_html_to_text() -> None:
    assert html_to_text('a <a href="https://x.test/">https://x.test/</a> b') == 'a https://x.test/ b'
    assert html_to_text('<b>x</b>\n  y<br> <i>z</i> &amp; &lt;w&gt;') == 'x y\nz & <w>'
    assert html_to_text('<a href="https://x.test/?a=1&amp;b=2">link</a>') == 'link <https://x.test/?a=1&b=2>'


def test_build_message_is_deterministic_given_a_date() -> None:
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    first = build_message(push_event(), sender=SENDER, recipient=RECIPIENT, delivery_id='d', date=when)
    second = build_message(push_event(), sender=SENDER, recipient=RECIPIENT, delivery_id='d', date=when)
    assert first['Date'] == 'Fri, 02 Jan 2026 03:04:05 +0000'
    assert first.get_body(('plain',)).get_content() == second.get_body(('plain',)).get_content()  # type: ignore[union-attr]


def test_message_id_is_safe_whatever_the_delivery_id() -> None:
    mail = build_message(push_event(), sender=SENDER, recipient=RECIPIENT, delivery_id='a b<c>@d\r\n')
    assert mail['Message-ID'] == '<a-b-c--d--@example.com>'


# -- the recipient address -----------------------------------------------------------------------

@pytest.mark.parametrize('address', [
    'ops@example.com', 'first.last+tag@mail.example.co.uk', "o'brien@example.org", 'x@a-b.example',
    'UPPER@EXAMPLE.COM', f"{'a' * 64}@example.com",
])
def test_valid_addresses(address: str) -> None:
    assert EmailConfig.model_validate({'email': address}).email == address


@pytest.mark.parametrize('address', [
    '', 'ops', 'ops@', '@example.com', 'ops@example', 'ops@@example.com', 'ops@example..com', '.ops@example.com',
    'ops.@example.com', 'o..ps@example.com', 'ops @example.com', ' ops@example.com', 'ops@example.com ',
    'Ops <ops@example.com>', 'a@example.com,b@example.com', 'ops@example.com\r\nBcc: x@example.com',
    'ops@-example.com', 'ops@example-.com', 'ops@127.0.0.1', 'ops@[127.0.0.1]', '"ops"@example.com',
    'jörg@example.com', 'ops@exämple.com', f"{'a' * 65}@example.com", f"ops@{'a' * 63}.{'b' * 63}.{'c' * 63}.{'d' * 63}.com",
])
def test_invalid_addresses_are_refused_with_a_clear_message(address: str) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        EmailConfig.model_validate({'email': address})
    [error] = info.value.errors()
    assert error['loc'] == ('email',)
    assert 'e-mail address' in error['msg']


def test_the_config_takes_only_the_address() -> None:
    with pytest.raises(pydantic.ValidationError):
        EmailConfig.model_validate({'email': RECIPIENT, 'cc': 'x@example.com'})
    with pytest.raises(pydantic.ValidationError):
        EmailConfig.model_validate({})


def test_the_method_is_registered() -> None:
    method = METHODS['email']
    assert isinstance(method, EmailMethod)
    assert method.prepare(EmailConfig(email=RECIPIENT)) == EmailTarget(recipient=RECIPIENT)


# -- transport security and login ----------------------------------------------------------------

async def test_starttls_trusting_the_ca_file(start_server: Any, server_tls: ssl.SSLContext, ca_file: str,
                                             http: aiohttp.ClientSession) -> None:
    server = await start_server(tls_context=server_tls, require_starttls=True)

    result = await deliver(http, smtp_settings(server.port, security='starttls', ca_file=ca_file))

    assert result.ok, result
    [mail] = server.recorder.mails
    assert mail.tls is True


async def test_starttls_without_the_ca_is_a_retryable_tls_error(
        start_server: Any, server_tls: ssl.SSLContext, http: aiohttp.ClientSession) -> None:
    server = await start_server(tls_context=server_tls, require_starttls=True)

    result = await deliver(http, smtp_settings(server.port, security='starttls'))

    assert not result.ok and result.retryable
    assert result.message.startswith(f"TLS error talking to SMTP server 127.0.0.1:{server.port}: ")
    assert result.message.endswith("certificate verify failed: unable to get local issuer certificate")
    assert server.recorder.mails == []


async def test_a_server_requiring_starttls_refuses_a_plain_client_finally(
        start_server: Any, server_tls: ssl.SSLContext, http: aiohttp.ClientSession) -> None:
    server = await start_server(tls_context=server_tls, require_starttls=True)

    result = await deliver(http, smtp_settings(server.port, security='none'))

    assert not result.ok and not result.retryable
    assert result.code == 530
    assert server.recorder.mails == []


async def test_starttls_demanded_but_not_offered(start_server: Any, ca_file: str,
                                                 http: aiohttp.ClientSession) -> None:
    server = await start_server()

    result = await deliver(http, smtp_settings(server.port, security='starttls', ca_file=ca_file))

    assert not result.ok and not result.retryable
    assert result.message == (f"SMTP server 127.0.0.1:{server.port} does not offer STARTTLS "
                              f"(--smtp-security starttls) (not retried)")


async def test_implicit_tls(start_server: Any, server_tls: ssl.SSLContext, ca_file: str,
                            http: aiohttp.ClientSession) -> None:
    server = await start_server(implicit_tls=server_tls)

    result = await deliver(http, smtp_settings(server.port, security='tls', ca_file=ca_file))

    assert result.ok, result
    [mail] = server.recorder.mails
    assert mail.tls is True


async def test_implicit_tls_checks_the_host_name(start_server: Any, ca: trustme.CA, ca_file: str,
                                                 http: aiohttp.ClientSession) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert('mail.elsewhere.example').configure_cert(context)
    server = await start_server(implicit_tls=context)

    result = await deliver(http, smtp_settings(server.port, security='tls', ca_file=ca_file))

    assert not result.ok and result.retryable
    assert 'TLS error' in result.message and "IP address mismatch" in result.message
    assert server.recorder.mails == []


async def test_a_missing_ca_file_is_a_clear_final_failure(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    result = await deliver(http, smtp_settings(1, security='tls', ca_file=str(tmp_path / 'missing.pem')))

    assert not result.ok and not result.retryable
    assert result.message == "cannot load the SMTP CA file (--smtp-ca-file): No such file or directory"


async def test_auth_over_starttls(start_server: Any, server_tls: ssl.SSLContext, ca_file: str,
                                  http: aiohttp.ClientSession) -> None:
    authenticator = Authenticator('mailer', PASSWORD)
    server = await start_server(tls_context=server_tls, require_starttls=True, authenticator=authenticator,
                                auth_required=True)  # auth_require_tls stays True: AUTH only after STARTTLS

    result = await deliver(http, smtp_settings(server.port, security='starttls', ca_file=ca_file,
                                               username='mailer', password=PASSWORD))

    assert result.ok, result
    [mail] = server.recorder.mails
    assert mail.tls is True and mail.login == 'mailer'
    assert [login for _, login in authenticator.attempts] == [b'mailer']


async def test_auth_over_implicit_tls(start_server: Any, server_tls: ssl.SSLContext, ca_file: str,
                                      http: aiohttp.ClientSession) -> None:
    # aiosmtpd only counts STARTTLS as TLS for AUTH; with implicit TLS the connection is TLS from the start.
    authenticator = Authenticator('mailer', PASSWORD)
    server = await start_server(implicit_tls=server_tls, authenticator=authenticator, auth_require_tls=False)

    result = await deliver(http, smtp_settings(server.port, security='tls', ca_file=ca_file,
                                               username='mailer', password=PASSWORD))

    assert result.ok, result
    [mail] = server.recorder.mails
    assert mail.tls is True and mail.login == 'mailer'
    assert [login for _, login in authenticator.attempts] == [b'mailer']


async def test_a_wrong_password_is_final_and_never_shown(start_server: Any, server_tls: ssl.SSLContext,
                                                         ca_file: str, http: aiohttp.ClientSession) -> None:
    server = await start_server(tls_context=server_tls, require_starttls=True,
                                authenticator=Authenticator('mailer', 'the-right-one'), auth_required=True)

    result = await deliver(http, smtp_settings(server.port, security='starttls', ca_file=ca_file,
                                               username='mailer', password=PASSWORD))

    assert not result.ok and not result.retryable
    assert result.code == 535
    assert result.message.startswith("SMTP server refused the login: 535 ")
    assert PASSWORD not in result.message and PASSWORD not in repr(result)
    assert server.recorder.mails == []


async def test_no_common_auth_mechanism_is_a_clear_final_failure(start_server: Any, server_tls: ssl.SSLContext,
                                                         ca_file: str, http: aiohttp.ClientSession) -> None:
    server = await start_server(tls_context=server_tls, require_starttls=True,
                                auth_exclude_mechanism=['LOGIN', 'PLAIN'])  # no mechanism left: no AUTH

    result = await deliver(http, smtp_settings(server.port, security='starttls', ca_file=ca_file,
                                               username='mailer', password=PASSWORD))

    assert not result.ok and not result.retryable
    assert result.message == (f"SMTP server 127.0.0.1:{server.port} offers no AUTH mechanism in common with "
                              f"reponotify (PLAIN, LOGIN or CRAM-MD5), and a user name is configured (not retried)")
    assert PASSWORD not in result.message
    assert server.recorder.mails == []


async def test_the_password_is_never_sent_without_tls(start_server: Any, http: aiohttp.ClientSession) -> None:
    # The server would take AUTH in clear text; the client must refuse to send the password that way.
    server = await start_server(authenticator=Authenticator('mailer', PASSWORD), auth_require_tls=False)

    result = await deliver(http, smtp_settings(server.port, username='mailer', password=PASSWORD))

    assert not result.ok and not result.retryable
    assert result.message == ("refusing to send the SMTP password without TLS: "
                              "set --smtp-security to starttls or tls")
    assert server.recorder.mails == []


def test_the_password_is_not_in_the_settings_repr() -> None:
    assert PASSWORD not in repr(smtp_settings(25, username='mailer', password=PASSWORD))


async def test_a_user_name_without_password_is_a_clear_failure(http: aiohttp.ClientSession) -> None:
    result = await deliver(http, smtp_settings(25, username='mailer'))
    assert not result.ok and not result.retryable
    assert "without a password" in result.message


# -- rejections and unreachable servers ----------------------------------------------------------

async def test_a_5xx_rejection_is_final_with_the_servers_code(start_server: Any, http: aiohttp.ClientSession) -> None:
    server = await start_server()
    server.recorder.script('RCPT', '550 5.1.1 <ops@example.com>: Recipient address rejected: User unknown')

    result = await deliver(http, smtp_settings(server.port))

    assert result == AttemptResult(
        ok=False, code=550, retryable=False,
        message="SMTP server refused the recipient: 550 5.1.1 <ops@example.com>: Recipient address rejected: "
                "User unknown (not retried)")


async def test_a_4xx_rejection_is_retryable(start_server: Any, http: aiohttp.ClientSession) -> None:
    server = await start_server()
    server.recorder.script('DATA', '451 4.3.0 Temporary local problem, try again later')

    result = await deliver(http, smtp_settings(server.port))

    assert result == AttemptResult(
        ok=False, code=451, retryable=True,
        message="SMTP server refused the mail: 451 4.3.0 Temporary local problem, try again later")


async def test_a_5xx_after_data_is_final(start_server: Any, http: aiohttp.ClientSession) -> None:
    server = await start_server()
    server.recorder.script('DATA', '554 5.7.1 Message rejected as spam')

    result = await deliver(http, smtp_settings(server.port))

    assert not result.ok and not result.retryable and result.code == 554


async def test_no_smtp_server_configured(http: aiohttp.ClientSession) -> None:
    result = await deliver(http, MethodSettings())
    assert result == AttemptResult(ok=False, retryable=False,
                                   message="no SMTP server is configured (--smtp-host): cannot send mail")


async def test_a_closed_port_is_retryable(http: aiohttp.ClientSession) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nobody listens there
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]

    result = await deliver(http, smtp_settings(port))

    assert not result.ok and result.retryable and result.code is None
    assert result.message.startswith(f"could not reach SMTP server 127.0.0.1:{port}: ")


async def test_a_silent_server_times_out_retryably(http: aiohttp.ClientSession) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never greets
        writer.close()

    server = await asyncio.start_server(silent, '127.0.0.1', 0)
    port = server.sockets[0].getsockname()[1]
    try:
        method = EmailMethod()
        context = DeliveryContext(http=http, delivery_id='d', timeout=0.3, settings=smtp_settings(port))
        result = await method.deliver(EmailTarget(RECIPIENT), push_event(), context)
    finally:
        server.close()
        await server.wait_closed()

    assert not result.ok and result.retryable
    assert result.message == f"SMTP server 127.0.0.1:{port} did not answer in time"


async def test_an_unusable_sender_is_a_clear_final_failure(http: aiohttp.ClientSession) -> None:
    settings = MethodSettings(smtp=SmtpSettings(host='127.0.0.1', port=25, sender='not an address'))
    result = await deliver(http, settings)
    assert not result.ok and not result.retryable
    assert result.message == "cannot build the mail: the configured sender (--smtp-from) is not one e-mail address"


# -- through the dispatcher: counted as the status shows it --------------------------------------

class NoSecrets:
    async def read(self, namespace: str, name: str, key: str) -> str:
        raise AssertionError("no secrets here")


async def run_delivery(settings: MethodSettings, *, retry_schedule: tuple[float, ...]) -> dict[str, Any]:
    key = NotificationKey('team-a', 'mail-ops')
    notification = await compile_notification(key, {
        'repository': 'acme/web', 'event': 'repo_push', 'method': 'email', 'config': {'email': RECIPIENT},
    }, NoSecrets())
    routing = RoutingTable()
    routing.put(notification)
    book = StatusBook()
    outbox = Outbox(':memory:')
    await outbox.open()
    dispatcher = Dispatcher(outbox, routing, book, DispatcherSettings(
        workers=1, retry_schedule=retry_schedule, timeout=5.0, methods=settings))
    await dispatcher.start()
    try:
        await outbox.accept(push_event(), [key])
        async with asyncio.timeout(10):
            while len(outbox):
                await asyncio.sleep(0.01)
    finally:
        await dispatcher.stop()
        await outbox.close()
    return book.status(key)


async def test_a_5xx_rejection_counts_as_one_final_failed_attempt(start_server: Any) -> None:
    server = await start_server()
    server.recorder.script('RCPT', '550 5.1.1 User unknown')

    status = await run_delivery(smtp_settings(server.port), retry_schedule=(0.01, 0.01))

    assert status['numberOfFailures'] == 1
    assert status['deliveries'] == {'succeeded': 0, 'failed': 1, 'dropped': 0}
    last = status['lastDelivery']
    assert (last['outcome'], last['attempts'], last['code']) == ('Failed', 1, 550)
    assert last['message'] == "SMTP server refused the recipient: 550 5.1.1 User unknown (not retried)"


async def test_a_4xx_rejection_is_retried_with_the_same_message_id(start_server: Any) -> None:
    server = await start_server()
    server.recorder.script('DATA', '451 4.7.1 Greylisted, try again')

    status = await run_delivery(smtp_settings(server.port), retry_schedule=(0.01, 0.01))

    last = status['lastDelivery']
    assert (last['outcome'], last['attempts'], last['code']) == ('Succeeded', 2, 250)
    assert status['deliveries'] == {'succeeded': 1, 'failed': 0, 'dropped': 0}
    assert [mail.reply[:3] for mail in server.recorder.mails] == ['451', '250']
    plain = server.recorder.mails[-1].parse().get_body(('plain',))
    assert plain is not None and ("You get this mail because the repository notification team-a/mail-ops sends "
                                  "repo_push events of acme/web to ops@example.com.") in plain.get_content()
    [message_id] = {mail.parse()['Message-ID'] for mail in server.recorder.mails}
    assert re.fullmatch(r'<[0-9a-f-]{36}@example\.com>', message_id)
