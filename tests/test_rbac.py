"""
The chart's RBAC against what the operator really does.

The operator runs against kmock's emulator through a representative flow
(create, a Secret lookup, a delivery with a retry, status, Events, a namespace
annotation seen on the namespace watch, a spec change, delete; the test and reset
annotations would add no call of another kind: their handlers post Events and
write status, and kopf patches the resource as it does after any handler). Every request it made (kopf's and its own client's, told apart
from the test's by User-Agent) becomes an RBAC triple (API group, resource[/sub-
resource], verb) in a namespace or cluster-wide. The chart is rendered with the
real helm for the same mode (cluster-wide, or the watched namespaces only), and:

* every triple the operator used is granted by the rendered Roles/ClusterRole;
* the rendered rules are exactly the documented least-privilege list
  (``DOCUMENTED_RULES`` of test_chart, values.yaml's ``rbac`` comment);
* every documented rule was used in the flow, except the ones listed in
  ``GRANTED_BUT_NOT_EXERCISED`` with the reason (and ``EXERCISED_BY_A_RACE``:
  used or not depending on timing).
"""
from typing import Any

import kmock
import pytest
from conftest import HttpTarget, Reply
from reponotify.events import sample_payload
from reponotify.models import GROUP, PLURAL
from reponotify.tenancy import ANNOTATION
from test_chart import (
    CLUSTER_RULES,
    DOCUMENTED_RULES,
    NAMESPACED_RULES,
    Helm,
    helm,
    only,
    rules_of,
    tools,
)
from test_delivery import eventually
from test_operator import NS, Cluster, StartOperator, cluster, start_operator

__all__ = ['cluster', 'helm', 'start_operator', 'tools']  # fixtures used here

Triple = tuple[str, str, str]  # (API group, resource or resource/subresource, verb)
Use = tuple[Triple, str | None]  # and the namespace (None: cluster-wide or cluster-scoped)

# Discovery, which the system:discovery ClusterRole grants every authenticated user.
DISCOVERY = ('/api', '/apis', '/version')

# Documented and granted, but not called in the flow, with the reason.
# Used or not depending on timing, both being right.
EXERCISED_BY_A_RACE: dict[Triple, str] = {
    ('', 'namespaces', 'get'): "the operator reads a Namespace's annotation only when a notification is handled "
                               "before the namespace watch has listed its namespace (a start-up race)",
}
GRANTED_BUT_NOT_EXERCISED: dict[Triple, str] = {
    (GROUP, PLURAL, 'get'): "neither kopf 1.45 nor the operator reads one object; kopf lists and watches "
                            "(a read-only verb the chart documents; not needed so far)",
    ('apiextensions.k8s.io', 'customresourcedefinitions', 'get'): "kopf lists and watches CRDs, never reads one "
                                                                  "(as above)",
}


def verb(request: kmock.Request) -> str:
    if request.method == 'GET':
        if request.name is not None:
            return 'get'
        return 'watch' if str(request.params.get('watch', '')).lower() in ('true', '1') else 'list'
    if request.method == 'DELETE':
        return 'delete' if request.name is not None else 'deletecollection'
    return {'POST': 'create', 'PATCH': 'patch', 'PUT': 'update'}[request.method]


def operator_uses(cluster: Cluster) -> set[Use]:
    """What the operator called: kopf's requests and its own client's, not the test's."""
    uses: set[Use] = set()
    for request in cluster.kube._requests:
        agent = request.headers.get('User-Agent', '')
        if not (agent.startswith('kopf/') or agent == 'reponotify'):
            continue
        if request.resource is None or request.resource.plural is None:  # /api, /apis, /apis/<group>/<version>
            assert request.url.path.startswith(DISCOVERY), f"a non-resource request: {request.method} {request.url}"
            continue
        resource = request.resource.plural + (f'/{request.subresource}' if request.subresource else '')
        uses.add(((request.resource.group or '', resource, verb(request)), request.namespace))
    return uses


