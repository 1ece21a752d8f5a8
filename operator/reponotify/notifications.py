"""
From a ``RepositoryNotification`` spec to a compiled, routable notification.

Compiling checks everything that can be checked before an event arrives, so
that a mistake shows up as ``Ready=False`` on the resource right away, with a
message a person can act on:

* the spec's shape (pydantic), the per-event filter and the per-method config;
* that ``refRegex`` compiles, that a template parses, that ``level`` is known;
* that every ``<field>From`` Secret reference resolves.

Error messages never contain config values: those may be secrets.
"""
import dataclasses
import re
import sys
import typing
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import pydantic

from reponotify.events import EVENT_KINDS, FilterKind, Payload, priority_index
from reponotify.methods import METHODS, Method, MethodConfig
from reponotify.models import RepositoryNotificationSpec, priority_level


@dataclasses.dataclass(frozen=True, order=True, slots=True)
class NotificationKey:
    """Identifies a notification: the resource's namespace and name."""
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class SpecError(Exception):
    """The resource cannot be routed; ``reason`` is the Ready condition's reason."""
    reason = 'InvalidSpec'


class InvalidSpec(SpecError):
    reason = 'InvalidSpec'


class SecretNotFound(SpecError):
    reason = 'SecretNotFound'


class RepositoryNotPermitted(SpecError):
    """The namespace may not subscribe to this repository (see reponotify.tenancy)."""
    reason = 'RepositoryNotPermitted'


class SecretSource(Protocol):
    """Reads one key of one Secret; raises :class:`SecretNotFound` with a clear message."""

    async def read(self, namespace: str, name: str, key: str) -> str: ...


@dataclasses.dataclass(frozen=True, slots=True)  # slots: 100,000 of them must stay small
class Notification:
    """A notification ready for routing and delivery."""
    key: NotificationKey
    spec: RepositoryNotificationSpec = dataclasses.field(repr=False)  # config may hold inline secrets
    method: Method
    target: Any  # what the method prepared from its config, secrets resolved
    matches: Callable[[Payload], bool]
    generation: int | None = None

    @property
    def repository(self) -> str:
        return self.spec.repository

    @property
    def event(self) -> str:
        return sys.intern(str(self.spec.event))  # one string per event kind, however many notifications


def parse_spec(raw: Mapping[str, Any] | None) -> RepositoryNotificationSpec:
    """Validate a raw spec; the error lists every problem by field path."""
    try:
        # A mapping (kopf's Spec is not a dict) as a dict; anything else as it is, for pydantic to refuse.
        return RepositoryNotificationSpec.model_validate(dict(raw) if isinstance(raw, Mapping) else raw or {})
    except pydantic.ValidationError as exc:
        raise InvalidSpec(describe_errors(exc, prefix='spec')) from None


def describe_errors(exc: pydantic.ValidationError, *, prefix: str) -> str:
    """A one-line description of validation errors, without the offending values."""
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        path = '.'.join([prefix, *(str(part) for part in error['loc'])])
        message = error['msg'].removeprefix('Value error, ')
        problems.append(f"{path}: {message}")
    return '; '.join(problems)


def compile_filter(spec: RepositoryNotificationSpec) -> Callable[[Payload], bool]:
    """The per-event filter of a spec, with Quay's exact semantics."""
    kind = EVENT_KINDS[str(spec.event)]
    config = spec.eventConfig
    given = {name for name in ('refRegex', 'level', 'days') if config and getattr(config, name) is not None}
    allowed = {kind.filter.value} if kind.filter else set()
    for name in sorted(given - allowed):
        where = f"the {kind.filter.value} filter" if kind.filter else "no eventConfig"
        raise InvalidSpec(f"spec.eventConfig.{name} does not apply to {kind.name} (it takes {where})")

    if kind.filter is FilterKind.REF_REGEX:
        return _ref_regex_filter(config.refRegex if config else None)
    if kind.filter is FilterKind.LEVEL:
        return _level_filter(config.level if config else None)
    if kind.filter is FilterKind.DAYS:
        if config is None or config.days is None:
            raise InvalidSpec("spec.eventConfig.days is required for repo_image_expiry")
        return _days_filter(config.days)
    return _always


def _always(payload: Payload) -> bool:
    return True


def _ref_regex_filter(regex: str | None) -> Callable[[Payload], bool]:
    if not regex:
        return _always
    try:
        compiled = re.compile(regex)
    except re.error as exc:
        raise InvalidSpec(f"spec.eventConfig.refRegex is not a valid regular expression: {exc}") from None

    def matches(payload: Payload) -> bool:
        metadata = payload.get('trigger_metadata')
        ref = metadata.get('ref') if isinstance(metadata, Mapping) else None
        # No ref means a manual, non-git build: Quay does not fire.
        return isinstance(ref, str) and compiled.match(ref) is not None
    return matches


