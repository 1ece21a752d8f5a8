"""
The ``RepositoryNotification`` resource: pydantic models of its spec and status.

These models are the one source of truth for the resource's shape: the
operator and the standalone mode validate with them, and ``reponotify crd``
generates the CRD's ``openAPIV3Schema`` from them (field descriptions become
``kubectl explain`` text). Per-method ``config`` is checked by each method's own
config model (see ``reponotify.methods``), since its shape depends on ``method``.
"""
import enum
from typing import Annotated, Any, Literal

import pydantic

from reponotify.events import EVENT_NAMES, PRIORITIES

GROUP = 'reponotify.dev'
VERSION = 'v1alpha1'
API_VERSION = f'{GROUP}/{VERSION}'
KIND = 'RepositoryNotification'
PLURAL = 'repositorynotifications'
SINGULAR = 'repositorynotification'
SHORT_NAMES = ['rn']
CATEGORIES = ['reponotify']

# A Quay repository "namespace/name"; registries such as Docker Distribution
# also have deeper paths ("group/sub/name"), which route the same way.
_COMPONENT = r'[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*'
REPOSITORY_PATTERN = rf'^{_COMPONENT}(?:/{_COMPONENT})+$'
# What spec.repository takes: an exact repository, or a glob where "*" stands for any part of one
# path component ("acme/*", "*/web", "acme/web-*"); see reponotify.routing for how globs match.
_GLOB_COMPONENT = r'[a-z0-9._-]*\*[a-z0-9._*-]*'
_SPEC_COMPONENT = rf'(?:{_COMPONENT}|{_GLOB_COMPONENT})'
REPOSITORY_OR_GLOB_PATTERN = rf'^{_SPEC_COMPONENT}(?:/{_SPEC_COMPONENT})+$'


def is_glob(repository: str) -> bool:
    """Whether a spec.repository is a glob pattern rather than one repository."""
    return '*' in repository

EventName = enum.StrEnum('EventName', {name.upper(): name for name in EVENT_NAMES})


class MethodName(enum.StrEnum):
    WEBHOOK = 'webhook'
    SLACK = 'slack'
    EMAIL = 'email'
    FLOWDOCK = 'flowdock'
    HIPCHAT = 'hipchat'
    QUAY_NOTIFICATION = 'quay_notification'


class _Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra='forbid', populate_by_name=True)


class SecretKeySelector(_Model):
    """A key of a Secret in the resource's own namespace."""
    name: str = pydantic.Field(
        min_length=1, max_length=253, pattern=r'^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$',
        description="Name of the Secret, in the same namespace as the notification.")
    key: str = pydantic.Field(
        min_length=1, max_length=253, pattern=r'^[-._a-zA-Z0-9]+$',
        description="Key inside the Secret's data.")


class ValueFrom(_Model):
    """Where a secret-bearing config value comes from instead of being inline."""
    secretKeyRef: SecretKeySelector = pydantic.Field(description="The Secret key holding the value.")


class EventConfig(_Model):
    """Per-event filters, as in Quay's per-event notification config."""
    refRegex: str | None = pydantic.Field(
        default=None, max_length=1024,
        description="Build events only: fire when this regular expression matches trigger_metadata.ref "
                    "at its start (Python re.match). Empty means always fire; a build without a ref never fires.")
    level: pydantic.StrictInt | str | None = pydantic.Field(  # strict: YAML `true` is not level 1
        default=None,
        description="vulnerability_found only: the lowest priority that fires, by name "
                    f"({', '.join(PRIORITIES)}) or by Quay's index 0..5 (0 is Critical).",
        json_schema_extra={'x-kubernetes-int-or-string': True})
    days: pydantic.StrictInt | None = pydantic.Field(
        default=None, ge=1, le=3650,
        description="repo_image_expiry only (required there): fire for tags expiring within this many days.")

    @pydantic.field_validator('level')
    @classmethod
    def _known_level(cls, value: int | str | None) -> int | str | None:
        if value is not None and priority_level(value) is None:
            raise ValueError(f"level must be one of {', '.join(PRIORITIES)} or an index 0..5, not {value!r}")
        return value


