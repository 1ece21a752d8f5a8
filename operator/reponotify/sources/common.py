"""
What every registry adapter shares: the normalised result and the Quay payload fields.

An adapter is a pure function from a parsed JSON body to a :class:`Normalised`:
the Quay events to ingest (kind, payload, idempotency key) and, for people
reading the receiver's answer, what was ignored and why. A body that is not
what the source sends raises :class:`Malformed` (the receiver answers 422);
anything else that parses is answered 2xx, even when every part of it is
ignored, because registries retry what is not (Docker Distribution retries the
first undelivered event forever and holds back every later one).
"""
import dataclasses
import hashlib
import json
import re
import string
from collections.abc import Callable, Mapping
from typing import Any, TypeGuard
from urllib.parse import SplitResult, urlsplit

from reponotify.models import REPOSITORY_PATTERN

_REPOSITORY = re.compile(REPOSITORY_PATTERN)
# A tag as the OCI distribution spec defines it.
_TAG = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$')
# A registry host as it may appear in docker_url: a DNS name or IPv4 address, or a bracketed IPv6 address,
# with an optional port. Anything else (a Host header with a path, spaces, markup) is not used.
_LABEL = r'[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?'
_HOST = re.compile(rf'^(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?$')
HOMEPAGE_FIELDS = ('repository', 'namespace', 'name', 'host')
MAX_KEY_ID = 200  # longer source ids are hashed into the idempotency key


class Malformed(ValueError):
    """The body is not what this source sends (the receiver answers 422 with this message)."""


@dataclasses.dataclass(frozen=True)
class SourceEvent:
    """
    One Quay event made from a source's body: kind, payload and idempotency key.

    ``claims`` are the keys of the source events coalesced into this one (a Docker
    Distribution envelope with several tags of one repository), each recorded with it
    so that none is delivered twice; ``without`` rebuilds the event without the parts
    whose keys an earlier event already holds (None when nothing is left).
    """
    kind: str
    payload: dict[str, Any]
    idempotency_key: str | None
    claims: tuple[str, ...] = ()
    without: Callable[[frozenset[str]], 'SourceEvent | None'] | None = dataclasses.field(
        default=None, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class Ignored:
    """A part of a body that makes no event, with the reason (shown in the receiver's answer)."""
    reason: str
    id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {'id': self.id, 'reason': self.reason} if self.id is not None else {'reason': self.reason}


@dataclasses.dataclass(frozen=True)
class Normalised:
    """What an adapter made of a body."""
    events: list[SourceEvent] = dataclasses.field(default_factory=list)
    ignored: list[Ignored] = dataclasses.field(default_factory=list)


def is_repository(value: Any) -> TypeGuard[str]:
    """Whether a value is a routable repository ("namespace/name", lowercase, as in Quay)."""
    return isinstance(value, str) and _REPOSITORY.fullmatch(value) is not None


def repository_problem(value: Any) -> str:
    return (f"repository {str(value)[:300]!r} is not a lowercase \"namespace/name\" path, "
            "so no notification can name it")


def is_tag(value: Any) -> TypeGuard[str]:
    """Whether a value is a tag (and not a digest standing in for one, as Harbor sends for untagged pushes)."""
    return isinstance(value, str) and _TAG.fullmatch(value) is not None


def clean_host(value: Any) -> str | None:
    """A registry host fit for docker_url, or None."""
    return value if isinstance(value, str) and _HOST.fullmatch(value) else None


def split_url(value: Any) -> SplitResult | None:
    """A URL of an envelope split into its parts, or None: not a string, or one urlsplit refuses ("http://[::1")."""
    if not isinstance(value, str):
        return None
    try:
        return urlsplit(value)
    except ValueError:
        return None


def check_homepage_template(template: str) -> str:
    """Check a homepage URL template; raises ValueError naming an unknown placeholder."""
    for _, field, spec, conversion in string.Formatter().parse(template):
        if field is not None and (field not in HOMEPAGE_FIELDS or spec or conversion):
            known = ', '.join(f'{{{name}}}' for name in HOMEPAGE_FIELDS)
            raise ValueError(f"unknown placeholder {{{field}}}: use {known}")
    return template


def render_homepage(template: str, repository: str, host: str) -> str:
    """A homepage URL from a template: placeholders filled, or the repository appended to a base URL."""
    namespace, _, name = repository.partition('/')
    if '{' not in template:
        return f"{template.rstrip('/')}/{repository}"
    return template.format_map({'repository': repository, 'namespace': namespace, 'name': name, 'host': host})


def repository_fields(repository: str, host: str | None, homepage: str) -> dict[str, Any]:
    """Quay's repository fields: repository, namespace, name, docker_url, homepage."""
    namespace, _, name = repository.partition('/')
    return {
        'repository': repository,
        'namespace': namespace,
        'name': name,
        'docker_url': f"{host}/{repository}" if host else repository,
        'homepage': homepage,
    }


def content_key(prefix: str, *parts: Any) -> str:
    """An idempotency key derived from content, for sources whose bodies carry no event id."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return f"{prefix}{digest}"


def id_key(prefix: str, value: str) -> str:
    """An idempotency key from a source's own event id (hashed if very long)."""
    return f"{prefix}{value}" if len(value) <= MAX_KEY_ID else content_key(prefix + 'sha256:', value)


def mapping(value: Any) -> Mapping[str, Any]:
    """The value if it is a JSON object, else an empty one (adapters read optional parts this way)."""
    return value if isinstance(value, Mapping) else {}
