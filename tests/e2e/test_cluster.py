"""
End to end on a real cluster: runs only when KUBECONFIG is set (kind, k3d, any).

It installs the chart with real helm (image from REPONOTIFY_E2E_IMAGE, which the
cluster must be able to pull or have loaded, e.g. `kind load docker-image`),
applies a notification whose webhook target runs in the cluster (an echo
server from REPONOTIFY_E2E_TARGET_IMAGE that records requests), posts an event
through a port-forward with the chart's token, and checks the delivery in
`kubectl get rn` and the status.
"""
import base64
import json
import os
import pathlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not os.environ.get('KUBECONFIG'), reason="needs a real cluster: set KUBECONFIG"),
]


def tool(name: str) -> str:
    found = shutil.which(name) or str(ROOT / '.tools' / 'bin' / name)
    if not pathlib.Path(found).exists():
        subprocess.run(['bash', str(ROOT / 'scripts' / 'tools.sh')], check=True)
    return found


def run(*command: str, input: str | None = None) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True, input=input).stdout


@pytest.fixture(scope='module')
def namespace() -> Iterator[str]:
    name = f'reponotify-e2e-{uuid.uuid4().hex[:6]}'
    kubectl = tool('kubectl')
    run(kubectl, 'create', 'namespace', name)
    yield name
    run(kubectl, 'delete', 'namespace', name, '--wait=false')


@pytest.fixture(scope='module')
def release(namespace: str) -> Iterator[str]:
    helm = tool('helm')
    image = os.environ.get('REPONOTIFY_E2E_IMAGE', 'reponotify:dev')
    repository, _, tag = image.rpartition(':')
    run(helm, 'install', 'reponotify', str(ROOT / 'charts' / 'reponotify'), '--namespace', namespace,
        '--set', f'image.repository={repository}', '--set', f'image.tag={tag}',
        '--set', 'persistence.enabled=false', '--set', f'watchNamespaces={{{namespace}}}',
        '--set', 'allowTargets={0.0.0.0/0}', '--wait', '--timeout', '180s')
    yield 'reponotify'
    run(helm, 'uninstall', 'reponotify', '--namespace', namespace)


@pytest.fixture(scope='module')
def receiver(namespace: str, release: str) -> Iterator[tuple[str, str]]:
    kubectl = tool('kubectl')
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    forward = subprocess.Popen([kubectl, 'port-forward', '-n', namespace, f'svc/{release}', f'{port}:8080'],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    secret = json.loads(run(kubectl, 'get', 'secret', '-n', namespace, f'{release}-token', '-o', 'json'))
    token = base64.b64decode(next(iter(secret['data'].values()))).decode()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f'http://127.0.0.1:{port}/healthz', timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    yield f'http://127.0.0.1:{port}', token
    forward.terminate()


def test_install_apply_post_and_see_the_delivery(namespace: str, receiver: tuple[str, str]) -> None:
    kubectl = tool('kubectl')
    target_image = os.environ.get('REPONOTIFY_E2E_TARGET_IMAGE', 'mendhak/http-https-echo:31')
    run(kubectl, 'run', 'target', '-n', namespace, f'--image={target_image}', '--port=8080', '--expose')
    run(kubectl, 'wait', '-n', namespace, '--for=condition=Ready', 'pod/target', '--timeout=120s')
    notification = {
        'apiVersion': 'reponotify.dev/v1alpha1', 'kind': 'RepositoryNotification',
        'metadata': {'name': 'e2e-push', 'namespace': namespace},
        'spec': {'repository': 'acme/web', 'event': 'repo_push', 'method': 'webhook',
                 'config': {'url': f'http://target.{namespace}.svc:8080/hook'}},
    }
    run(kubectl, 'apply', '-f', '-', input=json.dumps(notification))
    run(kubectl, 'wait', '-n', namespace, '--for=condition=Ready', 'rn/e2e-push', '--timeout=60s')

    url, token = receiver
    payload = json.loads((ROOT / 'operator' / 'reponotify' / 'samples' / 'repo_push.json').read_text())
    payload.update(repository='acme/web', namespace='acme', name='web')
    answer = httpx.post(f'{url}/v1/events/repo_push', json=payload, headers={'Authorization': f'Bearer {token}'})
    assert answer.status_code == 202 and answer.json()['matched'] == 1

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = json.loads(run(kubectl, 'get', 'rn', 'e2e-push', '-n', namespace, '-o', 'json')).get('status', {})
        if (status.get('lastDelivery') or {}).get('outcome') == 'Succeeded':
            break
        time.sleep(1)
    assert status['lastDelivery']['eventId'] == answer.json()['id']
    table = run(kubectl, 'get', 'rn', '-n', namespace)
    header, row = table.splitlines()[:2]
    assert header.split()[:6] == ['NAME', 'REPOSITORY', 'EVENT', 'METHOD', 'READY', 'FAILURES']
    assert row.split()[:7] == ['e2e-push', 'acme/web', 'repo_push', 'webhook', 'True', '0', 'Succeeded']
    logs = run(kubectl, 'logs', '-n', namespace, 'target')
    assert '"updated_tags"' in logs  # the echo server printed the payload it received
