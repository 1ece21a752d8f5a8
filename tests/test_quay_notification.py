"""
The quay_notification method: an inbox entry for an audience, and (under the
operator) a Kubernetes Event on the RepositoryNotification.
"""
import json

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from reponotify.engine import Engine
from reponotify.events import new_event, sample_payload
from reponotify.inbox import INBOX_SIZE
from reponotify.notifications import InvalidSpec, NotificationKey, compile_notification
from reponotify.receiver import make_app
from reponotify.standalone import ManifestSecrets
from reponotify.status import ReadyCondition
from conftest import eventually
from test_operator import NS, Cluster, StartOperator, cluster, start_operator

__all__ = ['cluster', 'start_operator']  # fixtures used here

SPEC = {'repository': 'acme/web', 'event': 'vulnerability_found', 'method': 'quay_notification',
        'config': {'target': {'kind': 'team', 'name': 'security'}}}
SUMMARY = "Critical vulnerability detected in repository acme/web in 2 tags"


async def test_operator_posts_an_event_and_fills_the_inbox(cluster: Cluster, start_operator: StartOperator) -> None:
    operator = await start_operator()
    await cluster.create('security', SPEC)
    await cluster.wait_ready('security', 'True', 'Accepted', 1)
    accepted = await operator.post_event('vulnerability_found', sample_payload('vulnerability_found', 'acme/web'))

    event = await eventually(lambda: next((e for e in cluster.events('security')
                                           if e['reason'] == 'vulnerability_found'), None), "the Kubernetes Event")
    assert (event['type'], event['message']) == ('Normal', SUMMARY)
    assert event['involvedObject']['name'] == 'security' and event['involvedObject']['namespace'] == NS
    async with aiohttp.ClientSession() as http:
        async with http.get(f'{operator.receiver_url}/v1/inbox', params={'kind': 'team', 'name': 'security'}) as r:
            inbox = await r.json()
    [entry] = inbox['items']
    assert {key: entry[key] for key in ('eventId', 'event', 'repository', 'summary', 'level', 'notification')} == {
        'eventId': accepted['id'], 'event': 'vulnerability_found', 'repository': 'acme/web',
        'summary': SUMMARY, 'level': 'error', 'notification': f'{NS}/security'}
    await cluster.wait_status('security', lambda s: s['deliveries']['succeeded'] == 1, "the delivery recorded")


async def test_standalone_inbox_is_newest_first_and_bounded() -> None:
    engine = Engine()
    key = NotificationKey('team-a', 'security')
    engine.put_notification(await compile_notification(key, SPEC, ManifestSecrets({})))
    engine.book.set_spec_condition(key, ReadyCondition('True', 'Accepted', 'routed'))

    class Sink:
        async def write(self, *_: object) -> None: ...

    await engine.start(Sink())
    try:
        async with TestClient(TestServer(make_app(engine))) as client:
            ids = []
            for _ in range(INBOX_SIZE + 5):
                payload = sample_payload('vulnerability_found', 'acme/web')
                response = await client.post('/v1/events/vulnerability_found', data=json.dumps(payload))
                ids.append((await response.json())['id'])

            async def inbox() -> list[dict[str, str]]:
                response = await client.get('/v1/inbox', params={'kind': 'team', 'name': 'security'})
                return (await response.json())['items']
            await eventually(lambda: engine.book.status(key)['deliveries']['succeeded'] == INBOX_SIZE + 5,
                             "every delivery")
            items = await inbox()
            assert len(items) == INBOX_SIZE
            assert {item['eventId'] for item in items} == set(ids[5:])  # the oldest five fell out
            other = await client.get('/v1/inbox', params={'kind': 'user', 'name': 'security'})
            assert (await other.json())['items'] == []  # another audience sees nothing
            bad = await client.get('/v1/inbox', params={'kind': 'group', 'name': 'x'})
            assert bad.status == 400
            assert await bad.json() == {'error': "query must name an audience: ?kind=<user|team|org>&name=<name>"}
    finally:
        await engine.stop()


@pytest.mark.parametrize(('target', 'message'), [
    ({'kind': 'group', 'name': 'x'}, "spec.config.target.kind: Input should be 'user', 'team' or 'org'"),
    ({'kind': 'team'}, "spec.config.target.name: Field required"),
    (None, "spec.config.target: Input should be a valid dictionary or instance of Target"),
])
async def test_invalid_targets_are_refused_up_front(target: object, message: str) -> None:
    spec = {**SPEC, 'config': {'target': target}}
    with pytest.raises(InvalidSpec) as info:
        await compile_notification(NotificationKey('team-a', 'n'), spec, ManifestSecrets({}))
    assert str(info.value) == message


async def test_a_retried_delivery_is_one_inbox_entry() -> None:
    from reponotify.inbox import Inbox, InboxEntry
    inbox = Inbox()
    event = new_event('vulnerability_found', sample_payload('vulnerability_found', 'acme/web'))
    for _ in range(2):
        inbox.add('team', 'security', InboxEntry(event.id, event.kind, event.repository, event.summary, 'error',
                                                 'team-a/security'))
    assert len(inbox.latest('team', 'security')) == 1
