"""
The status flusher: how it writes what the status book records, and standalone mode's status file.
"""
import asyncio
import json
from typing import Any

from reponotify.notifications import NotificationKey
from reponotify.standalone import StatusFile
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


async def test_the_status_file_is_written_once_per_slice_not_once_per_status(tmp_path) -> None:
    """Standalone mode's file: a flush of many changed statuses rewrites it a few times, and it holds them all."""
    book = StatusBook()
    count = FLUSH_SLICE * 10
    for i in range(count):
        book.set_spec_condition(NotificationKey('default', f'rn-{i:04d}'), ReadyCondition('True', 'Accepted', 'ok'))
    status_file = StatusFile(tmp_path / 'status.json')
    await StatusFlusher(book, status_file, min_interval=1.0).flush(force=True)
    await asyncio.sleep(0)  # the turn that writes the last slice
    saved = json.loads((tmp_path / 'status.json').read_text())
    assert sorted(saved) == [f'default/rn-{i:04d}' for i in range(count)]
    assert saved['default/rn-0007']['conditions'][0]['reason'] == 'Accepted'
    assert status_file.saves == 10  # once per slice of FLUSH_SLICE statuses (it was once per status: 640)

    status_file.save()  # nothing changed since: nothing to write
    assert status_file.saves == 10
    book.record_attempt(NotificationKey('default', 'rn-0001'), ok=False)
    await StatusFlusher(book, status_file, min_interval=1.0).flush(force=True)
    status_file.save()  # at shutdown, before the scheduled write runs
    assert json.loads((tmp_path / 'status.json').read_text())['default/rn-0001']['numberOfFailures'] == 1
    assert status_file.saves == 11
    await asyncio.sleep(0)  # the scheduled write finds nothing left to write
    assert status_file.saves == 11


async def test_a_write_cut_short_by_the_stop_is_made_by_the_final_flush() -> None:
    """Stopping cancels the flusher mid-write: that status is not lost, the final flush writes it."""
    class StallingSink:
        def __init__(self) -> None:
            self.written: list[str] = []
            self.stalled = asyncio.Event()

        async def write(self, key: NotificationKey, status: dict[str, Any]) -> None:
            if not self.stalled.is_set():  # the first write hangs (a slow API server) until cancelled
                self.stalled.set()
                await asyncio.Event().wait()
            self.written.append(key.name)

    book = StatusBook()
    book.set_spec_condition(NotificationKey('default', 'hook'), ReadyCondition('True', 'Accepted', 'ok'))
    sink = StallingSink()
    flusher = StatusFlusher(book, sink, min_interval=1.0)
    running = asyncio.create_task(flusher.run())
    await asyncio.wait_for(sink.stalled.wait(), 5)
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    assert sink.written == []
    await flusher.flush(force=True)  # as Engine.stop does
    assert sink.written == ['hook']


class RecordingSink:
    """Records which statuses were written, in order."""

    def __init__(self) -> None:
        self.written: list[str] = []

    async def write(self, key: NotificationKey, status: dict[str, Any]) -> None:
        self.written.append(key.name)


ACCEPTED = ReadyCondition('True', 'Accepted', 'ok')


async def written_once(*names: str) -> tuple[StatusBook, RecordingSink, StatusFlusher, list[NotificationKey]]:
    """Accepted notifications, each status written once by a flusher with a long interval."""
    book = StatusBook()
    sink = RecordingSink()
    flusher = StatusFlusher(book, sink, min_interval=60.0)
    keys = [NotificationKey('default', name) for name in names]
    for key in keys:
        book.set_spec_condition(key, ACCEPTED)
    await flusher.flush(force=False)
    return book, sink, flusher, keys


async def test_a_deleted_notification_held_back_by_the_interval_is_not_written_nor_brought_back() -> None:
    """Its change waited for the interval when it was deleted: no write for it, and no entry made again."""
    book, sink, flusher, (kept, gone) = await written_once('kept', 'gone')
    for key in (kept, gone):
        book.record_attempt(key, ok=False)  # changed again within the interval: held back
    await flusher.flush(force=False)
    assert sink.written == ['gone', 'kept']
    book.forget(gone)  # deleted meanwhile

    await flusher.flush(force=True)  # as at shutdown
    assert sink.written == ['gone', 'kept', 'kept']
    assert book.keys() == [kept]
    assert book.ready_reasons() == {'Accepted': 1}  # the metric counted a "Pending" ghost


async def test_writing_some_statuses_now_leaves_the_others_to_their_interval() -> None:
    """A front end writes the status of the resource it handled now; the others still wait for their interval."""
    book, sink, flusher, (busy, applied) = await written_once('busy', 'applied')
    assert sink.written == ['applied', 'busy']
    book.record_attempt(busy, ok=True)  # a delivery within the interval: held back
    book.set_spec_condition(applied, ReadyCondition('False', 'Suspended', 'spec.suspend is true'))  # re-applied

    await flusher.flush(force=False, now=[applied])  # its handler asks: now, whatever the interval
    assert sink.written == ['applied', 'busy', 'applied']
    await flusher.flush(force=False)
    assert sink.written == ['applied', 'busy', 'applied']  # busy still waits for its interval
    await flusher.flush(force=True)
    assert sink.written == ['applied', 'busy', 'applied', 'busy']
