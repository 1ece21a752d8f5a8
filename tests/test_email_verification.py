"""
E-mail address verification, end to end with real peers: an SMTP server (aiosmtpd) on
loopback, the receiver over HTTP (the link in the mail is opened for real), standalone
mode run in-process, the engine directly, and the kopf operator against kmock's emulator.

An ``email`` notification's address must be verified for its repository before any event
mail goes to it: one verification mail with a link; until the link is opened the resource
is Ready=False EmailNotVerified and its events are held (accepted, durable, delivered once
verified, dropped past ``hold_max_age``).
"""
import asyncio
import concurrent.futures
import contextlib
import copy
import dataclasses
import email
import email.message
import email.policy
import json
import pathlib
import os
import re
import signal
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import kmock
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from click.testing import CliRunner

from kube_emulator import RN, VersionedKubernetesEmulator, declare_resources, namespace_paths
from conftest import eventually, free_port
from reponotify.cli import main
from reponotify.config import ReceiverSettings, Settings
from reponotify.dispatcher import DispatcherSettings
from reponotify.email_verification import VerificationSettings
from reponotify.engine import Engine, EngineSettings
from reponotify.events import new_event, sample_payload
from reponotify.kube.handlers import OperatorSettings, run_operator
from reponotify.methods.base import MethodSettings, SmtpSettings
from reponotify.models import API_VERSION, KIND, PLURAL
from reponotify.notifications import NotificationKey, compile_notification
from reponotify.receiver import make_app, serve
from reponotify.standalone import ManifestSecrets, run_standalone

SENDER = 'reponotify@example.com'
ADDRESS = 'ops@example.com'
REPOSITORY = 'acme/web'
KEY = NotificationKey('team-a', 'mail-ops')
TOKEN = r'[A-Za-z0-9_-]{16}\.[A-Za-z0-9_-]{43}'  # token_urlsafe(12) "." token_urlsafe(32)
TIME = r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC'
FAST = (0.01, 0.01, 0.01, 0.01)
TIMEOUT = 10.0
HELD = "Its events are held until then (each for at most 24h) and delivered once it is verified."


# -- a real SMTP server ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Mail:
    mail_from: str
    rcpt_tos: list[str]
    message: email.message.EmailMessage
    reply: str

    @property
    def plain(self) -> str:
        part = self.message.get_body(('plain',))
        assert part is not None
        return str(part.get_content()).replace('\r\n', '\n')  # as sent: CRLF line ends

    @property
    def html(self) -> str:
        part = self.message.get_body(('html',))
        assert part is not None
        return str(part.get_content())


