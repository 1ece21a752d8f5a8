"""
The ``email`` method: one mail per event through the operator's SMTP server.

As in Quay, the subject is the event's summary and the body is the event's
HTML message (the per-kind template of :mod:`reponotify.messages`, so a mail
says what Slack, Flowdock and HipChat say). The mail is a
``multipart/alternative`` of a ``text/plain`` part, converted from that same
HTML message, and a ``text/html`` part, the message in the ``email.html``
layout. Both come from the one per-kind template: there is no second,
drifting plain-text template per kind. Payload values are escaped in HTML
(the templates are autoescaped): a commit message can never inject markup.

The ``Message-ID`` is derived from the delivery id, which is stable across
retries, so a receiver (or a person) can tell a retried mail from a new one.

The SMTP server is operator-wide (``--smtp-*`` options, see
:class:`~reponotify.methods.base.SmtpSettings`): no transport security,
STARTTLS (required: a server that does not offer it fails the attempt), or
implicit TLS; certificates are checked against the system CAs plus
``ca_file``. SMTP replies are classified as the dispatcher needs them: 5xx is
a final failure, 4xx and transport errors are retried. No message ever
contains the SMTP password.

Quay mails only addresses that were verified for the repository: the engine
holds deliveries to an address until it is verified (see
:mod:`reponotify.email_verification`, which sends its verification mail
through :func:`send_mail` here); this method itself just sends.
"""
import dataclasses
import datetime
import email.message
import email.policy
import email.utils
import functools
import html.parser
import os
import re
import ssl
from typing import Any, ClassVar

import aiosmtplib
import markupsafe
import pydantic

from reponotify.events import Event
from reponotify.messages import LAYOUTS, render_html
from reponotify.methods.base import AttemptResult, DeliveryContext, Method, MethodConfig, SmtpSettings

# An addr-spec without quoted local parts, comments or IP-literal domains, ASCII only (no SMTPUTF8):
# dot-atom local part (at most 64 characters), then a host name of at least two labels whose last
# label starts with a letter. Nothing here can break a header or an SMTP command (no spaces,
# commas, angle brackets, CR or LF).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LABEL = r'[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?'
_ADDRESS = re.compile(
    rf'(?P<local>{_ATEXT}+(?:\.{_ATEXT}+)*)@(?P<domain>(?:{_LABEL}\.)+[A-Za-z](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?)'
)
MAX_ADDRESS_LENGTH = 254  # RFC 5321's path limit less the angle brackets
MAX_LOCAL_LENGTH = 64

_MESSAGE_ID_UNSAFE = re.compile(r'[^A-Za-z0-9!#$%&\'*+/=?^_`{|}~.-]')
_REPLY_MAX = 200  # characters of an SMTP server's reply quoted in a message
MAX_SUBJECT_LENGTH = 250  # summaries quote payload values (a mirror's message): keep the subject a line

# CRLF line ends, 7-bit clean (non-ASCII text is quoted-printable or base64, headers use encoded
# words, so any server takes the mail, 8BITMIME or not), lines up to RFC 5322's hard limit of 998
# characters. With the recommended 78 the email package folds a long Subject right after
# "Subject:", which some parsers (Python's among them) read back with a leading space; summaries
# are clipped well below 998 instead. The mail is sent exactly as flattened with this policy.
_POLICY = email.policy.SMTP.clone(max_line_length=998, cte_type='7bit')
POLICY = _POLICY  # for the other mail reponotify sends (the verification mail)



def check_address(value: str) -> str:
    """Check that ``value`` is one plain e-mail address; the error says what is expected."""
    match = _ADDRESS.fullmatch(value)
    if match is None:
        raise ValueError("must be one e-mail address such as ops@example.com "
                         "(ASCII only, no display name, no spaces)")
    if len(value) > MAX_ADDRESS_LENGTH:
        raise ValueError(f"must be an e-mail address of at most {MAX_ADDRESS_LENGTH} characters")
    if len(match.group('local')) > MAX_LOCAL_LENGTH:
        raise ValueError(f"must be an e-mail address whose part before the @ has at most "
                         f"{MAX_LOCAL_LENGTH} characters")
    return value