def _level_filter(level: int | str | None) -> Callable[[Payload], bool]:
    if level is None:
        return _always
    threshold = priority_level(level)
    assert threshold is not None  # the model validated it

    def matches(payload: Payload) -> bool:
        vulnerability = payload.get('vulnerability')
        if not isinstance(vulnerability, Mapping):
            return False
        index = priority_index(str(vulnerability.get('priority', 'Unknown')))
        return index is not None and index <= threshold
    return matches


_EXPIRING_IN = re.compile(r'^\s*(\d+)\s+days?\s*$')


def _days_filter(days: int) -> Callable[[Payload], bool]:
    def matches(payload: Payload) -> bool:
        parsed = _EXPIRING_IN.match(str(payload.get('expiring_in', '')))
        return parsed is not None and int(parsed.group(1)) <= days
    return matches


async def resolve_config(
        raw_config: Mapping[str, Any],
        method: Method,
        namespace: str,
        secrets: SecretSource,
) -> MethodConfig:
    """
    Replace ``<field>From`` references by Secret values, then validate the method's config.

    A config section whose type is itself a :class:`MethodConfig` (the webhook's ``tls``)
    takes its own ``<field>From`` references, by its own ``secret_fields``.
    """
    resolved = await _resolve_references(raw_config, method.config_model, method.name, 'spec.config',
                                         namespace, secrets)
    try:
        return method.config_model.model_validate(resolved)
    except pydantic.ValidationError as exc:
        raise InvalidSpec(describe_errors(exc, prefix='spec.config')) from None


async def _resolve_references(
        raw: Mapping[str, Any],
        model: type[MethodConfig],
        method_name: str,
        path: str,
        namespace: str,
        secrets: SecretSource,
) -> dict[str, Any]:
    secret_fields = model.secret_fields
    resolved: dict[str, Any] = {}
    for field, value in raw.items():
        section = _section_model(model, field)
        if section is not None and isinstance(value, Mapping):
            resolved[field] = await _resolve_references(value, section, method_name, f"{path}.{field}",
                                                        namespace, secrets)
            continue
        if not field.endswith('From'):
            resolved.setdefault(field, value)
            continue
        plain = field.removesuffix('From')
        if plain not in secret_fields:
            allowed = ', '.join(f"{name}From" for name in secret_fields) or 'none'
            raise InvalidSpec(f"{path}.{field}: {method_name} does not take this field from a Secret "
                              f"(it takes: {allowed})")
        if plain in raw:
            raise InvalidSpec(f"{path}: give either {plain} or {field}, not both")
        resolved[plain] = await _read_reference(f"{path}.{field}", value, namespace, secrets)
    return resolved


def _section_model(model: type[MethodConfig], field: str) -> type[MethodConfig] | None:
    """The config model of a nested section (``tls: TlsConfig | None``), if ``field`` is one."""
    info = model.model_fields.get(field)
    if info is None:
        return None
    for candidate in (info.annotation, *typing.get_args(info.annotation)):
        if isinstance(candidate, type) and issubclass(candidate, MethodConfig):
            return candidate
    return None


async def _read_reference(where: str, value: Any, namespace: str, secrets: SecretSource) -> str:
    ref = value.get('secretKeyRef') if isinstance(value, Mapping) else None
    name = ref.get('name') if isinstance(ref, Mapping) else None
    key = ref.get('key') if isinstance(ref, Mapping) else None
    if not isinstance(name, str) or not isinstance(key, str) or not name or not key:
        raise InvalidSpec(f"{where} must be {{secretKeyRef: {{name: ..., key: ...}}}}")
    return await secrets.read(namespace, name, key)


async def compile_notification(
        key: NotificationKey,
        raw_spec: Mapping[str, Any] | None,
        secrets: SecretSource,
        *,
        generation: int | None = None,
) -> Notification:
    """Check and compile a resource's spec; raises :class:`SpecError` subclasses."""
    spec = parse_spec(raw_spec)
    matches = compile_filter(spec)
    method = METHODS.get(str(spec.method))
    if method is None:
        raise InvalidSpec(f"spec.method: {spec.method} is not available in this version of reponotify")
    config = await resolve_config(spec.config, method, key.namespace, secrets)
    return Notification(key=key, spec=spec, method=method, target=method.prepare(config),
                        matches=matches, generation=generation)