def priority_level(value: int | str) -> int | None:
    """The priority index of an ``eventConfig.level`` (a name or an index), or None if invalid."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        index = int(value)
        return index if 0 <= index < len(PRIORITIES) else None
    return PRIORITIES.index(value) if value in PRIORITIES else None


class RepositoryNotificationSpec(_Model):
    """When an event happens on a repository, notify a target by a method."""
    repository: str = pydantic.Field(
        max_length=255, pattern=REPOSITORY_OR_GLOB_PATTERN,
        description='The repository, "namespace/name" as in Quay (e.g. acme/web), or a glob where * matches '
                    'within one path component (acme/* or */web); every matching notification is notified.')
    event: EventName = pydantic.Field(description="The Quay event that triggers the notification.")
    eventConfig: EventConfig | None = pydantic.Field(
        default=None, description="Optional per-event filter: refRegex, level or days.")
    method: MethodName = pydantic.Field(description="How to notify.")
    config: dict[str, Any] = pydantic.Field(
        default_factory=dict,
        description="Per-method settings (url, template, email, ...). Any secret-bearing field <f> "
                    "may instead be given as <f>From: {secretKeyRef: {name, key}}.")
    title: str | None = pydantic.Field(
        default=None, max_length=255, description="A label for people; it is never sent.")
    suspend: pydantic.StrictBool = pydantic.Field(
        default=False, description="Stop routing events to this notification without deleting it.")


ConditionStatus = Literal['True', 'False', 'Unknown']


class Condition(_Model):
    """A Kubernetes-style condition."""
    type: str = pydantic.Field(description="The condition type, e.g. Ready.")
    status: ConditionStatus = pydantic.Field(description='"True", "False" or "Unknown".')
    reason: str = pydantic.Field(description="A CamelCase reason, e.g. Accepted or InvalidSpec.")
    message: str = pydantic.Field(default='', description="What a person should know or do.")
    lastTransitionTime: str = pydantic.Field(description="When status last changed (RFC 3339).")
    observedGeneration: int | None = pydantic.Field(
        default=None, description="The generation this condition was computed for.")


class DeliveryOutcome(enum.StrEnum):
    SUCCEEDED = 'Succeeded'
    RETRYING = 'Retrying'
    FAILED = 'Failed'
    DROPPED = 'Dropped'


class Delivery(_Model):
    """The outcome of one delivery of one event."""
    eventId: str = pydantic.Field(description="The id of the event (the receiver's 202 answer has it).")
    event: str = pydantic.Field(description="The event kind.")
    time: str = pydantic.Field(description="When this outcome was recorded (RFC 3339).")
    outcome: DeliveryOutcome = pydantic.Field(description="Succeeded, Retrying, Failed or Dropped.")
    attempts: int = pydantic.Field(ge=0, description="Attempts made so far for this delivery.")
    code: int | None = pydantic.Field(default=None, description="The target's HTTP status code, if any.")
    message: str = pydantic.Field(default='', description="What happened, for people.")
    durationMs: int | None = pydantic.Field(default=None, ge=0, description="Duration of the last attempt.")


class DeliveryCounters(_Model):
    """Deliveries by final outcome since the notification was created."""
    succeeded: int = pydantic.Field(default=0, ge=0)
    failed: int = pydantic.Field(default=0, ge=0)
    dropped: int = pydantic.Field(default=0, ge=0)


RECENT_DELIVERIES = 10


class TestResult(_Model):
    """The last test requested with the reponotify.dev/test annotation (or the standalone test endpoint)."""
    value: str = pydantic.Field(description="The annotation value that requested the test.")
    eventId: str | None = pydantic.Field(default=None, description="The id of the sample event sent.")
    time: str = pydantic.Field(description="When this outcome was recorded (RFC 3339).")
    outcome: str = pydantic.Field(
        description="Queued, then the delivery's outcome; Filtered when eventConfig suppresses the sample "
                    "(as in Quay); NotRouted when the notification is not ready.")
    message: str = pydantic.Field(default='', description="What happened, for people.")


class RepositoryNotificationStatus(_Model):
    """What the operator observed and did; written by the operator only."""
    observedGeneration: int | None = pydantic.Field(
        default=None, description="The metadata.generation the operator last processed.")
    conditions: list[Condition] = pydantic.Field(default_factory=list, description="Ready, with its reason.")
    numberOfFailures: int = pydantic.Field(
        default=0, ge=0,
        description="Consecutive failed delivery attempts; 3 disable the notification until it is reset.")
    lastDelivery: Delivery | None = pydantic.Field(default=None, description="The most recent delivery outcome.")
    deliveries: DeliveryCounters = pydantic.Field(
        default_factory=DeliveryCounters, description="Counts of final delivery outcomes.")
    recentDeliveries: Annotated[list[Delivery], pydantic.Field(max_length=RECENT_DELIVERIES)] = pydantic.Field(
        default_factory=list, description="The last few delivery outcomes, newest first.")
    lastTest: TestResult | None = pydantic.Field(default=None, description="The last test notification.")


class RepositoryNotification(_Model):
    """A Quay-style repository notification."""
    model_config = pydantic.ConfigDict(extra='allow')  # apiVersion, kind and metadata are Kubernetes' own
    spec: RepositoryNotificationSpec
    status: RepositoryNotificationStatus | None = None