class Recorder:
    """Records every mail; DATA replies can be scripted (then 250)."""

    def __init__(self) -> None:
        self.mails: list[Mail] = []
        self.data_replies: list[str] = []
        self.arrived = asyncio.Event()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = self.data_replies.pop(0) if self.data_replies else '250 2.0.0 Message accepted for delivery'
        assert isinstance(envelope.content, bytes)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, email.message.EmailMessage)
        self.mails.append(Mail(str(envelope.mail_from), list(envelope.rcpt_tos), message, reply))
        self.arrived.set()
        return reply

    @property
    def accepted(self) -> list[Mail]:
        return [mail for mail in self.mails if mail.reply.startswith('250')]

    async def wait_for(self, count: int, timeout: float = TIMEOUT) -> list[Mail]:
        """Wait until ``count`` mails were accepted; fail the test otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.accepted) < count:
            if loop.time() > deadline:
                pytest.fail(f"expected {count} mails, got {len(self.accepted)}: "
                            f"{[mail.message['Subject'] for mail in self.accepted]}")
            self.arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), 0.1)
        return list(self.accepted)


@dataclasses.dataclass
class SmtpServer:
    recorder: Recorder
    port: int


@pytest.fixture
async def smtp() -> AsyncIterator[SmtpServer]:
    loop = asyncio.get_running_loop()
    recorder = Recorder()
    server = await loop.create_server(lambda: SMTP(recorder, hostname='mail.test', loop=loop), '127.0.0.1', 0)
    yield SmtpServer(recorder, server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()






def engine_settings(smtp_port: int, *, public_url: str | None, **verification: Any) -> EngineSettings:
    methods = MethodSettings(smtp=SmtpSettings(host='127.0.0.1', port=smtp_port, sender=SENDER))
    verification.setdefault('hold_interval', 0.05)
    return EngineSettings(
        dispatcher=DispatcherSettings(workers=4, retry_schedule=FAST, timeout=5.0, methods=methods),
        status_interval=0.0,
        verification=VerificationSettings(public_url=public_url, **verification))


def ready(status: dict[str, Any]) -> tuple[str, str, str]:
    [condition] = [c for c in status['conditions'] if c['type'] == 'Ready']
    return condition['status'], condition['reason'], condition['message']


def the_link(mail: Mail, public_url: str) -> str:
    """The verification link, checked to be the same in both parts of the mail."""
    [link] = re.findall(rf'{re.escape(public_url)}/v1/verify/{TOKEN}', mail.plain)
    assert f'<a href="{link}">{link}</a>' in mail.html
    return link


def expected_verification_text(link: str, expires: str, which: str = f"the repository notification {KEY}") -> str:
    return (
        f"reponotify was asked to mail notifications of events in the repository acme/web to ops@example.com "
        f"({which}).\n"
        f"\n"
        f"Before it mails any, it needs to know that this address wants them. To confirm, open this link "
        f"(it works once, until {expires}):\n"
        f"\n"
        f"{link}\n"
        f"\n"
        f"Until then nothing is mailed to this address: events wait for at most 24h, then they are dropped.\n"
        f"\n"
        f"If you did not expect this mail, ignore it: unless the link is opened, no notification is mailed "
        f"to you.\n"
    )


def check_verification_mail(mail: Mail, public_url: str) -> str:
    """Check the whole verification mail; returns its link."""
    assert (mail.mail_from, mail.rcpt_tos) == (SENDER, [ADDRESS])
    message = mail.message
    assert message['Subject'] == "Verify your e-mail address for notifications of acme/web"
    assert (message['From'], message['To']) == (SENDER, ADDRESS)
    assert message['Auto-Submitted'] == 'auto-generated'
    assert message['X-Reponotify-Repository'] == REPOSITORY
    assert re.fullmatch(r'<verify-[0-9a-f-]{36}@example\.com>', message['Message-ID'])
    link = the_link(mail, public_url)
    [expires] = re.findall(rf'until ({TIME})', mail.plain)
    assert mail.plain == expected_verification_text(link, expires)
    return link


def check_event_mail(mail: Mail, payload: dict[str, Any]) -> None:
    assert (mail.mail_from, mail.rcpt_tos) == (SENDER, [ADDRESS])
    assert mail.message['Subject'] == new_event('repo_push', payload).summary
    assert mail.message['X-Reponotify-Event'] == 'repo_push'
    assert mail.plain.endswith(f"-- \nYou get this mail because the repository notification {KEY} sends "
                               f"repo_push events of acme/web to ops@example.com.\n")


async def get(url: str) -> tuple[int, str, dict[str, str]]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.text(), dict(response.headers)


async def post_event(base_url: str, payload: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.post(f'{base_url}/v1/events/repo_push',
                                                          json=payload) as response:
        body = await response.json()
        assert response.status == 202, body
        return body


def page_text(page: str) -> str:
    """The words of an HTML page's body, tags dropped."""
    body = page.split('<main', 1)[1]
    return ' '.join(re.sub(r'<[^>]+>', ' ', body.split('>', 1)[1]).split())


def push(tag: str) -> dict[str, Any]:
    payload = sample_payload('repo_push', REPOSITORY)
    payload['updated_tags'] = [tag]
    return payload


# -- standalone mode -------------------------------------------------------------------------------

