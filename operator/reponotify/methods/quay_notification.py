"""
The ``quay_notification`` method: an in-product notification for an audience.

Quay shows these in its own UI to a user, a team or an organisation. Here the
audience is ``config.target {kind: user|team|org, name}``; the notification is
kept in the receiver's inbox (``GET /v1/inbox?kind=team&name=NAME``) and, under
the operator, posted as a Kubernetes Event on the RepositoryNotification
(reason: the event name, message: the summary), visible in ``kubectl describe``
and ``kubectl get events``.
"""
from typing import Any, ClassVar, Literal

import pydantic

from reponotify.events import Event
from reponotify.inbox import InboxEntry
from reponotify.methods.base import AttemptResult, DeliveryContext, Method, MethodConfig


class Target(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra='forbid', frozen=True)
    kind: Literal['user', 'team', 'org']
    name: str = pydantic.Field(min_length=1, max_length=255, pattern=r'^[a-zA-Z0-9][a-zA-Z0-9._-]*$')


class QuayNotificationConfig(MethodConfig):
    target: Target


class QuayNotificationMethod(Method):
    name: ClassVar[str] = 'quay_notification'
    runs_in_delivery_process: ClassVar[bool] = False  # it writes to this process's inbox and Kubernetes Events
    config_model: ClassVar[type[MethodConfig]] = QuayNotificationConfig

    async def deliver(self, target: Any, event: Event, context: DeliveryContext) -> AttemptResult:
        assert isinstance(target, QuayNotificationConfig)
        namespace, name = context.notification
        if context.announce is not None:
            try:
                await context.announce(namespace, name, event.kind, event.summary)
            except Exception as exc:
                return AttemptResult(ok=False, message=f"could not post the Kubernetes Event: {exc}")
        if context.inbox is not None:
            context.inbox.add(target.target.kind, target.target.name, InboxEntry(
                event_id=event.id, event=event.kind, repository=event.repository, summary=event.summary,
                level=event.level.value, notification=f"{namespace}/{name}"))
        return AttemptResult(ok=True, message=f"notified {target.target.kind} {target.target.name}")
