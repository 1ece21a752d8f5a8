"""
The ``hipchat`` method: a v2 room notification shaped exactly as Quay's.

POST ``{hipchat_api_url}/room/{room_id}/notification?auth_token={token}`` (the
operator's ``--hipchat-api-url``, by default HipChat's v2 API) with ``{color,
message: the event's HTML message, notify: level == error, message_format:
"html"}``; colours by level: info gray, warning yellow, error red, success
green, primary purple.

``room_id`` is the room's numeric ID (digits only). The room notification token
is a credential and sits in the query string: ``notification_token`` or
``notification_tokenFrom``; messages say "HipChat answered 500", never the URL.
"""
from typing import Any, ClassVar
from urllib.parse import urlencode

import pydantic

from reponotify.events import Event, Level
from reponotify.messages import render_html
from reponotify.methods.base import AttemptResult, DeliveryContext, Method, MethodConfig, post_json

COLOURS: dict[Level, str] = {
    Level.INFO: 'gray',
    Level.WARNING: 'yellow',
    Level.ERROR: 'red',
    Level.SUCCESS: 'green',
    Level.PRIMARY: 'purple',
}


class HipchatConfig(MethodConfig):
    secret_fields: ClassVar[tuple[str, ...]] = ('notification_token',)
    notification_token: pydantic.SecretStr
    room_id: str

    @pydantic.field_validator('notification_token')
    @classmethod
    def _token(cls, value: pydantic.SecretStr) -> pydantic.SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("must be a HipChat room notification token (it is empty)")
        return value

    @pydantic.field_validator('room_id', mode='before')
    @classmethod
    def _digits(cls, value: Any) -> str:
        # YAML gives `room_id: 12345` as an int: take it, but not a bool (YAML's yes/no).
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            value = str(value)
        if not isinstance(value, str) or not value.isascii() or not value.isdigit():
            raise ValueError("must be the HipChat room's numeric ID (digits only, e.g. 12345)")
        return value


def hipchat_body(event: Event) -> dict[str, Any]:
    level = event.level
    return {
        'color': COLOURS[level],
        'message': render_html(event),
        'notify': level is Level.ERROR,
        'message_format': 'html',
    }


class HipchatMethod(Method):
    name: ClassVar[str] = 'hipchat'
    config_model: ClassVar[type[MethodConfig]] = HipchatConfig

    def target_key(self, target: Any) -> str | None:
        return 'hipchat'  # one API (--hipchat-api-url) for every HipChat notification

    async def deliver(self, target: Any, event: Event, context: DeliveryContext) -> AttemptResult:
        assert isinstance(target, HipchatConfig)
        query = urlencode({'auth_token': target.notification_token.get_secret_value()})
        url = f"{context.settings.hipchat_api_url.rstrip('/')}/room/{target.room_id}/notification?{query}"
        return await post_json(context, url, hipchat_body(event), what='HipChat')