async def representative_flow(cluster: Cluster, start_operator: StartOperator, http_target: HttpTarget,
                              namespaces: list[str]) -> None:
    http_target.script('/hook', Reply(status=500), Reply(status=200))  # a retry, then successes
    await cluster.create_secret('hook-secret', {'url': f'{http_target.url}/hook'})
    operator = await start_operator(namespaces=namespaces, warning_interval=0.0)
    spec = {'repository': 'acme/web', 'event': 'repo_push', 'method': 'webhook',
            'config': {'urlFrom': {'secretKeyRef': {'name': 'hook-secret', 'key': 'url'}}}}
    await cluster.create('flow', spec)
    await cluster.wait_ready('flow', 'True', 'Accepted', 1)

    await operator.post_event('repo_push', sample_payload('repo_push', 'acme/web'))  # fails once, then succeeds
    await cluster.wait_status('flow', lambda s: s['deliveries']['succeeded'] == 1, "the delivery")
    await eventually(lambda: any(e['reason'] == 'DeliveryRetrying' for e in cluster.events('flow')), "the Warning")

    await cluster.annotate_namespace(NS, {ANNOTATION: 'tools/*'})  # seen on the namespace watch
    await cluster.wait_ready('flow', 'False', 'RepositoryNotPermitted', 1)
    await cluster.annotate_namespace(NS, {ANNOTATION: 'acme/*'})
    await cluster.wait_ready('flow', 'True', 'Accepted', 1)

    await cluster.patch_spec('flow', {'title': 'Changed'})
    await cluster.wait_ready('flow', 'True', 'Accepted', 2)
    await cluster.delete('flow')
    await eventually(lambda: not operator.routed('flow'), "the deleted notification to be unrouted")
    await operator.stop()


def granted(documents: list[dict[str, Any]], use: Use) -> bool:
    triple, namespace = use
    if triple in rules_of(only(documents, 'ClusterRole')):
        return True
    return namespace is not None and any(
        doc['kind'] == 'Role' and doc['metadata']['namespace'] == namespace and triple in rules_of(doc)
        for doc in documents)


@pytest.mark.parametrize('mode', ['namespaced', 'cluster-wide'])
async def test_the_operator_needs_exactly_the_granted_rules(
        cluster: Cluster, start_operator: StartOperator, http_target: HttpTarget, helm: Helm, mode: str) -> None:
    namespaces = [NS] if mode == 'namespaced' else []
    await representative_flow(cluster, start_operator, http_target, namespaces)
    uses = operator_uses(cluster)
    documents = helm.template({'watchNamespaces': namespaces} if namespaces else {})

    # Every call the operator made is allowed by what the chart grants in this mode.
    refused = sorted((triple, namespace) for triple, namespace in uses if not granted(documents, (triple, namespace)))
    assert refused == [], f"the operator needs rules the chart does not grant: {refused}"

    # The chart grants the documented rules and nothing else ...
    rendered = rules_of(only(documents, 'ClusterRole'))
    for doc in documents:
        if doc['kind'] == 'Role':
            assert doc['metadata']['namespace'] in namespaces
            assert rules_of(doc) == NAMESPACED_RULES
            rendered |= rules_of(doc)
    assert rendered == DOCUMENTED_RULES
    if namespaces:
        assert rules_of(only(documents, 'ClusterRole')) == CLUSTER_RULES

    # ... and each of them is used (or its absence here explained).
    used = {triple for triple, _ in uses}
    unused = DOCUMENTED_RULES - used - set(EXERCISED_BY_A_RACE)
    assert unused == set(GRANTED_BUT_NOT_EXERCISED), sorted(unused)
    assert used <= DOCUMENTED_RULES
    if namespaces:  # the watched namespaces' resources are only ever asked for in those namespaces
        assert {namespace for (_, resource, _), namespace in uses if resource != 'namespaces'
                and resource != 'customresourcedefinitions'} == {NS}
