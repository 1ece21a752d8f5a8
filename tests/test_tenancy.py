"""
Tenancy against kmock's emulator: a namespace subscribes only to the repositories
its ``reponotify.dev/allowed-repositories`` annotation allows, and without it
the operator's ``--repository-policy`` decides. Changes to the annotation take
effect on the namespace's notifications at once.
"""
from conftest import HttpTarget
from reponotify.events import sample_payload
from reponotify.tenancy import ANNOTATION
from test_operator import NS, Cluster, StartOperator, cluster, condition, start_operator, webhook_spec

__all__ = ['cluster', 'start_operator']  # fixtures used here


async def test_policy_allow_without_annotation_accepts(cluster: Cluster, start_operator: StartOperator,
                                                       http_target: HttpTarget) -> None:
    operator = await start_operator(repository_policy='allow')
    await cluster.create('hook', webhook_spec(f'{http_target.url}/hook'))
    await cluster.wait_ready('hook', 'True', 'Accepted', 1)
    assert (await operator.post_event('repo_push', sample_payload('repo_push', 'acme/web')))['matched'] == 1


async def test_policy_deny_without_annotation_refuses(cluster: Cluster, start_operator: StartOperator,
                                                      http_target: HttpTarget) -> None:
    operator = await start_operator(repository_policy='deny')
    await cluster.create('hook', webhook_spec(f'{http_target.url}/hook'))
    status = await cluster.wait_ready('hook', 'False', 'RepositoryNotPermitted', 1)
    assert condition(status) == {
        'type': 'Ready', 'status': 'False', 'reason': 'RepositoryNotPermitted', 'observedGeneration': 1,
        'message': f"namespace {NS} has no {ANNOTATION} annotation and the operator's repository policy is deny: "
                   "ask a cluster administrator to allow acme/web"}
    assert (await operator.post_event('repo_push', sample_payload('repo_push', 'acme/web')))['matched'] == 0
    assert http_target.requests == []


async def test_the_annotation_allows_matching_repositories_only(cluster: Cluster, start_operator: StartOperator,
                                                                http_target: HttpTarget) -> None:
    await cluster.annotate_namespace(NS, {ANNOTATION: 'acme/*, tools/builder'})
    operator = await start_operator(repository_policy='deny')
    await cluster.create('web', webhook_spec(f'{http_target.url}/web'))
    await cluster.create('other', webhook_spec(f'{http_target.url}/other', repository='evil/web'))
    await cluster.wait_ready('web', 'True', 'Accepted', 1)
    status = await cluster.wait_ready('other', 'False', 'RepositoryNotPermitted', 1)
    assert condition(status)['message'] == (
        f"evil/web is not among the repositories namespace {NS} may subscribe to "
        f"({ANNOTATION}: acme/*, tools/builder); ask a cluster administrator")
    assert (await operator.post_event('repo_push', sample_payload('repo_push', 'evil/web')))['matched'] == 0
    assert (await operator.post_event('repo_push', sample_payload('repo_push', 'acme/web')))['matched'] == 1
    await http_target.wait_for(1, '/web')
    assert http_target.on('/other') == []


async def test_changing_the_annotation_takes_effect_at_once(cluster: Cluster, start_operator: StartOperator,
                                                            http_target: HttpTarget) -> None:
    operator = await start_operator(repository_policy='allow')
    await cluster.create('hook', webhook_spec(f'{http_target.url}/hook'))
    await cluster.wait_ready('hook', 'True', 'Accepted', 1)

    await cluster.annotate_namespace(NS, {ANNOTATION: 'tools/*'})  # acme/web is no longer allowed
    await cluster.wait_ready('hook', 'False', 'RepositoryNotPermitted', 1)
    assert (await operator.post_event('repo_push', sample_payload('repo_push', 'acme/web')))['matched'] == 0

    await cluster.annotate_namespace(NS, {ANNOTATION: None})  # removed: the policy (allow) applies again
    await cluster.wait_ready('hook', 'True', 'Accepted', 1)
    assert (await operator.post_event('repo_push', sample_payload('repo_push', 'acme/web')))['matched'] == 1
    await http_target.wait_for(1, '/hook')
    assert [event['reason'] for event in cluster.events('hook')] == ['Accepted', 'RepositoryNotPermitted', 'Accepted']
