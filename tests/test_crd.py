"""
The generated CRD: its contract (names, columns, subresource), that it is a structural schema,
that it accepts every example and rejects the invalid manifests in tests/invalid/, and that the
operator's own validation (pydantic + compile) agrees with it.

The API server's schema checks are reproduced with jsonschema: ``x-kubernetes-int-or-string``
becomes ``anyOf: [integer, string]``, and each ``x-kubernetes-validations`` rule (CEL) is
checked through its Python equivalent below (a new rule without one fails the test).
"""
import base64
import copy
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
import pytest
import yaml
from reponotify.crd import crd_manifest, crd_yaml
from reponotify.events import EVENT_NAMES
from reponotify.models import MethodName
from reponotify.notifications import InvalidSpec, NotificationKey, compile_notification
from reponotify.standalone import ManifestSecrets, load_manifests

ROOT = pathlib.Path(__file__).resolve().parent.parent
INVALID = pathlib.Path(__file__).resolve().parent / 'invalid'

# Python equivalents of the CEL rules, by rule text: each takes the object the rule applies to.
CEL_RULES: dict[str, Callable[[dict[str, Any]], bool]] = {
    "self.event != 'repo_image_expiry' || (has(self.eventConfig) && has(self.eventConfig.days))":
        lambda spec: spec.get('event') != 'repo_image_expiry' or (
            isinstance(spec.get('eventConfig'), dict) and 'days' in spec['eventConfig']),
}

# What rejects each invalid manifest: (path in the document, schema keyword).
INVALID_MANIFESTS = {
    'bad-event.yaml': (['spec', 'event'], 'enum'),
    'bad-repository.yaml': (['spec', 'repository'], 'pattern'),
    'repository-without-namespace.yaml': (['spec', 'repository'], 'pattern'),
    'missing-method.yaml': (['spec'], 'required'),
    'unknown-method.yaml': (['spec', 'method'], 'enum'),
    'missing-spec.yaml': ([], 'required'),
    'level-boolean.yaml': (['spec', 'eventConfig', 'level'], 'anyOf'),
    'days-zero.yaml': (['spec', 'eventConfig', 'days'], 'minimum'),
    'expiry-without-days.yaml': (['spec'], 'x-kubernetes-validations'),
    'config-not-an-object.yaml': (['spec', 'config'], 'type'),
}


def openapi_schema() -> dict[str, Any]:
    [version] = crd_manifest()['spec']['versions']
    return version['schema']['openAPIV3Schema']


def to_json_schema(node: Any) -> Any:
    """The openAPIV3Schema as JSON Schema, with Kubernetes' int-or-string extension spelled out."""
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    result = {key: to_json_schema(value) for key, value in node.items()}
    if node.get('x-kubernetes-int-or-string'):
        result['anyOf'] = [{'type': 'integer'}, {'type': 'string'}]
    return result


def cel_violations(schema: dict[str, Any], document: Any, path: list[str]) -> Iterator[tuple[list[str], str]]:
    """Evaluate every x-kubernetes-validations rule that applies to ``document``."""
    if not isinstance(document, dict):
        return
    for rule in schema.get('x-kubernetes-validations', []):
        check = CEL_RULES.get(rule['rule'])
        assert check is not None, f"no Python equivalent for the CEL rule {rule['rule']!r}: add one to CEL_RULES"
        if not check(document):
            yield path, rule['message']
    for name, child in (schema.get('properties') or {}).items():
        if name in document:
            yield from cel_violations(child, document[name], [*path, name])


def schema_errors(document: dict[str, Any]) -> list[tuple[list[str], str, str]]:
    """(path, keyword, message) of everything the API server would reject in ``document``."""
    schema = openapi_schema()
    validator = jsonschema.Draft7Validator(to_json_schema(schema))
    errors = [([str(part) for part in error.absolute_path], str(error.validator), error.message)
              for error in validator.iter_errors(document)]
    errors += [(path, 'x-kubernetes-validations', message) for path, message in cel_violations(schema, document, [])]
    return errors


def notifications_in(path: pathlib.Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text())
            if isinstance(doc, dict) and doc.get('kind') == 'RepositoryNotification']


EXAMPLES = sorted(ROOT.glob('examples/**/*.yaml'))


def test_there_are_examples_to_check() -> None:
    assert sum(len(notifications_in(path)) for path in EXAMPLES) >= 7


@pytest.mark.parametrize('path', EXAMPLES, ids=lambda path: str(path.relative_to(ROOT / 'examples')))
def test_examples_are_valid_against_the_schema(path: pathlib.Path) -> None:
    for document in notifications_in(path):
        assert schema_errors(document) == [], document['metadata']['name']


async def test_examples_compile_with_their_secrets() -> None:
    manifests = load_manifests(ROOT / 'examples')
    secrets = ManifestSecrets(manifests.secrets)
    assert manifests.notifications
    for key, resource in manifests.notifications.items():
        notification = await compile_notification(key, resource['spec'], secrets)
        assert notification.key == key


class ReferenceSecrets:
    """Plausible Secret values for the reference examples (their Secrets live in the user's cluster)."""

    def __init__(self) -> None:
        import trustme
        authority = trustme.CA()
        client = authority.issue_cert('reponotify.example.com')
        self.values = {
            'url': 'https://hooks.example.com/services/T0/B0/token',
            'signing-secret': 'whsec_' + base64.b64encode(b'0123456789abcdef0123456789abcdef').decode(),
            'ca.crt': authority.cert_pem.bytes().decode(),
            'tls.crt': client.cert_chain_pems[0].bytes().decode(),
            'tls.key': client.private_key_pem.bytes().decode(),
            'token': 'abcDEF0123456789',
        }

    async def read(self, namespace: str, name: str, key: str) -> str:
        return self.values[key]


