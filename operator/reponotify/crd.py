"""
The CustomResourceDefinition, generated from the pydantic models.

``reponotify crd`` prints it; ``crds/repositorynotifications.yaml`` is that
output, checked in (a test fails when the two drift). pydantic's JSON Schema
is turned into a structural ``openAPIV3Schema``: references inlined, titles
and null branches dropped, free-form objects marked to keep unknown fields.
"""
from typing import Any

import yaml

from reponotify.models import (API_VERSION, CATEGORIES, GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION,
                               RepositoryNotificationSpec, RepositoryNotificationStatus)

# The API server refuses what these rules reject, before the operator sees it.
# (Per-method config is free-form in the schema, so CEL cannot see into it: the operator checks it.)
SPEC_RULES = [
    {'rule': "self.event != 'repo_image_expiry' || (has(self.eventConfig) && has(self.eventConfig.days))",
     'message': "repo_image_expiry needs eventConfig.days"},
]


def openapi_schema(model: type[Any]) -> dict[str, Any]:
    """A structural OpenAPI v3 schema for a pydantic model."""
    schema = model.model_json_schema(by_alias=True)
    definitions = schema.pop('$defs', {})
    return _structural(schema, definitions)


def _structural(node: Any, definitions: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(item, definitions) for item in node]
    if not isinstance(node, dict):
        return node
    if '$ref' in node:
        target = definitions[node['$ref'].rsplit('/', 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != '$ref'}}
        return _structural(merged, definitions)
    variants = node.get('anyOf')
    if variants is not None:
        non_null = [variant for variant in variants if variant.get('type') != 'null']
        rest = {k: v for k, v in node.items() if k != 'anyOf'}
        if node.get('x-kubernetes-int-or-string'):
            return _structural(rest, definitions)  # int | str: the extension says it all
        if len(non_null) == 1:
            return _structural({**non_null[0], **rest}, definitions)
    result: dict[str, Any] = {}
    for key, value in node.items():
        if key in ('title', 'additionalProperties') or (key == 'default' and value is None):
            continue
        if key == 'properties':
            result[key] = {name: _structural(prop, definitions) for name, prop in value.items()}
        elif key == 'enum':
            result[key] = value
        else:
            result[key] = _structural(value, definitions)
    if node.get('type') == 'object' and node.get('additionalProperties') is True and 'properties' not in node:
        result['x-kubernetes-preserve-unknown-fields'] = True
    if result.get('type') == 'object' and node.get('additionalProperties') is False:
        pass  # unknown fields are pruned by the API server, which is what "forbid" means there
    if isinstance(result.get('default'), dict) and not result['default']:
        result.pop('default')
    return result


def crd_manifest() -> dict[str, Any]:
    spec_schema = openapi_schema(RepositoryNotificationSpec)
    spec_schema['x-kubernetes-validations'] = SPEC_RULES
    status_schema = openapi_schema(RepositoryNotificationStatus)
    return {
        'apiVersion': 'apiextensions.k8s.io/v1',
        'kind': 'CustomResourceDefinition',
        'metadata': {'name': f'{PLURAL}.{GROUP}'},
        'spec': {
            'group': GROUP,
            'scope': 'Namespaced',
            'names': {'kind': KIND, 'plural': PLURAL, 'singular': SINGULAR,
                      'shortNames': SHORT_NAMES, 'categories': CATEGORIES},
            'versions': [{
                'name': VERSION,
                'served': True,
                'storage': True,
                'subresources': {'status': {}},
                'additionalPrinterColumns': [
                    {'name': 'Repository', 'type': 'string', 'jsonPath': '.spec.repository'},
                    {'name': 'Event', 'type': 'string', 'jsonPath': '.spec.event'},
                    {'name': 'Method', 'type': 'string', 'jsonPath': '.spec.method'},
                    {'name': 'Ready', 'type': 'string', 'jsonPath': '.status.conditions[?(@.type=="Ready")].status'},
                    {'name': 'Failures', 'type': 'integer', 'jsonPath': '.status.numberOfFailures'},
                    {'name': 'Last Delivery', 'type': 'string', 'jsonPath': '.status.lastDelivery.outcome'},
                    {'name': 'Age', 'type': 'date', 'jsonPath': '.metadata.creationTimestamp'},
                ],
                'schema': {'openAPIV3Schema': {
                    'type': 'object',
                    'description': f"{KIND} ({API_VERSION}): when an event happens on a repository, notify a target.",
                    'required': ['spec'],
                    'properties': {
                        'apiVersion': {'type': 'string'},
                        'kind': {'type': 'string'},
                        'metadata': {'type': 'object'},
                        'spec': spec_schema,
                        'status': status_schema,
                    },
                }},
            }],
        },
    }


class _PlainDumper(yaml.SafeDumper):
    """No YAML anchors and aliases (&id001): the CRD stays plain and diff-friendly."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def crd_yaml() -> str:
    header = "# Generated by `reponotify crd` from reponotify/models.py: do not edit by hand.\n"
    return header + yaml.dump(crd_manifest(), Dumper=_PlainDumper, sort_keys=False, width=120)
