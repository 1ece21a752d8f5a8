"""
Retry spacing with a controllable clock: no test sleeps through a schedule.

The outbox and the dispatcher share a fake clock. Each attempt is made by
hand (``take`` then ``process``), and the due time of the next attempt is read
from the outbox: full jitter puts it anywhere in [0, schedule step], and a
``Retry-After`` makes it at least that long.
"""
import dataclasses
from collections.abc import AsyncIterator

import pytest

from conftest import HttpTarget, Reply
from reponotify.dispatcher import Dispatcher, DispatcherSettings
from reponotify.events import new_event, sample_payload
from reponotify.notifications import NotificationKey, compile_notification
from reponotify.outbox import Outbox
from reponotify.routing import RoutingTable
from reponotify.standalone import ManifestSecrets
from reponotify.status import ReadyCondition, StatusBook

KEY = NotificationKey('team-a', 'hook')
SCHEDULE = (5.0, 300.0, 1800.0, 7200.0)


@dataclasses.dataclass
class FakeClock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def make_parts(http_target: HttpTarget, schedule: tuple[float, ...]
                     ) -> tuple[FakeClock, Outbox, Dispatcher, StatusBook]:
    clock = FakeClock()
    outbox = Outbox(':memory:', clock=clock)
    await outbox.open()
    routing, book = RoutingTable(), StatusBook()
    spec = {'repository': 'acme/web', 'event': 'repo_push', 'method': 'webhook',
            'config': {'url': f'{http_target.url}/hook'}}
    notification = await compile_notification(KEY, spec, ManifestSecrets({}))
    routing.put(notification)
    book.set_spec_condition(KEY, ReadyCondition('True', 'Accepted', 'routed'))
    dispatcher = Dispatcher(outbox, routing, book, DispatcherSettings(workers=0, retry_schedule=schedule))
    await dispatcher.start()  # no workers: the tests make every attempt themselves
    return clock, outbox, dispatcher, book


@pytest.fixture
async def parts(http_target: HttpTarget) -> AsyncIterator[tuple[FakeClock, Outbox, Dispatcher, StatusBook]]:
    made = await make_parts(http_target, SCHEDULE)
    yield made
    await made[2].stop()
    await made[1].close()


async def test_500_then_429_with_retry_after_then_200_follow_the_schedule(
        http_target: HttpTarget, parts: tuple[FakeClock, Outbox, Dispatcher, StatusBook]) -> None:
    clock, outbox, dispatcher, book = parts
    http_target.script('/hook', Reply(status=500), Reply(status=429, headers={'Retry-After': '120'}), Reply())
    await outbox.accept(new_event('repo_push', sample_payload('repo_push', 'acme/web')), [KEY])

    delivery = await outbox.take()  # due at once
    await dispatcher.process(delivery)
    assert delivery.attempts == 1
    first_delay = delivery.due - clock.now
    assert 0 <= first_delay <= SCHEDULE[0]  # full jitter over the first step
    assert book.status(KEY)['lastDelivery']['outcome'] == 'Retrying'
    assert book.status(KEY)['numberOfFailures'] == 1

    clock.now = delivery.due
    assert await outbox.take() is delivery
    await dispatcher.process(delivery)
    assert delivery.attempts == 2
    second_delay = delivery.due - clock.now
    assert 120 <= second_delay <= SCHEDULE[1]  # Retry-After is the floor, the second step the ceiling
    assert book.status(KEY)['lastDelivery']['code'] == 429
    assert book.status(KEY)['numberOfFailures'] == 2

    clock.now = delivery.due
    assert await outbox.take() is delivery
    await dispatcher.process(delivery)
    assert delivery.attempts == 3
    assert len(outbox) == 0
    status = book.status(KEY)
    assert status['lastDelivery']['outcome'] == 'Succeeded' and status['lastDelivery']['attempts'] == 3
    assert status['numberOfFailures'] == 0  # a success resets Quay's failure count
    assert [request.path for request in http_target.requests] == ['/hook'] * 3


async def test_retry_after_longer_than_the_step_wins(
        http_target: HttpTarget, parts: tuple[FakeClock, Outbox, Dispatcher, StatusBook]) -> None:
    clock, outbox, dispatcher, book = parts
    http_target.script('/hook', Reply(status=503, headers={'Retry-After': '600'}))
    await outbox.accept(new_event('repo_push', sample_payload('repo_push', 'acme/web')), [KEY])

    delivery = await outbox.take()
    await dispatcher.process(delivery)
    assert delivery.due - clock.now == 600  # the target asked for 600 s; the first step is only 5 s


async def test_the_schedule_runs_out_and_the_delivery_fails(http_target: HttpTarget) -> None:
    # One retry step: two failed attempts end the delivery, below Quay's three that would disable.
    clock, outbox, dispatcher, book = await make_parts(http_target, (5.0,))
    try:
        http_target.script('/hook', Reply(status=500))
        await outbox.accept(new_event('repo_push', sample_payload('repo_push', 'acme/web')), [KEY])
        delivery = await outbox.take()
        await dispatcher.process(delivery)
        clock.now = delivery.due
        assert await outbox.take() is delivery
        await dispatcher.process(delivery)

        status = book.status(KEY)
        assert status['lastDelivery']['outcome'] == 'Failed'
        assert status['lastDelivery']['message'] == "webhook target answered 500; gave up after 2 attempts"
        assert status['deliveries'] == {'succeeded': 0, 'failed': 1, 'dropped': 0}
        assert status['numberOfFailures'] == 2 and status['conditions'][0]['reason'] == 'Accepted'
        assert len(outbox) == 0 and len(http_target.requests) == 2
    finally:
        await dispatcher.stop()
        await outbox.close()