class EmailConfig(MethodConfig):
    email: str = pydantic.Field(description="The address to mail.")

    @pydantic.field_validator('email')
    @classmethod
    def _address(cls, value: str) -> str:
        return check_address(value)


# -- the mail --------------------------------------------------------------------------------------

class _TextWriter(html.parser.HTMLParser):
    """Turns an event's HTML message into plain text: links as ``text <url>``, ``<br>`` as a line break."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._links: list[tuple[str, int]] = []  # (href, index of the first part inside the link)

    def handle_data(self, data: str) -> None:
        self.parts.append(data)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == 'br':
            self.parts.append('\n')
        elif tag == 'a':
            self._links.append((dict(attrs).get('href') or '', len(self.parts)))

    def handle_endtag(self, tag: str) -> None:
        if tag == 'a' and self._links:
            href, start = self._links.pop()
            text = ''.join(self.parts[start:]).strip()
            if href and href != text:
                self.parts.append(f' <{href}>')


def html_to_text(message: str) -> str:
    """The plain-text rendering of an event's HTML message (tags dropped, entities decoded)."""
    writer = _TextWriter()
    writer.feed(re.sub(r'\s*<br\s*/?>\s*', '<br>', ' '.join(message.split())))
    writer.close()
    lines = ''.join(writer.parts).split('\n')
    return '\n'.join(' '.join(line.split()) for line in lines).strip()


def message_id(delivery_id: str, sender_address: str) -> str:
    """``<delivery-id@sender-domain>``: the same for every attempt of one delivery."""
    left = _MESSAGE_ID_UNSAFE.sub('-', delivery_id).strip('.') or 'delivery'
    left = re.sub(r'\.{2,}', '.', left)
    domain = sender_address.rpartition('@')[2]
    if not re.fullmatch(rf'(?:{_LABEL}\.)*{_LABEL}', domain):
        domain = 'reponotify.invalid'
    return f'<{left}@{domain}>'


def single_line(text: str) -> str:
    """A header-safe one-line version of ``text`` (payload values may hold line breaks)."""
    return ' '.join(text.split())


def build_message(event: Event, *, sender: str, recipient: str, delivery_id: str,
                  notification: str | None = None,
                  date: datetime.datetime | None = None) -> email.message.EmailMessage:
    """
    The mail for one event (raises ValueError if ``sender`` is not a usable From header).

    ``notification`` ("namespace/name"), when known, is named in the footer, so a recipient
    can tell whom to ask to stop the mails.
    """
    summary = _clip(event.summary, MAX_SUBJECT_LENGTH)
    html_message = render_html(event)
    text = html_to_text(html_message)
    which = f"the repository notification {notification}" if notification else "a repository notification"
    footer = f"You get this mail because {which} sends {event.kind} events of {event.repository} to {recipient}."
    plain = f"{text}\n\n-- \n{footer}\n"
    rich = LAYOUTS.get_template('email.html').render(
        summary=summary, message=markupsafe.Markup(html_message), repository=event.repository,
        kind=event.kind, recipient=recipient, notification=notification)

    mail = email.message.EmailMessage(policy=_POLICY)
    mail['Subject'] = summary
    mail['From'] = sender
    sender_address = _single_address(mail['From'])
    mail['To'] = recipient
    mail['Date'] = email.utils.format_datetime(date or datetime.datetime.now(datetime.timezone.utc))
    mail['Message-ID'] = message_id(delivery_id, sender_address)
    mail['Auto-Submitted'] = 'auto-generated'  # RFC 3834: no vacation replies to notifications
    mail['X-Reponotify-Event'] = event.kind
    mail['X-Reponotify-Repository'] = single_line(event.repository)
    mail.set_content(plain, subtype='plain', charset='utf-8')
    mail.add_alternative(rich, subtype='html', charset='utf-8')
    for part in mail.iter_parts():
        del part['MIME-Version']  # the email package repeats it on parts; it belongs on the mail only
    return mail


def _single_address(header: Any) -> str:
    addresses: tuple[Any, ...] = tuple(getattr(header, 'addresses', ()))
    if len(addresses) != 1 or not addresses[0].addr_spec or '@' not in addresses[0].addr_spec:
        raise ValueError("the configured sender (--smtp-from) is not one e-mail address")
    return str(addresses[0].addr_spec)


