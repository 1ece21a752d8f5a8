"""
The ``webhook`` method: POST the event payload (or a rendered template) as JSON.

As in Quay, the body is the event payload itself, not wrapped, unless the
notification has a ``template`` (see :mod:`reponotify.bodytemplate`). The URL
is treated as a secret: it may carry credentials, so it can come from a Secret
(``urlFrom``) and never appears in status, events or logs.
"""
import dataclasses
from typing import Any, ClassVar

import pydantic

from reponotify.bodytemplate import BodyTemplate, compile_template
from reponotify.events import Event
from reponotify.methods.base import AttemptResult, DeliveryContext, Method, MethodConfig, http_url, post_json


class WebhookConfig(MethodConfig):
    secret_fields: ClassVar[tuple[str, ...]] = ('url',)
    url: pydantic.SecretStr
    template: str | None = None

    @pydantic.field_validator('url')
    @classmethod
    def _http_url(cls, value: pydantic.SecretStr) -> pydantic.SecretStr:
        http_url(value.get_secret_value())
        return value

    @pydantic.field_validator('template')
    @classmethod
    def _valid_template(cls, value: str | None) -> str | None:
        if value:
            compile_template(value)  # TemplateError is a ValueError: pydantic reports it on this field
        return value


@dataclasses.dataclass(frozen=True)
class WebhookTarget:
    url: pydantic.SecretStr
    template: BodyTemplate | None


class WebhookMethod(Method):
    name: ClassVar[str] = 'webhook'
    config_model: ClassVar[type[MethodConfig]] = WebhookConfig

    def prepare(self, config: MethodConfig) -> WebhookTarget:
        assert isinstance(config, WebhookConfig)
        template = compile_template(config.template) if config.template else None
        return WebhookTarget(url=config.url, template=template)

    async def deliver(self, target: Any, event: Event, context: DeliveryContext) -> AttemptResult:
        body = target.template.render(event.payload) if target.template else event.payload
        return await post_json(context, target.url.get_secret_value(), body, what='webhook target')
