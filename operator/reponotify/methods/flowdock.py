"""
The ``flowdock`` method: a Team Inbox message shaped exactly as Quay's.

POST ``{flowdock_api_url}/{flow_api_token}`` (the operator's ``--flowdock-api-url``,
by default Flowdock's team-inbox messages API) with ``{source, from_address,
subject: summary, content: the event's HTML message, from_name: the repository's
namespace, project: "<namespace> <name>", tags: ["#<event>"], link: homepage}``.
Quay sent ``source: "Quay"`` and ``from_address: "support@quay.io"``; here they
are ``reponotify`` and ``reponotify@localhost``.

The flow API token is a credential and sits in the URL path: ``flow_api_token``
or ``flow_api_tokenFrom``; messages say "Flowdock answered 500", never the URL.
"""
import re
from typing import Any, ClassVar

import pydantic

from reponotify.events import Event
from reponotify.messages import render_html
from reponotify.methods.base import AttemptResult, DeliveryContext, Method, MethodConfig, post_json

SOURCE = 'reponotify'
FROM_ADDRESS = 'reponotify@localhost'

_TOKEN = re.compile(r'^[A-Za-z0-9_-]+$')  # it becomes a path segment: nothing that could change the path


class FlowdockConfig(MethodConfig):
    secret_fields: ClassVar[tuple[str, ...]] = ('flow_api_token',)
    flow_api_token: pydantic.SecretStr

    @pydantic.field_validator('flow_api_token')
    @classmethod
    def _token(cls, value: pydantic.SecretStr) -> pydantic.SecretStr:
        if not _TOKEN.match(value.get_secret_value()):
            raise ValueError("must be a Flowdock flow API token (letters, digits, '-' and '_' only)")
        return value


def flowdock_body(event: Event) -> dict[str, Any]:
    namespace, _, name = event.repository.partition('/')
    return {
        'source': SOURCE,
        'from_address': FROM_ADDRESS,
        'subject': event.summary,
        'content': render_html(event),
        'from_name': namespace,
        'project': f"{namespace} {name}",
        'tags': [f"#{event.kind}"],
        'link': event.payload.get('homepage'),
    }


class FlowdockMethod(Method):
    name: ClassVar[str] = 'flowdock'
    config_model: ClassVar[type[MethodConfig]] = FlowdockConfig

    def target_key(self, target: Any) -> str | None:
        return 'flowdock'  # one API (--flowdock-api-url) for every Flowdock notification

    async def deliver(self, target: Any, event: Event, context: DeliveryContext) -> AttemptResult:
        assert isinstance(target, FlowdockConfig)
        url = f"{context.settings.flowdock_api_url.rstrip('/')}/{target.flow_api_token.get_secret_value()}"
        return await post_json(context, url, flowdock_body(event), what='Flowdock')
