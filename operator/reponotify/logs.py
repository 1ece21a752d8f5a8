"""
Log output: human-readable text, or JSON lines for log collectors (``--log-format``).

Both formats apply to every logger in the process, kopf's included (they all
propagate to the root logger, which gets the one handler). A JSON line has
``timestamp`` (RFC 3339, UTC, milliseconds), ``level``, ``logger``, ``message``,
``exception`` when there is one, and the record's extra fields: the delivery
fields the dispatcher adds (``notification``, ``method``, ``event``, ``event_id``,
``delivery_id``, ``outcome``, ``attempts``, ``code``), and kopf's ``object``
reference (apiVersion, kind, namespace, name, uid) on its per-resource messages.

Nothing logged carries a secret: delivery messages name a target's answer, never
its URL (see :func:`reponotify.methods.base.post_json`); configs are never logged.
kopf, at DEBUG, logs whole resources, their diffs and its patches (whose diff-base
annotation holds the spec): :data:`KOPF_BODY_REDACTOR` cuts those bodies off, since
a ``spec.config`` may hold a secret-bearing value inline (a Slack URL, a token).
"""
import datetime
import json
import logging
import re
import sys
from typing import Any, TextIO

LOG_FORMATS = ('text', 'json')
TEXT_FORMAT = '%(asctime)s %(levelname)-7s %(name)s: %(message)s'

# Attributes every LogRecord has: anything else on a record came as an extra field.
_STANDARD = frozenset(logging.LogRecord('', 0, '', 0, '', None, None).__dict__) | {'message', 'asctime',
                                                                                   'taskName'}
# kopf's own extras: its object reference is shown as "object"; the rest is internal to kopf.
_KOPF_INTERNAL = frozenset({'k8s_skip', 'k8s_ref', 'settings'})


def _object_prefix(record: logging.LogRecord) -> str:
    ref = getattr(record, 'k8s_ref', None)
    if not isinstance(ref, dict):
        return ''
    namespace, name = ref.get('namespace'), ref.get('name')
    return f"[{namespace}/{name}] " if namespace else f"[{name}] " if name else ''


class TextFormatter(logging.Formatter):
    """The classic one-line format; kopf's per-resource messages are prefixed with ``[namespace/name]``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        prefix = _object_prefix(record)
        if prefix:
            record.message = prefix + record.message
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            'timestamp': datetime.datetime.fromtimestamp(record.created, datetime.UTC)
                         .isoformat(timespec='milliseconds').replace('+00:00', 'Z'),
            'level': record.levelname.lower(),
            'logger': record.name,
            'message': record.getMessage(),
        }
        ref = getattr(record, 'k8s_ref', None)
        if isinstance(ref, dict):
            entry['object'] = {key: value for key, value in ref.items() if value is not None}
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in _KOPF_INTERNAL and not key.startswith('_') and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry['exception'] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry['exception'] = record.exc_text
        if record.stack_info:
            entry['stack'] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class KopfBodyRedactor(logging.Filter):
    """Drops the resource bodies, diffs and patches from kopf's messages, keeping what happened."""

    # kopf's messages that end with a body, a diff or a patch (kopf 1.45: processing, patching, application).
    _BODIES = re.compile(r'^(?P<what>[A-Z][\w -]* is in progress|[A-Z][\w -]* diff'
                         r'|(?:Merge|JSON)-patching the (?:resource|status) with'
                         r'|Could not apply the patch in full due to conflicts with newer changes\. '
                         r'Will try on the next cycle soon\. Remaining'
                         r'|Merge-patching finished with inconsistencies): ', re.DOTALL)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            match = self._BODIES.match(record.msg)
            if match:
                record.msg = f"{match['what']} (not logged: a spec may hold secrets)"
                record.args = None
        return True


KOPF_BODY_REDACTOR = KopfBodyRedactor()


def redact_kopf_bodies() -> None:
    """Install :data:`KOPF_BODY_REDACTOR` on kopf's per-resource logger (idempotent)."""
    kopf_objects = logging.getLogger('kopf.objects')
    if KOPF_BODY_REDACTOR not in kopf_objects.filters:
        kopf_objects.addFilter(KOPF_BODY_REDACTOR)


def make_formatter(log_format: str) -> logging.Formatter:
    if log_format == 'json':
        return JsonFormatter()
    if log_format == 'text':
        return TextFormatter()
    raise ValueError(f"unknown log format {log_format!r}; use one of {', '.join(LOG_FORMATS)}")


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours, to replace on a second configuration (tests configure more than once)."""


def logging_setup() -> tuple[str, str]:
    """The level and format of this process's logging (for child processes to log alike)."""
    root = logging.getLogger()
    ours = [handler for handler in root.handlers if isinstance(handler, _Handler)]
    log_format = 'json' if ours and isinstance(ours[-1].formatter, JsonFormatter) else 'text'
    return logging.getLevelName(root.getEffectiveLevel()).lower(), log_format


def configure_logging(level: str = 'info', log_format: str = 'text', stream: TextIO | None = None) -> None:
    """Send every logger's records (kopf's too) to ``stream`` (stderr) in one format."""
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(make_formatter(log_format))
    root = logging.getLogger()
    root.handlers[:] = [existing for existing in root.handlers if not isinstance(existing, _Handler)] + [handler]
    root.setLevel(level.upper())
    logging.getLogger('aiohttp.access').setLevel(logging.WARNING)
