"""
Repository globs in spec.repository: what they match, that the CRD schema and the models agree,
and that an event matching an exact and several glob notifications is delivered to each, once.
"""
import asyncio
import re
from typing import Any

import jsonschema
import pytest
from conftest import HttpTarget

from reponotify.crd import crd_manifest
from reponotify.dispatcher import DispatcherSettings
from reponotify.engine import Engine, EngineSettings
from reponotify.events import new_event, sample_payload
from reponotify.models import REPOSITORY_OR_GLOB_PATTERN, REPOSITORY_PATTERN
from reponotify.notifications import InvalidSpec, NotificationKey, compile_notification, parse_spec
from reponotify.routing import SMALL_ROUTE, RoutingTable, glob_regex
from reponotify.standalone import ManifestSecrets, StatusFile
from reponotify.status import ReadyCondition


def spec(repository: str, event: str = 'repo_push', url: str = 'http://127.0.0.1:9/hook') -> dict[str, Any]:
    return {'repository': repository, 'event': event, 'method': 'webhook', 'config': {'url': url}}


async def compiled(name: str, repository: str, event: str = 'repo_push', url: str = 'http://127.0.0.1:9/hook'):
    return await compile_notification(NotificationKey('ns', name), spec(repository, event, url), ManifestSecrets({}))


@pytest.mark.parametrize('pattern, repository, matches', [
    ('acme/*', 'acme/web', True),
    ('acme/*', 'acme/team/web', False),      # * stays inside one path component
    ('acme/*/*', 'acme/team/web', True),
    ('acme/*', 'other/web', False),
    ('*/web', 'acme/web', True),
    ('*/web', 'acme/webapp', False),
    ('acme/web-*', 'acme/web-api', True),
    ('acme/web-*', 'acme/web', False),
    ('*/*', 'a/b', True),
    ('acme/w.b', 'acme/wxb', False),          # dots are literal
])
def test_glob_matching(pattern: str, repository: str, matches: bool) -> None:
    assert (glob_regex(pattern).fullmatch(repository) is not None) is matches


@pytest.mark.parametrize('repository, valid', [
    ('acme/web', True), ('acme/*', True), ('*/web', True), ('acme/web-*', True), ('group/sub/*', True),
    ('*', False), ('acme', False), ('Acme/*', False), ('acme//*', False), ('acme/*/', False), ('acme/we b*', False),
])
def test_spec_repository_takes_exact_names_and_globs(repository: str, valid: bool) -> None:
    crd_pattern = crd_manifest()['spec']['versions'][0]['schema']['openAPIV3Schema'][
        'properties']['spec']['properties']['repository']['pattern']
    assert crd_pattern == REPOSITORY_OR_GLOB_PATTERN
    assert (re.match(crd_pattern, repository) is not None) is valid
    try:
        jsonschema.validate(repository, {'type': 'string', 'pattern': crd_pattern})
        schema_valid = True
    except jsonschema.ValidationError:
        schema_valid = False
    assert schema_valid is valid
    if valid:
        assert parse_spec(spec(repository)).repository == repository
    else:
        with pytest.raises(InvalidSpec, match='spec.repository'):
            parse_spec(spec(repository))


def test_events_still_need_an_exact_repository() -> None:
    # The receiver validates event payloads with the exact pattern: an event is never "for acme/*".
    assert re.match(REPOSITORY_PATTERN, 'acme/*') is None


async def test_routing_table_keeps_exact_routes_in_a_dict_and_globs_apart() -> None:
    table = RoutingTable()
    exact, glob, other_kind = await compiled('exact', 'acme/web'), await compiled('glob', 'acme/*'), \
        await compiled('builds', 'acme/*', 'build_success')
    for notification in (exact, glob, other_kind):
        table.put(notification)
    assert [n.key.name for n in table.candidates('acme/web', 'repo_push')] == ['exact', 'glob']
    assert [n.key.name for n in table.candidates('acme/api', 'repo_push')] == ['glob']
    assert [n.key.name for n in table.candidates('acme/api', 'build_success')] == ['builds']
    assert table.candidates('other/web', 'repo_push') == []
    # A notification moving from a glob to an exact name (and back) leaves nothing behind.
    table.put(await compiled('glob', 'other/web'))
    assert [n.key.name for n in table.candidates('acme/api', 'repo_push')] == []
    assert [n.key.name for n in table.candidates('other/web', 'repo_push')] == ['glob']
    table.put(await compiled('glob', '*/web'))
    assert [n.key.name for n in table.candidates('acme/web', 'repo_push')] == ['exact', 'glob']
    for name in ('exact', 'glob', 'builds'):
        table.remove(NotificationKey('ns', name))
    assert len(table) == 0 and table._by_route == {} and table._globs == {}