# -- sending ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _tls_context(ca_file: str | None, _ca_file_version: int | None) -> ssl.SSLContext:
    context = ssl.create_default_context()  # system CAs, hostname checking, modern protocols
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """The client TLS context: system CAs plus ``ca_file``, cached until that file changes."""
    version = os.stat(ca_file).st_mtime_ns if ca_file else None
    return _tls_context(ca_file, version)


@dataclasses.dataclass(frozen=True)
class EmailTarget:
    recipient: str


class EmailMethod(Method):
    name: ClassVar[str] = 'email'
    config_model: ClassVar[type[MethodConfig]] = EmailConfig

    def prepare(self, config: MethodConfig) -> EmailTarget:
        assert isinstance(config, EmailConfig)
        return EmailTarget(recipient=config.email)

    def target_key(self, target: Any) -> str | None:
        return 'smtp'  # one SMTP server (--smtp-host) for every mail

    async def deliver(self, target: Any, event: Event, context: DeliveryContext) -> AttemptResult:
        assert isinstance(target, EmailTarget)
        smtp = context.settings.smtp
        problem = smtp_problem(smtp)
        if problem is not None:
            return problem
        try:
            mail = build_message(event, sender=smtp.sender, recipient=target.recipient,
                                 delivery_id=context.delivery_id, notification=_notification_name(context))
        except ValueError as exc:
            return AttemptResult(ok=False, retryable=False, message=f"cannot build the mail: {exc}")
        return await send_mail(mail, target.recipient, smtp, context.timeout)


def smtp_problem(smtp: SmtpSettings) -> AttemptResult | None:
    """Why no mail can be sent with these SMTP settings (a final failure), or None."""
    if not smtp.host:
        return AttemptResult(ok=False, retryable=False,
                             message="no SMTP server is configured (--smtp-host): cannot send mail")
    if smtp.username and smtp.password is None:
        return AttemptResult(ok=False, retryable=False,
                             message="an SMTP user name is configured without a password (--smtp-password-file)")
    if smtp.username and smtp.security == 'none':
        return AttemptResult(ok=False, retryable=False,
                             message="refusing to send the SMTP password without TLS: "
                                     "set --smtp-security to starttls or tls")
    return None


async def send_mail(mail: email.message.EmailMessage, recipient: str, smtp: SmtpSettings,
                    timeout: float) -> AttemptResult:
    """Send a built mail to one recipient through the SMTP server; every failure is a reported result."""
    problem = smtp_problem(smtp)
    if problem is not None:
        return problem
    try:
        sender_address = _single_address(mail['From'])
    except ValueError as exc:
        return AttemptResult(ok=False, retryable=False, message=f"cannot build the mail: {exc}")
    try:
        tls = tls_context(smtp.ca_file) if smtp.security in ('starttls', 'tls') else None
    except (OSError, ssl.SSLError) as exc:
        return AttemptResult(ok=False, retryable=False,
                             message=f"cannot load the SMTP CA file (--smtp-ca-file): {_reason(exc)}")
    try:
        return await _send(mail, sender_address, recipient, smtp, tls, timeout)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a reported result
        return _scrub(classify_error(exc, smtp), smtp.password)


def sender_address(mail: email.message.EmailMessage) -> str:
    """The address in a mail's From header (ValueError unless it is exactly one address)."""
    return _single_address(mail['From'])


def _notification_name(context: DeliveryContext) -> str | None:
    namespace, name = getattr(context, 'notification', None) or ('', '')
    return f"{namespace}/{name}" if namespace and name else None


class _Unsupported(Exception):
    """The server does not offer what the configuration demands (STARTTLS, AUTH)."""


