"""
The outbox: its scheduling under the dispatcher's worst case (many takers, cancelled at once), and its file.

Files written before row-id keys (``PRAGMA user_version`` 0) are migrated when opened; a file of a newer
layout is refused.
"""
import asyncio
import dataclasses
import datetime
import json
import os
import pathlib
import random
import sqlite3
import uuid

import pytest

from reponotify import outbox as outbox_module
from reponotify.events import Event, new_event, new_id, sample_payload, uuid4_text
from reponotify.notifications import NotificationKey
from reponotify.outbox import SCHEMA_VERSION, Outbox, OutboxError, PendingDelivery

# The layout before row-id keys (user_version 0), exactly as that code created it.
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    repository TEXT NOT NULL,
    payload TEXT NOT NULL,
    received_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY,
    event_id TEXT NOT NULL REFERENCES events(id),
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    due REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_by_event ON deliveries(event_id);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    event_id TEXT NOT NULL,
    matched INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_by_age ON idempotency(created);
"""

NOW = 1_750_000_000.0
PUSH = sample_payload('repo_push', 'acme/web')
SCAN = {**sample_payload('vulnerability_found', 'acme/api'), 'note': 'caf\u00e9 \u2603', 'score': 7.5}
OLD_EVENTS = [  # id, kind, repository, payload, received_at (as the old code wrote them: json.dumps, isoformat)
    ('9b2e6f0a-0000-4000-8000-000000000001', 'repo_push', 'acme/web', PUSH, '2025-06-15T10:00:00.123456+00:00'),
    ('9b2e6f0a-0000-4000-8000-000000000002', 'vulnerability_found', 'acme/api', SCAN, '2025-06-15T10:00:01+00:00'),
]
OLD_DELIVERIES = [  # id, event id, namespace, name, attempts, due
    ('d0000000-0000-4000-8000-00000000000a', OLD_EVENTS[0][0], 'team-a', 'push-hook', 0, NOW - 30),
    ('d0000000-0000-4000-8000-00000000000b', OLD_EVENTS[0][0], 'team-b', 'slack', 2, NOW - 20),
    ('d0000000-0000-4000-8000-00000000000c', OLD_EVENTS[1][0], 'team-a', 'scan-hook', 1, NOW - 10),
]


def write_old_file(path: pathlib.Path) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute('PRAGMA journal_mode=WAL')  # as the old code opened it
    db.executescript(OLD_SCHEMA)
    db.executemany('INSERT INTO events (id, kind, repository, payload, received_at) VALUES (?, ?, ?, ?, ?)',
                   [(id, kind, repository, json.dumps(payload), received) for id, kind, repository, payload, received
                    in OLD_EVENTS])
    db.executemany('INSERT INTO deliveries (id, event_id, namespace, name, attempts, due) VALUES (?, ?, ?, ?, ?, ?)',
                   OLD_DELIVERIES)
    db.execute('INSERT INTO idempotency (key, event_id, matched, created) VALUES (?, ?, ?, ?)',
               ('quay:abc', OLD_EVENTS[0][0], 2, NOW - 60))
    db.close()


def read_file(path: pathlib.Path) -> dict[str, object]:
    """What is on disk: the layout version, table names and the rows (ids, not row ids)."""
    db = sqlite3.connect(path)
    try:
        return {
            'version': db.execute('PRAGMA user_version').fetchone()[0],
            'tables': sorted(row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")),
            'events': sorted(db.execute('SELECT id FROM events').fetchall()),
            'deliveries': sorted(db.execute(
                'SELECT d.id, e.id, d.namespace, d.name, d.attempts, d.due FROM deliveries d '
                'JOIN events e ON e.seq = d.event_seq').fetchall()),
        }
    finally:
        db.close()


async def take_all(outbox: Outbox, count: int) -> list[PendingDelivery]:
    return [await asyncio.wait_for(outbox.take(), 1) for _ in range(count)]


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


async def test_a_file_of_the_old_layout_opens_with_every_delivery_intact(tmp_path: pathlib.Path) -> None:
    path = tmp_path / 'outbox.sqlite3'
    write_old_file(path)
    outbox = Outbox(path, clock=lambda: NOW)
    assert await outbox.open() == 3
    try:
        push, slack, scan = await take_all(outbox, 3)  # in due order
        for delivery, (id, event_id, namespace, name, attempts, due) in zip((push, slack, scan), OLD_DELIVERIES):
            assert (delivery.id, delivery.event.id, delivery.key, delivery.attempts, delivery.due) == (
                id, event_id, NotificationKey(namespace, name), attempts, due)
            assert delivery.seq is not None and delivery.event_seq is not None
        for delivery, (id, kind, repository, payload, received) in ((push, OLD_EVENTS[0]), (scan, OLD_EVENTS[1])):
            assert delivery.event == Event(id=id, kind=kind, repository=repository, payload=payload,
                                           received_at=datetime.datetime.fromisoformat(received))
            assert delivery.event.payload_json == json.dumps(payload)  # the bytes a webhook gets, as before
        assert push.event is slack.event and push.event_seq == slack.event_seq  # one event, loaded once
        assert push.event.received_at.tzinfo is not None

        # The idempotency key is still held: a retried request gets the old answer.
        replayed = await outbox.accept(new_event('repo_push', PUSH), [NotificationKey('team-a', 'push-hook')],
                                       idempotency_key='quay:abc')
        assert (replayed.id, replayed.matched, replayed.replayed) == (OLD_EVENTS[0][0], 2, True)

        await outbox.complete(push)
        slack.attempts += 1
        await outbox.retry_later(slack, 60)
        await outbox.complete(scan)
    finally:
        await outbox.close()

    assert read_file(path) == {
        'version': SCHEMA_VERSION,
        'tables': ['deliveries', 'events', 'idempotency'],  # the old tables are gone
        'events': [(OLD_EVENTS[0][0],)],  # the scan event went with its last delivery
        'deliveries': [(slack.id, OLD_EVENTS[0][0], 'team-b', 'slack', 3, NOW + 60)],
    }
    reopened = Outbox(path, clock=lambda: NOW + 60)
    assert await reopened.open() == 1
    try:
        [again] = await take_all(reopened, 1)
        assert (again.id, again.attempts, again.due, again.event) == (slack.id, 3, NOW + 60, slack.event)
        await reopened.complete(again)
    finally:
        await reopened.close()
    assert read_file(path)['events'] == read_file(path)['deliveries'] == []


async def test_a_migration_that_fails_half_way_leaves_the_old_file_as_it_was(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As a crash would: the migration is one transaction, so the file keeps the old layout and every row.
    path = tmp_path / 'outbox.sqlite3'
    write_old_file(path)
    steps = outbox_module.MIGRATION_FROM_UUID_KEYS
    failing = (*steps[:-3], 'INSERT INTO no_such_table VALUES (1)', *steps[-3:])  # after the copy, before the drops
    monkeypatch.setattr(outbox_module, 'MIGRATION_FROM_UUID_KEYS', failing)
    with pytest.raises(OutboxError, match='no such table: no_such_table'):
        await Outbox(path).open()

    db = sqlite3.connect(path)
    try:
        assert db.execute('PRAGMA user_version').fetchone()[0] == 0
        assert sorted(row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")) == [
            'deliveries', 'events', 'idempotency']
        assert sorted(db.execute('SELECT id, event_id, namespace, name, attempts, due FROM deliveries')) == sorted(
            OLD_DELIVERIES)
    finally:
        db.close()

    monkeypatch.setattr(outbox_module, 'MIGRATION_FROM_UUID_KEYS', steps)
    outbox = Outbox(path)
    assert await outbox.open() == 3
    await outbox.close()
    assert read_file(path)['version'] == SCHEMA_VERSION


async def test_a_file_of_a_newer_layout_is_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / 'outbox.sqlite3'
    db = sqlite3.connect(path)
    db.execute(f'PRAGMA user_version = {SCHEMA_VERSION + 1}')
    db.close()
    with pytest.raises(OutboxError) as raised:
        await Outbox(path).open()
    assert str(raised.value) == (
        f"{path}: written by a newer reponotify (outbox layout {SCHEMA_VERSION + 1}; this version reads layouts up "
        f"to {SCHEMA_VERSION}): run that version or newer, or move the file away to start with an empty queue")
    db = sqlite3.connect(path)
    assert db.execute('PRAGMA user_version').fetchone()[0] == SCHEMA_VERSION + 1  # left as it was
    db.close()


async def test_a_new_file_gets_the_current_layout_and_keeps_what_is_pending(tmp_path: pathlib.Path) -> None:
    path = tmp_path / 'state' / 'outbox.sqlite3'
    outbox = Outbox(path, clock=lambda: NOW)
    assert await outbox.open() == 0
    event = new_event('repo_push', PUSH)
    try:
        await outbox.accept(event, [NotificationKey('ns', 'a'), NotificationKey('ns', 'b')])
        first, second = await take_all(outbox, 2)
        assert first.seq != second.seq and first.event_seq == second.event_seq is not None
    finally:
        await outbox.close()
    assert read_file(path) == {
        'version': SCHEMA_VERSION, 'tables': ['deliveries', 'events', 'idempotency'], 'events': [(event.id,)],
        'deliveries': sorted([(first.id, event.id, 'ns', 'a', 0, NOW), (second.id, event.id, 'ns', 'b', 0, NOW)]),
    }
    reopened = Outbox(path, clock=lambda: NOW)
    assert await reopened.open() == 2
    await reopened.close()


async def test_row_ids_are_not_reused_and_a_late_write_of_a_finished_delivery_changes_nothing(
        tmp_path: pathlib.Path) -> None:
    path = tmp_path / 'outbox.sqlite3'
    outbox = Outbox(path, clock=lambda: NOW)
    await outbox.open()
    try:
        await outbox.accept(new_event('repo_push', PUSH), [NotificationKey('ns', 'old')])
        [finished] = await take_all(outbox, 1)
        await outbox.complete(finished)
        await outbox.accept(new_event('repo_push', PUSH), [NotificationKey('ns', 'new')])
        [current] = await take_all(outbox, 1)
        # SQLite alone would give the new rows the row ids just freed; the outbox hands out new ones.
        assert current.seq != finished.seq and current.event_seq != finished.event_seq
        await outbox.retry_later(finished, 100)  # a bug's late writes: they must not reach another row
        await outbox.complete(finished)
        await outbox.complete(finished)
    finally:
        await outbox.close()
    assert read_file(path)['deliveries'] == [(current.id, current.event.id, 'ns', 'new', 0, NOW)]


async def test_row_ids_go_on_from_the_largest_on_disk_after_a_restart(tmp_path: pathlib.Path) -> None:
    path = tmp_path / 'outbox.sqlite3'
    outbox = Outbox(path, clock=lambda: NOW)
    await outbox.open()
    try:
        await outbox.accept(new_event('repo_push', PUSH), [NotificationKey('ns', 'a'), NotificationKey('ns', 'b')])
        before = await take_all(outbox, 2)
    finally:
        await outbox.close()
    reopened = Outbox(path, clock=lambda: NOW)
    assert await reopened.open() == 2
    try:
        await reopened.accept(new_event('repo_push', PUSH), [NotificationKey('ns', 'c')])
        pending = await take_all(reopened, 3)
    finally:
        await reopened.close()
    [added] = [delivery for delivery in pending if delivery.key.name == 'c']
    assert added.seq == max(d.seq for d in before if d.seq is not None) + 1
    assert added.event_seq == before[0].event_seq + 1  # type: ignore[operator]
    assert len(read_file(path)['deliveries']) == 3


async def test_a_delivery_made_by_hand_has_no_row_and_compares_as_before() -> None:
    event = new_event('repo_push', PUSH)
    made = PendingDelivery(event, NotificationKey('ns', 'n'), 'id-1', 2, 5.0)
    assert (made.seq, made.event_seq) == (None, None)
    assert made == dataclasses.replace(made, seq=7, event_seq=3)  # row ids are not part of what it is
    outbox = Outbox(':memory:')
    await outbox.open()
    try:
        await outbox.retry_later(made, 0)  # nothing on disk to update or delete: no error either
        await outbox.complete(made)
    finally:
        await outbox.close()


def test_the_payload_is_serialised_once_and_not_part_of_the_event() -> None:
    event = new_event('vulnerability_found', SCAN)
    text = event.payload_json
    assert text == json.dumps(SCAN) and event.payload_json is text  # default separators; cached
    copy = Event(event.id, event.kind, event.repository, dict(SCAN), event.received_at)
    assert copy == event and repr(copy) == repr(event)  # the cache is in neither
    assert 'payload_json' not in repr(event) and '_payload_json' not in repr(event)
    replaced = dataclasses.replace(event, payload={'repository': 'acme/other'})
    assert replaced.payload_json == '{"repository": "acme/other"}'


async def test_an_idempotency_key_is_remembered_for_the_window_and_only_then(tmp_path: pathlib.Path) -> None:
    now = [NOW]
    path = tmp_path / 'outbox.sqlite3'
    outbox = Outbox(path, clock=lambda: now[0], idempotency_window=10)
    await outbox.open()
    key = [NotificationKey('ns', 'hook')]
    try:
        first = await outbox.accept(new_event('repo_push', PUSH), key, idempotency_key='push-1')
        now[0] += 9  # within the window: the same answer, nothing queued
        again = await outbox.accept(new_event('repo_push', PUSH), key, idempotency_key='push-1')
        assert (again.id, again.matched, again.replayed) == (first.id, 1, True)
        now[0] += 11  # expired, though not deleted yet (expired keys are purged once a minute): accepted anew
        later = await outbox.accept(new_event('repo_push', PUSH), key, idempotency_key='push-1')
        assert (later.replayed, later.matched) == (False, 1) and later.id != first.id
        now[0] += 1  # and the key now stands for the new event
        replay = await outbox.accept(new_event('repo_push', PUSH), key, idempotency_key='push-1')
        assert (replay.id, replay.replayed) == (later.id, True)
        now[0] += 120  # the next batch after a minute deletes expired keys
        await outbox.accept(new_event('repo_push', PUSH), key, idempotency_key='push-2')
    finally:
        await outbox.close()
    db = sqlite3.connect(path)
    assert db.execute('SELECT key FROM idempotency').fetchall() == [('push-2',)]
    db.close()


@pytest.mark.parametrize('random', [b'\x00' * 16, b'\xff' * 16, bytes(range(16)), os.urandom(16)],
                         ids=['zeros', 'ones', 'counting', 'random'])
def test_an_id_is_the_version_4_uuid_of_its_random_bytes(random: bytes) -> None:
    assert uuid4_text(random) == str(uuid.UUID(bytes=random, version=4))


def test_event_and_delivery_ids_are_distinct_random_uuids() -> None:
    """Ids come from the system's CSPRNG in blocks: every one a version 4 UUID, none repeated (also across a fork)."""
    ids = [new_event('repo_push', sample_payload('repo_push', 'acme/web')).id for _ in range(300)]
    ids += [PendingDelivery(event=new_event('repo_push', sample_payload('repo_push')),
                            key=NotificationKey('default', 'hook')).id for _ in range(300)]
    parsed = [uuid.UUID(value) for value in ids]
    assert all(str(value) == text for value, text in zip(parsed, ids))  # canonical text
    assert {(value.version, value.variant) for value in parsed} == {(4, uuid.RFC_4122)}
    assert len(set(ids)) == len(ids)  # more than one block (256 ids) drawn

    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the child's next ids must not be the ones the parent draws next
        os.write(writer, json.dumps([new_id() for _ in range(5)]).encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(child, 0)
    with os.fdopen(reader) as pipe:
        in_child = json.loads(pipe.read())
    assert not set(in_child) & {new_id() for _ in range(5)}
