"""
The status flusher: how it writes what the status book records.
"""
import asyncio
from typing import Any

from reponotify.notifications import NotificationKey
from reponotify.status import FLUSH_SLICE, ReadyCondition, StatusBook, StatusFlusher


class InstantSink:
    """A sink that answers at once, as a file does: it never gives the event loop a turn by itself."""

    def __init__(self, turns: list[int]) -> None:
        self.turns = turns  # counted by a task running beside the flush
        self.seen: list[tuple[str, int]] = []  # (notification name, turns counted when written)

    async def write(self, key: NotificationKey, status: dict[str, Any]) -> None:
        self.seen.append((key.name, self.turns[0]))


async def test_a_long_flush_lets_the_event_loop_run_between_slices() -> None:
    """Thousands of changed statuses written to a sink that never waits must not hold the loop for the whole pass."""
    book = StatusBook()
    count = FLUSH_SLICE * 3 + 1
    for i in range(count):
        book.set_spec_condition(NotificationKey('default', f'rn-{i:04d}'), ReadyCondition('True', 'Accepted', 'ok'))
    turns = [0]

    async def count_turns() -> None:
        while True:
            turns[0] += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count_turns())
    await asyncio.sleep(0)
    sink = InstantSink(turns)
    try:
        await StatusFlusher(book, sink, min_interval=1.0).flush(force=True)
    finally:
        counter.cancel()
    # Every status written once, in name order; the loop ran after each slice, and only then.
    assert [name for name, _ in sink.seen] == [f'rn-{i:04d}' for i in range(count)]
    started = sink.seen[0][1]
    assert [turn - started for _, turn in sink.seen] == [i // FLUSH_SLICE for i in range(count)]
