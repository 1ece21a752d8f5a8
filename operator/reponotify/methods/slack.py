"""
The ``slack`` method: an incoming-webhook message shaped exactly as Quay's.

Body: ``{text: summary, username, attachments: [{fallback: summary, text,
color, mrkdwn_in: ["text"]}]}``, where the attachment text is the event's HTML
message converted to Slack mrkdwn: newlines become spaces, whitespace
collapses, ``<br>`` becomes a line break, links become ``<url|text>``, bold
``*x*``, italics ``_x_``, other tags are dropped. Unlike Quay, newlines turn
into spaces rather than vanishing, so bold text keeps its word boundaries
(``branch *main*``, not ``branch*main*``, which Slack would not render), and
``&``, ``<`` and ``>`` in text, the summary included, are escaped as Slack requires
(a payload field cannot mention ``<!channel>`` or add a link).

The incoming-webhook URL is a credential: ``url`` or ``urlFrom``.
"""
import html.parser
import re
from typing import Any, ClassVar

import pydantic

from reponotify.events import Event, Level
from reponotify.messages import render_html
from reponotify.methods.base import (AttemptResult, DeliveryContext, Method, MethodConfig, http_url, post_json,
                                     url_target_key)

COLOURS: dict[Level, str] = {
    Level.INFO: '#ffffff',
    Level.WARNING: 'warning',
    Level.ERROR: 'danger',
    Level.SUCCESS: 'good',
    Level.PRIMARY: 'good',
}


class SlackConfig(MethodConfig):
    secret_fields: ClassVar[tuple[str, ...]] = ('url',)
    url: pydantic.SecretStr
    username: str = pydantic.Field(default='reponotify', max_length=80)

    @pydantic.field_validator('url')
    @classmethod
    def _http_url(cls, value: pydantic.SecretStr) -> pydantic.SecretStr:
        http_url(value.get_secret_value())
        return value


class _MrkdwnWriter(html.parser.HTMLParser):
    """Turns the event's HTML message into Slack mrkdwn."""

    _MARKS = {'b': '*', 'strong': '*', 'i': '_', 'em': '_'}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(escape(data))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == 'a':
            # A URL from the payload must not end the link early or start another: its "|", "<" and ">"
            # are percent-encoded (the same URL to a browser).
            href = (dict(attrs).get('href') or '').replace('|', '%7C').replace('<', '%3C').replace('>', '%3E')
            self.parts.append(f"<{href}|")
        elif tag == 'br':
            self.parts.append('\n')
        elif tag in self._MARKS:
            self.parts.append(self._MARKS[tag])

    def handle_endtag(self, tag: str) -> None:
        if tag == 'a':
            self.parts.append('>')
        elif tag in self._MARKS:
            self.parts.append(self._MARKS[tag])


def escape(text: str) -> str:
    """Text for a Slack message: ``&``, ``<`` and ``>`` as entities, so that no mention or link comes of it."""
    return text.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')


def html_to_mrkdwn(message: str) -> str:
    """Convert an HTML message to Slack mrkdwn (see the module docstring for the rules)."""
    text = re.sub(r'\s+', ' ', message.replace('\n', ' ')).strip()
    text = re.sub(r'\s*<br\s*/?>\s*', '<br>', text)
    writer = _MrkdwnWriter()
    writer.feed(text)
    writer.close()
    return ''.join(writer.parts)


def slack_body(event: Event, username: str) -> dict[str, Any]:
    summary = escape(event.summary)  # it quotes payload fields (a mirror's message, a priority, ...)
    return {
        'text': summary,
        'username': username,
        'attachments': [{
            'fallback': summary,
            'text': html_to_mrkdwn(render_html(event)),
            'color': COLOURS[event.level],
            'mrkdwn_in': ['text'],
        }],
    }


class SlackMethod(Method):
    name: ClassVar[str] = 'slack'
    config_model: ClassVar[type[MethodConfig]] = SlackConfig

    def target_key(self, target: Any) -> str | None:
        return url_target_key(target.url.get_secret_value())

    async def deliver(self, target: Any, event: Event, context: DeliveryContext) -> AttemptResult:
        assert isinstance(target, SlackConfig)
        return await post_json(context, target.url.get_secret_value(), slack_body(event, target.username),
                               what='Slack')