MANIFEST = textwrap.dedent(f"""\
    apiVersion: reponotify.dev/v1alpha1
    kind: RepositoryNotification
    metadata: {{name: {KEY.name}, namespace: {KEY.namespace}}}
    spec:
      repository: {REPOSITORY}
      event: repo_push
      method: email
      config: {{email: {ADDRESS}}}
    """)


@contextlib.asynccontextmanager
async def standalone(folder: pathlib.Path, state_dir: pathlib.Path, port: int,
                     engine: EngineSettings) -> AsyncIterator[str]:
    settings = Settings(receiver=ReceiverSettings(host='127.0.0.1', port=port), engine=engine, state_dir=state_dir,
                        shutdown_grace=1.0)
    stop, started = asyncio.Event(), asyncio.Event()
    service = asyncio.create_task(run_standalone(settings, folder, stop=stop, started=started))
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait([service, waiter], timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    if service.done():
        waiter.cancel()
        service.result()
    assert started.is_set(), "standalone mode did not start"
    try:
        yield f'http://127.0.0.1:{port}'
    finally:
        stop.set()
        await service


async def standalone_status(base_url: str) -> dict[str, Any]:
    status, body, _ = await get(f'{base_url}/v1/notifications')
    assert status == 200
    [item] = json.loads(body)['items']
    return dict(item['status'])


@pytest.fixture
def folder(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / 'manifests'
    path.mkdir()
    (path / 'mail.yaml').write_text(MANIFEST)
    return path


async def test_events_wait_for_the_link_then_go_out_and_the_link_works_once(
        smtp: SmtpServer, folder: pathlib.Path, tmp_path: pathlib.Path) -> None:
    port = free_port()
    public_url = f'http://127.0.0.1:{port}'
    async with standalone(folder, tmp_path / 'state', port, engine_settings(smtp.port, public_url=public_url)) as url:
        # One verification mail, and nothing else.
        [mail] = await smtp.recorder.wait_for(1)
        link = check_verification_mail(mail, public_url)
        status = await eventually(lambda: _sent_condition(url), "the condition naming the sent mail")
        [sent, valid_until] = re.findall(TIME, ready(status)[2])
        assert ready(status) == ('False', 'EmailNotVerified', (
            f"ops@example.com is not verified for acme/web: a verification mail was sent to ops@example.com at "
            f"{sent}; open the link in it (valid until {valid_until}) to receive these notifications. {HELD}"))
        assert valid_until in mail.plain

        # Events are accepted, counted, and held: no event mail.
        payloads = [push('v1'), push('v2')]
        answers = [await post_event(url, payload) for payload in payloads]
        assert [answer['matched'] for answer in answers] == [1, 1]
        await asyncio.sleep(0.5)  # many hold checks (every 0.05 s) come and go
        assert len(smtp.recorder.mails) == 1
        status = await standalone_status(url)
        assert ready(status)[1] == 'EmailNotVerified'
        assert status['deliveries'] == {'succeeded': 0, 'failed': 0, 'dropped': 0}
        assert status['lastDelivery'] is None

        # Opening the link verifies the address: a page saying so, then the held events go out.
        code, page, headers = await get(link)
        assert code == 200
        assert headers['Content-Type'] == 'text/html; charset=utf-8'
        assert headers['Cache-Control'] == 'no-store'
        assert page_text(page) == ("Address verified ops@example.com is verified for notifications of the "
                                   "repository acme/web . Events held for this address are being delivered now, "
                                   "and later ones will be mailed as they happen.")
        mails = await smtp.recorder.wait_for(3)
        events = sorted(mails[1:], key=lambda mail: mail.message['Subject'])
        for mail, payload in zip(events, sorted(payloads, key=lambda p: new_event('repo_push', p).summary)):
            check_event_mail(mail, payload)
        assert len({mail.message['Message-ID'] for mail in mails}) == 3

        status = await eventually(
            lambda: _status_where(url, lambda s: s['deliveries']['succeeded'] == 2), "two succeeded deliveries")
        assert ready(status) == ('True', 'Accepted', 'Routing repo_push events of acme/web to email')
        assert {record['eventId'] for record in status['recentDeliveries']} == {a['id'] for a in answers}

        # The link works once.
        code, page, _ = await get(link)
        assert code == 410
        assert page_text(page) == ("Link already used This verification link has already been used. If it "
                                   "verified the address, notifications are on their way: there is nothing more "
                                   "to do.")

        # Later events go out at once.
        await post_event(url, push('v3'))
        [*_, later] = await smtp.recorder.wait_for(4)
        check_event_mail(later, push('v3'))
        assert len(smtp.recorder.mails) == 4


async def _status_where(url: str, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    status = await standalone_status(url)
    return status if check(status) else None


async def _sent_condition(url: str) -> dict[str, Any] | None:
    return await _status_where(url, lambda s: 'a verification mail was sent' in ready(s)[2])


async def test_held_events_survive_a_restart_which_sends_no_second_mail(
        smtp: SmtpServer, folder: pathlib.Path, tmp_path: pathlib.Path) -> None:
    port = free_port()
    public_url = f'http://127.0.0.1:{port}'
    settings = engine_settings(smtp.port, public_url=public_url)
    async with standalone(folder, tmp_path / 'state', port, settings) as url:
        [mail] = await smtp.recorder.wait_for(1)
        link = the_link(mail, public_url)
        await eventually(lambda: _sent_condition(url), "the condition naming the sent mail")
        await post_event(url, push('v1'))
        await asyncio.sleep(0.2)

    async with standalone(folder, tmp_path / 'state', port, settings) as url:
        status = await standalone_status(url)
        assert ready(status)[:2] == ('False', 'EmailNotVerified')
        assert 'a verification mail was sent to ops@example.com' in ready(status)[2]
        await asyncio.sleep(0.3)
        assert len(smtp.recorder.mails) == 1  # the open link is not mailed again

        code, _, _ = await get(link)
        assert code == 200
        [_, event_mail] = await smtp.recorder.wait_for(2)
        check_event_mail(event_mail, push('v1'))
        await eventually(lambda: _status_where(url, lambda s: ready(s)[1] == 'Accepted'), "Accepted")

    # Verified for good: a third start mails nothing but events, and says Accepted at once.
    async with standalone(folder, tmp_path / 'state', port, settings) as url:
        assert ready(await standalone_status(url)) == ('True', 'Accepted',
                                                       'Routing repo_push events of acme/web to email')
        await post_event(url, push('v2'))
        [*_, event_mail] = await smtp.recorder.wait_for(3)
        check_event_mail(event_mail, push('v2'))


async def test_without_verification_events_are_mailed_right_away(
        smtp: SmtpServer, folder: pathlib.Path, tmp_path: pathlib.Path) -> None:
    port = free_port()
    settings = engine_settings(smtp.port, public_url=f'http://127.0.0.1:{port}', enabled=False)
    async with standalone(folder, tmp_path / 'state', port, settings) as url:
        assert ready(await standalone_status(url)) == ('True', 'Accepted',
                                                       'Routing repo_push events of acme/web to email')
        await post_event(url, push('v1'))
        [mail] = await smtp.recorder.wait_for(1)
        check_event_mail(mail, push('v1'))

        code, page, _ = await get(f'{url}/v1/verify/abc.def')
        assert code == 404
        assert page_text(page) == ("Nothing to verify E-mail address verification is turned off on this "
                                   "reponotify.")
    assert len(smtp.recorder.mails) == 1


# -- the engine directly, with the receiver over HTTP ------------------------------------------------

class NoSink:
    async def write(self, key: NotificationKey, status: dict[str, Any]) -> None:
        pass


@dataclasses.dataclass
class Running:
    engine: Engine
    url: str
    transitions: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # of KEY's Ready

    def ready(self) -> tuple[str, str, str]:
        return ready(self.engine.book.status(KEY))


@pytest.fixture
async def start_engine(tmp_path: pathlib.Path) -> AsyncIterator[Callable[..., Any]]:
    """Start an engine with one e-mail notification and its receiver on a free port."""
    runners: list[tuple[Engine, Any]] = []

    async def start(settings: Callable[[str], EngineSettings], clock: Callable[[], float] | None = None) -> Running:
        port = free_port()
        url = f'http://127.0.0.1:{port}'
        transitions: list[tuple[str, str, str]] = []
        engine = Engine(settings(url), outbox_path=tmp_path / 'outbox.sqlite3', on_transition=lambda key, old, new: (
            transitions.append((new.status, new.reason, new.message)) if key == KEY else None))
        if clock is not None:
            assert engine.verification is not None
            engine.verification.clock = clock
        await engine.start(NoSink())
        engine.admit(await compile_notification(KEY, {
            'repository': REPOSITORY, 'event': 'repo_push', 'method': 'email', 'config': {'email': ADDRESS},
        }, ManifestSecrets({})))
        runner = await serve(make_app(engine), '127.0.0.1', port)
        runners.append((engine, runner))
        return Running(engine, url, transitions)

    yield start
    for engine, runner in runners:
        await runner.cleanup()
        await engine.stop()


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_an_expired_link_is_refused_with_a_clear_page(smtp: SmtpServer, start_engine: Any) -> None:
    clock = Clock()
    running = await start_engine(lambda url: engine_settings(smtp.port, public_url=url, link_ttl=3600), clock)
    [mail] = await smtp.recorder.wait_for(1)
    link = the_link(mail, running.url)

    clock.now += 3600
    code, page, headers = await get(link)
    assert code == 410
    assert headers['Content-Type'] == 'text/html; charset=utf-8'
    assert page_text(page) == ("Link expired This verification link has expired: ask for a new one. A new link is "
                               "mailed when the next event for the notification arrives, when the notification "
                               "changes, or when reponotify restarts.")
    assert running.ready()[1] == 'EmailNotVerified'

    # As the page says: the next event mails a new link (and is held until it is opened).
    await post_event(running.url, push('v1'))
    [_, second] = await smtp.recorder.wait_for(2)
    new_link = the_link(second, running.url)
    assert new_link != link
    code, _, _ = await get(new_link)
    assert code == 200
    [*_, event_mail] = await smtp.recorder.wait_for(3)
    check_event_mail(event_mail, push('v1'))
    assert running.ready()[1] == 'Accepted'


@pytest.mark.parametrize('token', ['nonsense', 'abc.def', 'a' * 16 + '.' + 'b' * 43, 'x' * 300])
async def test_an_unknown_link_is_a_404_page(smtp: SmtpServer, start_engine: Any, token: str) -> None:
    running = await start_engine(lambda url: engine_settings(smtp.port, public_url=url))
    code, page, _ = await get(f'{running.url}/v1/verify/{token}')
    assert code == 404
    assert page_text(page) == ("Unknown link This verification link is not known (mistyped, replaced by newer "
                               "links, or long expired). Copy the whole link from the mail; if several mails came, "
                               "use the newest one.")
    assert running.ready()[1] == 'EmailNotVerified'


async def test_a_head_request_does_not_use_the_link(smtp: SmtpServer, start_engine: Any) -> None:
    running = await start_engine(lambda url: engine_settings(smtp.port, public_url=url))
    [mail] = await smtp.recorder.wait_for(1)
    link = the_link(mail, running.url)
    async with aiohttp.ClientSession() as http, http.head(link) as response:
        assert response.status == 405
    code, _, _ = await get(link)
    assert code == 200


async def test_held_events_older_than_the_max_age_are_dropped(smtp: SmtpServer, start_engine: Any) -> None:
    running = await start_engine(lambda url: engine_settings(smtp.port, public_url=url, hold_max_age=0.3))
    [mail] = await smtp.recorder.wait_for(1)
    accepted = await post_event(running.url, push('v1'))

    status = await eventually(lambda: (s := running.engine.book.status(KEY))['deliveries']['dropped'] == 1 and s,
                              "the held delivery to be dropped")
    last = status['lastDelivery']
    assert (last['eventId'], last['outcome'], last['attempts']) == (accepted['id'], 'Dropped', 0)
    assert last['message'] == ("Dropped: ops@example.com was not verified for acme/web within 0.3s of the event "
                               "(events wait that long for the link in the verification mail to be opened)")
    assert len(running.engine.outbox) == 0
    assert running.ready()[1] == 'EmailNotVerified'

    code, _, _ = await get(the_link(mail, running.url))
    assert code == 200
    assert running.ready()[1] == 'Accepted'
    await asyncio.sleep(0.2)
    assert len(smtp.recorder.mails) == 1  # a dropped event stays dropped


async def test_a_verification_mail_that_fails_is_retried(smtp: SmtpServer, start_engine: Any) -> None:
    smtp.recorder.data_replies = ['451 4.7.1 Greylisted, try again']
    running = await start_engine(lambda url: engine_settings(smtp.port, public_url=url, retry_schedule=(0.2,)))
    [mail] = await smtp.recorder.wait_for(1)
    assert [m.reply[:3] for m in smtp.recorder.mails] == ['451', '250']
    assert smtp.recorder.mails[0].plain == mail.plain  # the same link, retried
    await eventually(lambda: 'a verification mail was sent' in running.ready()[2], "the condition naming the mail")

    sending, failed, sent = running.transitions
    assert sending == ('False', 'EmailNotVerified', (
        f"ops@example.com is not verified for acme/web: sending it a verification mail; open the link in it to "
        f"receive these notifications. {HELD}"))
    [retry_at] = re.findall(TIME, failed[2])
    assert failed == ('False', 'EmailNotVerified', (
        f"ops@example.com is not verified for acme/web, and the verification mail could not be sent to it: "
        f"SMTP server refused the mail: 451 4.7.1 Greylisted, try again; retrying at {retry_at}. {HELD}"))
    assert sent[:2] == ('False', 'EmailNotVerified') and 'a verification mail was sent' in sent[2]


async def test_without_a_public_url_the_condition_says_what_to_set(smtp: SmtpServer, start_engine: Any) -> None:
    running = await start_engine(lambda url: engine_settings(smtp.port, public_url=None))
    assert running.ready() == ('False', 'EmailNotVerified', (
        "ops@example.com is not verified for acme/web, and no verification mail can be sent: reponotify has no "
        "--public-url (its receiver's address as the recipient reaches it, for the link). Set it, or turn "
        "verification off with --no-email-verification. Events are held for at most 24h."))
    await post_event(running.url, push('v1'))
    await asyncio.sleep(0.3)
    assert smtp.recorder.mails == []
    assert len(running.engine.outbox) == 1  # held, not lost


async def test_one_mail_for_two_notifications_of_the_same_address(smtp: SmtpServer, start_engine: Any) -> None:
    running = await start_engine(lambda url: engine_settings(smtp.port, public_url=url))
    other = NotificationKey('team-b', 'mail-too')
    running.engine.admit(await compile_notification(other, {
        'repository': REPOSITORY, 'event': 'repo_push', 'method': 'email', 'config': {'email': 'ops@EXAMPLE.com'},
    }, ManifestSecrets({})))
    [mail] = await smtp.recorder.wait_for(1)
    await asyncio.sleep(0.2)
    assert len(smtp.recorder.mails) == 1
    assert ready(running.engine.book.status(other))[1] == 'EmailNotVerified'

    code, _, _ = await get(the_link(mail, running.url))
    assert code == 200
    assert running.ready()[1] == 'Accepted'
    assert ready(running.engine.book.status(other))[1] == 'Accepted'


async def test_other_methods_are_not_held(smtp: SmtpServer, start_engine: Any, http_target: Any) -> None:
    running = await start_engine(lambda url: engine_settings(smtp.port, public_url=url))
    hook = NotificationKey('team-a', 'hook')
    running.engine.admit(await compile_notification(hook, {
        'repository': REPOSITORY, 'event': 'repo_push', 'method': 'webhook',
        'config': {'url': f'{http_target.url}/hook'},
    }, ManifestSecrets({})))
    assert ready(running.engine.book.status(hook))[1] == 'Accepted'
    accepted = await post_event(running.url, push('v1'))
    assert accepted['matched'] == 2
    await http_target.wait_for(1, '/hook')
    await eventually(lambda: len(running.engine.outbox) == 1, "the webhook delivery to complete")
    await asyncio.sleep(0.2)
    assert len(running.engine.outbox) == 1  # only the mail waits
    assert smtp.recorder.mails[1:] == []


# -- the operator ----------------------------------------------------------------------------------

NS = 'team-a'


async def test_operator_shows_email_not_verified_then_accepted(smtp: SmtpServer, tmp_path: pathlib.Path) -> None:
    port = free_port()
    public_url = f'http://127.0.0.1:{port}'
    with namespace_paths():
        async with VersionedKubernetesEmulator() as kube, kmock.Server(kube) as server:
            declare_resources(kube)
            client = server.client

            async def call(method: str, path: str, body: Any) -> dict[str, Any]:
                async with client.request(method, path, json=body) as response:
                    answer = await response.json()
                    assert response.status == 200, answer
                    return dict(answer)

            def status() -> dict[str, Any]:
                try:
                    obj = kube.objects[RN, NS, KEY.name]
                except KeyError:
                    return {}
                return copy.deepcopy(obj.raw.get('status') or {})

            def events() -> list[tuple[str, str, str]]:
                return [(obj.raw['type'], obj.raw['reason'], obj.raw['message'])
                        for (resource, namespace, _), obj in list(kube.objects.items())
                        if resource.plural == 'events' and namespace == NS
                        and obj.raw.get('involvedObject', {}).get('name') == KEY.name]

            await call('POST', '/api/v1/namespaces', {'apiVersion': 'v1', 'kind': 'Namespace',
                                                       'metadata': {'name': NS}})
            settings = Settings(receiver=ReceiverSettings(host='127.0.0.1', port=port),
                                engine=engine_settings(smtp.port, public_url=public_url),
                                state_dir=tmp_path, shutdown_grace=1.0)
            options = OperatorSettings(common=settings, kube_api_url=str(server.url))
            stop_flag, ready_flag = threading.Event(), threading.Event()
            executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='operator')
            done = asyncio.get_running_loop().run_in_executor(executor, lambda: asyncio.run(run_operator(
                options, namespaces=[NS], stop_flag=stop_flag, ready_flag=ready_flag)))  # type: ignore[arg-type]
            try:
                await eventually(lambda: ready_flag.is_set() or done.done(), "the operator to be ready")
                assert not done.done(), done.result()
                await call('POST', f'/apis/{API_VERSION}/namespaces/{NS}/{PLURAL}', {
                    'apiVersion': API_VERSION, 'kind': KIND, 'metadata': {'name': KEY.name, 'namespace': NS},
                    'spec': {'repository': REPOSITORY, 'event': 'repo_push', 'method': 'email',
                             'config': {'email': ADDRESS}}})

                [mail] = await smtp.recorder.wait_for(1)
                link = check_verification_mail(mail, public_url)
                written = await eventually(lambda: 'a verification mail was sent' in ready(status() or {
                    'conditions': [{'type': 'Ready', 'status': '', 'reason': '', 'message': ''}]})[2] and status(),
                    "EmailNotVerified naming the sent mail in the resource's status")
                assert ready(written)[:2] == ('False', 'EmailNotVerified')
                assert written['observedGeneration'] == 1
                await eventually(lambda: ('Warning', 'EmailNotVerified', ready(written)[2]) in events(),
                                 "the EmailNotVerified Event")

                await post_event(public_url, push('v1'))
                await asyncio.sleep(0.3)
                assert len(smtp.recorder.mails) == 1

                code, _, _ = await get(link)
                assert code == 200
                [_, event_mail] = await smtp.recorder.wait_for(2)
                check_event_mail(event_mail, push('v1'))
                written = await eventually(
                    lambda: (s := status()) and ready(s)[1] == 'Accepted' and s['deliveries']['succeeded'] == 1 and s,
                    "Accepted and one delivery in the resource's status")
                assert ready(written) == ('True', 'Accepted', 'Routing repo_push events of acme/web to email')
                assert written['observedGeneration'] == 1
                await eventually(lambda: ('Normal', 'Accepted', 'Routing repo_push events of acme/web to email')
                                 in events(), "the Accepted Event")
            finally:
                stop_flag.set()
                await asyncio.wait_for(done, TIMEOUT)
                executor.shutdown(wait=True)


# -- the command line ------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def command_line(smtp_port: int, state_dir: pathlib.Path, folder: pathlib.Path,
                       **variables: str) -> AsyncIterator[str]:
    """``reponotify standalone`` as a subprocess, configured only through REPONOTIFY_* variables."""
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith('REPONOTIFY_')}
    env.update(REPONOTIFY_HOST='127.0.0.1', REPONOTIFY_PORT=str(port), REPONOTIFY_STATE_DIR=str(state_dir),
               REPONOTIFY_MANIFESTS=str(folder), REPONOTIFY_SMTP_HOST='127.0.0.1',
               REPONOTIFY_SMTP_PORT=str(smtp_port), REPONOTIFY_SMTP_FROM=SENDER, **variables)
    process = await asyncio.create_subprocess_exec(sys.executable, '-m', 'reponotify', 'standalone', env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    url = f'http://127.0.0.1:{port}'

    async def healthy() -> bool:
        if process.returncode is not None:
            _, stderr = await process.communicate()
            pytest.fail(f"reponotify standalone exited: {stderr.decode()}")
        with contextlib.suppress(aiohttp.ClientError):
            return (await get(f'{url}/healthz'))[0] == 200
        return False
    try:
        await eventually(healthy, "reponotify standalone to listen", timeout=30)
        yield url
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.communicate(), 30)


