"""
Human-readable HTML messages for events, one Jinja2 template per kind.

Quay renders the same per-event HTML for e-mail bodies, Flowdock and HipChat
messages, and (converted to mrkdwn) Slack attachments. Autoescaping is on:
payload values such as commit messages come from users and must never inject
markup into a mail or a chat message.
"""
from collections.abc import Mapping
from typing import Any

import jinja2

from reponotify.events import Event

_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader('reponotify', 'messages'),
    autoescape=True,
    undefined=jinja2.ChainableUndefined,  # payloads are partial: a missing field renders empty
    trim_blocks=True,
    lstrip_blocks=True,
)


# Mail layouts and pages fill in values reponotify computed itself: a missing one is a bug, not "".
LAYOUTS = jinja2.Environment(
    loader=jinja2.PackageLoader('reponotify', 'messages'),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def safe_url(value: Any) -> str:
    """A link target from a payload: only http(s) URLs; anything else (javascript:, data:) becomes "#"."""
    text = str(value or '').strip()
    return text if text.lower().startswith(('http://', 'https://')) else '#'


_ENVIRONMENT.filters['safe_url'] = safe_url

# Which template and which verb each kind renders with.
_TEMPLATES: dict[str, tuple[str, str]] = {
    'repo_push': ('repo_push.html', ''),
    'build_queued': ('build.html', 'queued'),
    'build_start': ('build.html', 'started'),
    'build_success': ('build.html', 'completed'),
    'build_failure': ('build.html', 'failed'),
    'build_cancelled': ('build.html', 'was cancelled'),
    'vulnerability_found': ('vulnerability_found.html', ''),
    'repo_mirror_sync_started': ('repo_mirror.html', 'started'),
    'repo_mirror_sync_success': ('repo_mirror.html', 'succeeded'),
    'repo_mirror_sync_failed': ('repo_mirror.html', 'failed'),
    'repo_image_expiry': ('repo_image_expiry.html', ''),
}


def repository_url(payload: Mapping[str, Any]) -> str:
    """The repository page: build events' homepage points below it, at the build."""
    homepage = str(payload.get('homepage') or '')
    return homepage.split('/build/', 1)[0]


def render_html(event: Event) -> str:
    """The event's HTML message, whitespace-trimmed."""
    name, verb = _TEMPLATES[event.kind]
    template = _ENVIRONMENT.get_template(name)
    html = template.render(event=event.payload, verb=verb, repository_url=repository_url(event.payload))
    return ' '.join(html.split())