async def test_a_route_with_many_notifications_keeps_them_in_order_through_puts_and_removes() -> None:
    # Past a handful, a route's notifications are kept by key: adding or removing one must cost the same
    # with thousands on the route (a popular repository) and keep the order a tuple kept.
    table = RoutingTable()
    notifications = [await compiled(f'n{i}', 'acme/web') for i in range(3 * SMALL_ROUTE)]
    for notification in notifications:
        table.put(notification)
    names = [f'n{i}' for i in range(3 * SMALL_ROUTE)]
    assert [n.key.name for n in table.candidates('acme/web', 'repo_push')] == names
    table.put(await compiled('n1', 'acme/web'))  # replaced: it goes last, as a new one would
    assert [n.key.name for n in table.candidates('acme/web', 'repo_push')] == names[:1] + names[2:] + ['n1']
    for name in names[::2]:
        table.remove(NotificationKey('ns', name))
    assert [n.key.name for n in table.candidates('acme/web', 'repo_push')] == names[3::2] + ['n1']
    assert [n.key.name for n in table.match(new_event('repo_push', sample_payload('repo_push', 'acme/web')))] == \
        names[3::2] + ['n1']
    table.put(await compiled('n3', 'acme/api'))  # moved to another route
    assert 'n3' not in [n.key.name for n in table.candidates('acme/web', 'repo_push')]
    for name in names[1::2]:
        table.remove(NotificationKey('ns', name))
    assert len(table) == 0 and table._by_route == {}


async def test_exact_and_glob_notifications_are_each_delivered_once(tmp_path, http_target: HttpTarget) -> None:
    engine = Engine(EngineSettings(dispatcher=DispatcherSettings(retry_schedule=(0.01,)), status_interval=0.0))
    notifications = {
        'exact': ('acme/web', '/exact'), 'namespace-glob': ('acme/*', '/namespace'),
        'name-glob': ('*/web', '/name'), 'elsewhere': ('acme/api', '/elsewhere'),
        'deeper': ('acme/*/*', '/deeper'),
    }
    for name, (repository, path) in notifications.items():
        notification = await compiled(name, repository, url=http_target.url + path)
        engine.put_notification(notification)
        engine.book.set_spec_condition(notification.key, ReadyCondition('True', 'Accepted', 'routed'))
    await engine.start(StatusFile(tmp_path / 'status.json'))
    try:
        accepted = await engine.ingest('repo_push', sample_payload('repo_push', 'acme/web'))
        assert accepted.matched == 3
        await http_target.wait_for(3)
        await asyncio.sleep(0.3)  # nothing else arrives
        assert sorted(request.path for request in http_target.requests) == ['/exact', '/name', '/namespace']
        assert all(request.json()['repository'] == 'acme/web' for request in http_target.requests)
        for name in ('exact', 'namespace-glob', 'name-glob'):
            status = engine.book.status(NotificationKey('ns', name))
            assert status['deliveries']['succeeded'] == 1
            assert status['lastDelivery']['eventId'] == accepted.id
    finally:
        await engine.stop()


async def test_filters_apply_to_glob_notifications() -> None:
    table = RoutingTable()
    notification = await compile_notification(
        NotificationKey('ns', 'severe'), {**spec('acme/*', 'vulnerability_found'), 'eventConfig': {'level': 'High'}},
        ManifestSecrets({}))
    table.put(notification)

    def event(priority: str):
        payload = sample_payload('vulnerability_found', 'acme/web')
        payload['vulnerability'] = {**payload['vulnerability'], 'priority': priority}
        return new_event('vulnerability_found', payload)
    assert table.match(event('Critical')) == [notification]
    assert table.match(event('Low')) == []


@pytest.mark.parametrize('allowed, repository, permitted', [
    ('acme/*', 'acme/*', True),
    ('acme/*', 'acme/web-*', True),
    ('acme/*', 'acme/*/*', True),        # the allowance's * crosses /
    ('acme/*', '*/web', False),
    ('acme/web', 'acme/*', False),
    ('acme/we?', 'acme/we*', False),     # ? would match the glob's * itself: acme/webapp is not allowed
    ('?cme/api', '*cme/api', False),
    ('acme/[w]*', 'acme/w*', False),     # classes never cover a glob
    ('team-*/web', 'team-*/web', True),
    ('*', '*/*', True),
])
def test_tenancy_allows_a_glob_notification_only_when_an_allowance_covers_all_it_matches(
        allowed: str, repository: str, permitted: bool) -> None:
    from reponotify.tenancy import ANNOTATION, allowance_from

    assert allowance_from({ANNOTATION: allowed}, default_allow=False).permits(repository) is permitted


async def test_testing_a_glob_notification_sends_a_sample_for_a_repository_it_matches() -> None:
    from reponotify.engine import Engine, test_payload
    from reponotify.notifications import NotificationKey, compile_notification
    from reponotify.standalone import ManifestSecrets

    spec = {'repository': 'acme/*', 'event': 'repo_push', 'method': 'webhook',
            'config': {'url': 'https://ci.example.com/hook'}}
    notification = await compile_notification(NotificationKey('team-a', 'glob'), spec, ManifestSecrets({}))
    payload = test_payload(notification)
    assert payload['repository'] == 'acme/example'
    assert payload['docker_url'] == 'quay.io/acme/example'
    engine = Engine()
    engine.put_notification(notification)
    from reponotify.events import new_event
    assert engine.routing.match(new_event('repo_push', payload)) == [notification]
