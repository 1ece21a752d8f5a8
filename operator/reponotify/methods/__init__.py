"""
Delivery methods, one module each, behind the interface in :mod:`.base`.

To add a method: write ``methods/<name>.py`` with a :class:`~.base.Method`
subclass and its config model, and list it in :data:`METHODS`.
"""
from reponotify.methods.base import AttemptResult, DeliveryContext, Method, MethodConfig
from reponotify.methods.email import EmailMethod
from reponotify.methods.flowdock import FlowdockMethod
from reponotify.methods.hipchat import HipchatMethod
from reponotify.methods.quay_notification import QuayNotificationMethod
from reponotify.methods.slack import SlackMethod
from reponotify.methods.webhook import WebhookMethod

METHODS: dict[str, Method] = {method.name: method for method in [
    WebhookMethod(),
    SlackMethod(),
    FlowdockMethod(),
    HipchatMethod(),
    EmailMethod(),
    QuayNotificationMethod(),
]}

__all__ = ['METHODS', 'AttemptResult', 'DeliveryContext', 'Method', 'MethodConfig']