async def test_command_line_options(smtp: SmtpServer, folder: pathlib.Path, tmp_path: pathlib.Path) -> None:
    # --public-url (REPONOTIFY_PUBLIC_URL) is where the link points, as recipients reach the receiver.
    async with command_line(smtp.port, tmp_path / 'one', folder,
                            REPONOTIFY_PUBLIC_URL='https://reponotify.example.com/',
                            REPONOTIFY_EMAIL_HOLD_MAX_AGE='90m') as url:
        [mail] = await smtp.recorder.wait_for(1, timeout=30)
        link = the_link(mail, 'https://reponotify.example.com')
        assert 'events wait for at most 90m, then they are dropped' in mail.plain
        code, _, _ = await get(link.replace('https://reponotify.example.com', url))
        assert code == 200

    # --no-email-verification (REPONOTIFY_NO_EMAIL_VERIFICATION): events are mailed at once.
    async with command_line(smtp.port, tmp_path / 'two', folder, REPONOTIFY_NO_EMAIL_VERIFICATION='true') as url:
        await post_event(url, push('v1'))
        [_, mail] = await smtp.recorder.wait_for(2, timeout=30)
        check_event_mail(mail, push('v1'))


@pytest.mark.parametrize('option, value, message', [
    ('--public-url', 'ftp://example.com', "must be an http(s) URL with a host and no query"),
    ('--public-url', 'https://example.com/?a=b', "must be an http(s) URL with a host and no query"),
    ('--email-hold-max-age', '0s', "must be one positive duration"),
    ('--email-hold-max-age', 'soon', "'soon' is not a duration"),
])
def test_bad_option_values_are_clear_errors(folder: pathlib.Path, option: str, value: str, message: str) -> None:
    result = CliRunner().invoke(main, ['standalone', '--manifests', str(folder), option, value])
    assert result.exit_code == 2
    assert message in result.output
