"""
What ``kubectl get rn`` shows: the CRD's printer columns, evaluated on objects the operator really wrote.

An API server turns each ``additionalPrinterColumns`` JSONPath into a column of
``kubectl get``; without a cluster the same paths are evaluated here on the
object as the operator left it in kmock's emulator (after a delivery, and after
three failures disabled it), with jsonpath-ng; and, where the linux x86-64 tools
run, cross-checked with kubectl's own JSONPath implementation (client-go's, the
one the API server uses), through ``kubectl annotate --local -o jsonpath``.
"""
import json
import pathlib
import platform
import re
import subprocess
from typing import Any

import pytest
import yaml
from conftest import HttpTarget, Reply
from jsonpath_ng.ext import parse
from reponotify.events import sample_payload
from test_operator import Cluster, StartOperator, cluster, start_operator, webhook_spec

__all__ = ['cluster', 'start_operator']  # fixtures used here

ROOT = pathlib.Path(__file__).resolve().parent.parent
CRD = ROOT / 'crds' / 'repositorynotifications.yaml'
RFC3339 = re.compile(r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$')


def printer_columns() -> list[dict[str, Any]]:
    crd = yaml.safe_load(CRD.read_text())
    [version] = [version for version in crd['spec']['versions'] if version['served']]
    return version['additionalPrinterColumns']


def columns(obj: dict[str, Any]) -> dict[str, Any]:
    """Each column's value as the API server computes it: the first match of its JSONPath, or None."""
    row = {}
    for column in printer_columns():
        matches = [match.value for match in parse('$' + column['jsonPath']).find(obj)]
        assert len(matches) <= 1, (column, matches)
        row[column['name']] = matches[0] if matches else None
    return row


def test_the_columns_are_the_documented_ones() -> None:
    assert [(column['name'], column['type']) for column in printer_columns()] == [
        ('Repository', 'string'), ('Event', 'string'), ('Method', 'string'), ('Ready', 'string'),
        ('Failures', 'integer'), ('Last Delivery', 'string'), ('Age', 'date')]


@pytest.fixture(scope='module')
def kubectl() -> pathlib.Path | None:
    """kubectl from scripts/tools.sh, or None where its linux x86-64 binary cannot run."""
    if platform.system() != 'Linux' or platform.machine().lower() not in ('x86_64', 'amd64'):
        return None
    result = subprocess.run(['bash', str(ROOT / 'scripts' / 'tools.sh')], capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, f"scripts/tools.sh failed:\n{result.stdout}\n{result.stderr}"
    return pathlib.Path(result.stdout.strip().splitlines()[-1]) / 'kubectl'


def kubectl_columns(kubectl: pathlib.Path, obj: dict[str, Any], tmp_path: pathlib.Path) -> dict[str, str]:
    """The columns as kubectl's JSONPath evaluates them, locally (no cluster: --local)."""
    path = tmp_path / 'object.json'
    path.write_text(json.dumps(obj))
    template = '\x1f'.join('{' + column['jsonPath'] + '}' for column in printer_columns())
    result = subprocess.run([str(kubectl), 'annotate', '--local', '-f', str(path), 'printer=columns',
                             '-o', f'jsonpath={template}'], capture_output=True, text=True, timeout=60, check=False,
                            env={'KUBECONFIG': str(tmp_path / 'no-kubeconfig'), 'HOME': str(tmp_path)})
    assert result.returncode == 0, result.stderr
    return dict(zip([column['name'] for column in printer_columns()], result.stdout.split('\x1f'), strict=True))


def as_kubectl_prints(value: Any) -> str:
    return '' if value is None else str(value)


async def test_columns_show_real_values(cluster: Cluster, start_operator: StartOperator, http_target: HttpTarget,
                                        kubectl: pathlib.Path | None, tmp_path: pathlib.Path) -> None:
    http_target.script('/down', Reply(status=500))
    operator = await start_operator()
    await cluster.create('push-to-ci', webhook_spec(f'{http_target.url}/hook'))
    await cluster.create('to-a-dead-end', webhook_spec(f'{http_target.url}/down', repository='acme/api'))
    await cluster.wait_ready('push-to-ci', 'True', 'Accepted', 1)
    await cluster.wait_ready('to-a-dead-end', 'True', 'Accepted', 1)

    fresh = columns(cluster.get('push-to-ci'))
    assert RFC3339.match(fresh.pop('Age'))
    assert fresh == {'Repository': 'acme/web', 'Event': 'repo_push', 'Method': 'webhook', 'Ready': 'True',
                     'Failures': 0, 'Last Delivery': None}  # nothing delivered yet: an empty cell

    await operator.post_event('repo_push', sample_payload('repo_push', 'acme/web'))
    await operator.post_event('repo_push', sample_payload('repo_push', 'acme/api'))
    await cluster.wait_status('push-to-ci', lambda s: s['deliveries']['succeeded'] == 1, "the delivery")
    await cluster.wait_status('to-a-dead-end', lambda s: s['deliveries']['failed'] == 1, "the failure")

    delivered, disabled = cluster.get('push-to-ci'), cluster.get('to-a-dead-end')
    rows = {'push-to-ci': columns(delivered), 'to-a-dead-end': columns(disabled)}
    assert rows['push-to-ci'].pop('Age') == delivered['metadata']['creationTimestamp']
    assert rows['to-a-dead-end'].pop('Age') == disabled['metadata']['creationTimestamp']
    assert rows['push-to-ci'] == {'Repository': 'acme/web', 'Event': 'repo_push', 'Method': 'webhook',
                                  'Ready': 'True', 'Failures': 0, 'Last Delivery': 'Succeeded'}
    assert rows['to-a-dead-end'] == {'Repository': 'acme/api', 'Event': 'repo_push', 'Method': 'webhook',
                                     'Ready': 'False', 'Failures': 3, 'Last Delivery': 'Failed'}

    if kubectl is None:
        pytest.skip("kubectl's linux x86-64 binary cannot run here; the jsonpath-ng evaluation passed")
    for obj in (delivered, disabled):
        assert kubectl_columns(kubectl, obj, tmp_path) == {
            name: as_kubectl_prints(value) for name, value in columns(obj).items()}