async def test_reference_examples_compile_for_the_operator() -> None:
    secrets = ReferenceSecrets()
    documents = [doc for path in sorted(ROOT.glob('examples/reference/*.yaml')) for doc in notifications_in(path)]
    assert {doc['spec']['event'] for doc in documents} == set(EVENT_NAMES)  # every event has an example
    assert {doc['spec']['method'] for doc in documents} == {method.value for method in MethodName}  # and every method
    for doc in documents:
        key = NotificationKey(doc['metadata']['namespace'], doc['metadata']['name'])
        notification = await compile_notification(key, doc['spec'], secrets)
        assert notification.key == key


@pytest.mark.parametrize('name', sorted(INVALID_MANIFESTS))
def test_invalid_manifests_are_rejected_by_the_schema(name: str) -> None:
    [document] = notifications_in(INVALID / name)
    errors = schema_errors(document)
    path, keyword = INVALID_MANIFESTS[name]
    assert [(error_path, error_keyword) for error_path, error_keyword, _ in errors] == [(path, keyword)], errors


@pytest.mark.parametrize('name', sorted(INVALID_MANIFESTS))
async def test_invalid_manifests_are_rejected_by_the_operator_too(name: str) -> None:
    """Kubernetes validates with the schema; standalone mode only with the models: they must agree."""
    [document] = notifications_in(INVALID / name)
    with pytest.raises(InvalidSpec):
        await compile_notification(NotificationKey('demo', name), document.get('spec'), ManifestSecrets({}))


def test_every_invalid_manifest_is_listed() -> None:
    assert sorted(path.name for path in INVALID.glob('*.yaml')) == sorted(INVALID_MANIFESTS)


@pytest.mark.parametrize('level', ['High', 'Critical', 'Unknown', 0, 5, '3'])
def test_level_is_int_or_string(level: Any) -> None:
    document = notifications_in(ROOT / 'examples' / 'vulnerabilities.yaml')[0]
    document = copy.deepcopy(document)
    document['spec']['eventConfig']['level'] = level
    assert schema_errors(document) == []


def test_status_is_not_required_and_spec_unknown_fields_are_not_schema_errors() -> None:
    # the API server prunes unknown fields instead of rejecting them; config keeps them (free-form)
    document = notifications_in(ROOT / 'examples' / 'push-to-ci.yaml')[0]
    assert 'status' not in document
    config = openapi_schema()['properties']['spec']['properties']['config']
    assert config == {**config, 'type': 'object', 'x-kubernetes-preserve-unknown-fields': True}


# -- the CRD's shape ----------------------------------------------------------------------------

def test_crd_names_and_contract() -> None:
    crd = crd_manifest()
    assert crd['apiVersion'] == 'apiextensions.k8s.io/v1'
    assert crd['kind'] == 'CustomResourceDefinition'
    assert crd['metadata'] == {'name': 'repositorynotifications.reponotify.dev'}
    spec = crd['spec']
    assert spec['group'] == 'reponotify.dev'
    assert spec['scope'] == 'Namespaced'
    assert spec['names'] == {'kind': 'RepositoryNotification', 'plural': 'repositorynotifications',
                             'singular': 'repositorynotification', 'shortNames': ['rn'],
                             'categories': ['reponotify']}
    [version] = spec['versions']
    assert (version['name'], version['served'], version['storage']) == ('v1alpha1', True, True)
    assert version['subresources'] == {'status': {}}
    assert [(c['name'], c['jsonPath']) for c in version['additionalPrinterColumns']] == [
        ('Repository', '.spec.repository'),
        ('Event', '.spec.event'),
        ('Method', '.spec.method'),
        ('Ready', '.status.conditions[?(@.type=="Ready")].status'),
        ('Failures', '.status.numberOfFailures'),
        ('Last Delivery', '.status.lastDelivery.outcome'),
        ('Age', '.metadata.creationTimestamp'),
    ]


def test_schema_is_structural() -> None:
    """Kubernetes' structural schema rules: a type everywhere, no $ref, no anyOf types, no properties+additionalProperties."""
    problems = []

    def walk(node: dict[str, Any], where: str) -> None:
        if '$ref' in node or 'definitions' in node or '$defs' in node:
            problems.append(f"{where}: reference")
        if 'type' not in node and not node.get('x-kubernetes-int-or-string') \
                and not node.get('x-kubernetes-preserve-unknown-fields'):
            problems.append(f"{where}: no type")
        if 'properties' in node and 'additionalProperties' in node:
            problems.append(f"{where}: properties and additionalProperties")
        for combinator in ('anyOf', 'allOf', 'oneOf'):
            for branch in node.get(combinator, []):
                if 'type' in branch:
                    problems.append(f"{where}: type inside {combinator}")
        if 'title' in node:
            problems.append(f"{where}: title")
        for name, child in (node.get('properties') or {}).items():
            walk(child, f"{where}.{name}")
        if isinstance(node.get('items'), dict):
            walk(node['items'], f"{where}[]")

    walk(openapi_schema(), '')
    assert problems == []


def test_checked_in_crd_is_the_generated_one() -> None:
    checked_in = (ROOT / 'crds' / 'repositorynotifications.yaml').read_text()
    assert checked_in == crd_yaml(), "crds/repositorynotifications.yaml drifted: regenerate it with `reponotify crd`"
    assert yaml.safe_load(checked_in) == crd_manifest()