async def _send(mail: email.message.EmailMessage, sender: str, recipient: str, smtp: SmtpSettings,
                tls: ssl.SSLContext | None, timeout: float) -> AttemptResult:
    assert smtp.host
    client = aiosmtplib.SMTP(hostname=smtp.host, port=smtp.port, use_tls=smtp.security == 'tls',
                             start_tls=False, tls_context=tls, timeout=timeout)
    async with client:
        await client.ehlo()
        if smtp.security == 'starttls':
            if not client.supports_extension('starttls'):
                raise _Unsupported("does not offer STARTTLS (--smtp-security starttls)")
            await client.starttls()
            await client.ehlo()  # RFC 3207: forget what was said before TLS, ask again
        if smtp.username:
            if not client.supports_extension('auth'):
                raise _Unsupported("does not offer AUTH, and a user name is configured")
            try:
                await client.login(smtp.username, smtp.password or '')
            except aiosmtplib.SMTPException as exc:
                if isinstance(exc, aiosmtplib.SMTPResponseException):
                    raise  # the server's own answer (535, ...): classified below
                raise _Unsupported("offers no AUTH mechanism in common with reponotify "
                                   "(PLAIN, LOGIN or CRAM-MD5), and a user name is configured") from None
        _, reply = await client.sendmail(sender, [recipient], mail.as_bytes(policy=_POLICY))
    return AttemptResult(ok=True, code=250, message=f"SMTP server accepted the mail: {_clip(reply)}")


def classify_error(exc: BaseException, smtp: SmtpSettings) -> AttemptResult:
    """Turn what aiosmtplib raised into an attempt result: 5xx final, 4xx and transport errors retried."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
        exc = exc.recipients[0]
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        step = {
            aiosmtplib.SMTPConnectResponseError: "refused the connection",
            aiosmtplib.SMTPRecipientRefused: "refused the recipient",
            aiosmtplib.SMTPSenderRefused: "refused the sender",
            aiosmtplib.SMTPDataError: "refused the mail",
            aiosmtplib.SMTPAuthenticationError: "refused the login",
            aiosmtplib.SMTPHeloError: "refused the greeting",
        }.get(type(exc), "answered")
        final = 500 <= exc.code < 600
        return AttemptResult(
            ok=False, code=exc.code, retryable=not final,
            message=f"SMTP server {step}: {exc.code} {_clip(exc.message)}" + (" (not retried)" if final else ""))
    if isinstance(exc, aiosmtplib.SMTPTimeoutError) or isinstance(exc, TimeoutError):
        return AttemptResult(ok=False, message=f"SMTP server {_where(smtp)} did not answer in time")
    if isinstance(exc, ssl.SSLError):
        return AttemptResult(ok=False, message=f"TLS error talking to SMTP server {_where(smtp)}: {_reason(exc)}")
    if isinstance(exc, _Unsupported):
        # A mismatch of configuration and server: retrying will not fix it.
        return AttemptResult(ok=False, retryable=False, message=f"SMTP server {_where(smtp)} {exc} (not retried)")
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return AttemptResult(ok=False, retryable=False,
                             message=f"SMTP server {_where(smtp)}: {_clip(exc.message)} (not retried)")
    if isinstance(exc, (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPServerDisconnected)):
        cause = exc.__cause__ if isinstance(exc.__cause__, ssl.SSLError) else None
        if cause is not None:
            return AttemptResult(ok=False, message=f"TLS error talking to SMTP server {_where(smtp)}: "
                                                   f"{_reason(cause)}")
        return AttemptResult(ok=False, message=f"could not reach SMTP server {_where(smtp)}: {_clip(exc.message)}")
    if isinstance(exc, aiosmtplib.SMTPException):
        return AttemptResult(ok=False, message=f"SMTP error with {_where(smtp)}: {_clip(exc.message)}")
    if isinstance(exc, OSError):
        return AttemptResult(ok=False, message=f"could not reach SMTP server {_where(smtp)}: {_reason(exc)}")
    return AttemptResult(ok=False, message=f"SMTP error with {_where(smtp)}: {type(exc).__name__}")


def _where(smtp: SmtpSettings) -> str:
    return f"{smtp.host}:{smtp.port}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        verify_message = getattr(exc, 'verify_message', None)
        if verify_message:
            return _clip(f"certificate verify failed: {verify_message}")
        return _clip(exc.reason or type(exc).__name__)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def _clip(text: Any, limit: int = _REPLY_MAX) -> str:
    line = single_line(str(text))
    return line if len(line) <= limit else line[:limit - 1] + '…'


def _scrub(result: AttemptResult, password: str | None) -> AttemptResult:
    """Belt and braces: a server reply or library message must never carry the password out."""
    if password and password in result.message:
        return dataclasses.replace(result, message=result.message.replace(password, '***'))
    return result
