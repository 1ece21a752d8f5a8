"""
Webhook body templates: a JSON document with ``${<JSONPath>}`` expressions.

Quay's rules, reproduced exactly (QUAY-SEMANTICS.md):

* Every string in the template, keys and values alike, may hold expressions,
  evaluated against the event payload.
* A string that is exactly one expression becomes the typed value it selects
  (``null`` when nothing matches; a list when several things match).
* An expression inside a longer string is rendered as text: ``(none)`` when
  nothing matches, the matches joined with commas when several match.
* An empty or unparsable expression, or a template that is not JSON, is
  rejected when the notification is created, not when an event arrives.

Quay's own implementation crashed on several matches (``${tags[*]}``); here
they are a list (exact) or comma-joined text (inline).
"""
import dataclasses
import json
import re
from typing import Any

import jsonpath_ng
import jsonpath_ng.exceptions

_EXPRESSION = re.compile(r'\$\{([^}]*)\}')
_MISSING = '(none)'


class TemplateError(ValueError):
    """The template cannot be used; the message says why and where."""


@dataclasses.dataclass(frozen=True)
class BodyTemplate:
    """A parsed template, with every expression compiled once."""
    document: Any
    expressions: dict[str, Any]  # expression text -> compiled JSONPath

    def render(self, payload: Any) -> Any:
        return self._render(self.document, payload)

    def _render(self, node: Any, payload: Any) -> Any:
        if isinstance(node, str):
            return self._render_string(node, payload)
        if isinstance(node, dict):
            return {_as_key(self._render_string(key, payload)): self._render(value, payload)
                    for key, value in node.items()}
        if isinstance(node, list):
            return [self._render(item, payload) for item in node]
        return node

    def _render_string(self, text: str, payload: Any) -> Any:
        exact = _EXPRESSION.fullmatch(text)
        if exact:
            return self._evaluate(exact.group(1), payload)
        return _EXPRESSION.sub(lambda match: _as_text(self._evaluate(match.group(1), payload)), text)

    def _evaluate(self, expression: str, payload: Any) -> Any:
        matches = [match.value for match in self.expressions[expression].find(payload)]
        if not matches:
            return None
        return matches[0] if len(matches) == 1 else matches


def compile_template(text: str) -> BodyTemplate:
    """Parse and check a template; raises :class:`TemplateError` with a precise message."""
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise TemplateError(f"template is not valid JSON: {exc}") from None
    expressions: dict[str, Any] = {}
    for string in _strings(document):
        for match in _EXPRESSION.finditer(string):
            expression = match.group(1)
            if expression not in expressions:
                expressions[expression] = _parse_expression(expression)
    return BodyTemplate(document=document, expressions=expressions)


def _parse_expression(expression: str) -> Any:
    if not expression.strip():
        raise TemplateError("template has an empty expression ${}")
    try:
        return jsonpath_ng.parse(expression)
    except (jsonpath_ng.exceptions.JsonPathLexerError, jsonpath_ng.exceptions.JsonPathParserError,
            Exception) as exc:  # the parser raises plain Exceptions for some inputs
        raise TemplateError(f"template expression ${{{expression}}} is not valid JSONPath: {exc}") from None


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in [key, *_strings(value)]]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return []


def _as_text(value: Any) -> str:
    if value is None:
        return _MISSING
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return ','.join(_as_text(item) for item in value)
    return json.dumps(value)


def _as_key(value: Any) -> str:
    # A key that is exactly one expression must still be a JSON object key.
    return value if isinstance(value, str) else _as_text(value)
