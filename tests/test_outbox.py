"""The outbox's scheduling under the dispatcher's worst case: many takers, cancelled at once."""
import asyncio
import random

from reponotify.events import new_event, sample_payload
from reponotify.notifications import NotificationKey
from reponotify.outbox import Outbox


async def test_cancelling_many_waiting_takers_never_deadlocks() -> None:
    # The dispatcher's stop cancels 64 workers waiting in take(), some with a due item moments away:
    # with a Condition and wait_for, a cancelled waiter could hang re-acquiring the lock forever.
    outbox = Outbox(':memory:')
    await outbox.open()
    try:
        event = new_event('repo_push', sample_payload('repo_push', 'acme/web'))
        for round in range(40):
            takers = [asyncio.create_task(outbox.take()) for _ in range(64)]
            await outbox.accept(event, [NotificationKey('ns', f'n{round}-{i}') for i in range(3)])
            first = await asyncio.wait_for(asyncio.shield(asyncio.gather(*takers[:0])), 1)  # let them run
            del first
            await asyncio.sleep(random.uniform(0, 0.003))
            taken = [task for task in takers if task.done() and not task.cancelled()]
            for task in takers:
                task.cancel()
            done, pending = await asyncio.wait(takers, timeout=5)
            assert not pending, f"round {round}: {len(pending)} takers never finished after cancel"
            for task in taken:  # whatever was handed out is completed, the rest goes back
                await outbox.complete(task.result())
            while len(outbox) and (delivery := await asyncio.wait_for(outbox.take(), 1)):
                await outbox.complete(delivery)
    finally:
        await outbox.close()


async def test_a_delivery_due_later_is_handed_out_when_due() -> None:
    outbox = Outbox(':memory:')
    await outbox.open()
    try:
        event = new_event('repo_push', sample_payload('repo_push', 'acme/web'))
        await outbox.accept(event, [NotificationKey('ns', 'n')])
        delivery = await outbox.take()
        await outbox.retry_later(delivery, 0.05)
        waiting = [asyncio.create_task(outbox.take()) for _ in range(8)]
        done, pending = await asyncio.wait(waiting, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        assert [task.result() for task in done] == [delivery]  # exactly one taker gets it
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=5)
    finally:
        await outbox.close()
