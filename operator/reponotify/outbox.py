"""
The durable outbox: accepted events and their pending deliveries, in SQLite.

An event is answered ``202`` only once it and one pending delivery per
matching notification are committed to disk (WAL mode, ``synchronous=FULL``).
Under load, concurrent requests share one commit (group commit): a writer
thread takes every request queued so far and commits them in one transaction,
so the fsync cost is paid per batch, not per event. What a batch writes (its
deliveries, their ids and rows) is made on the event loop; the thread runs the
statements, and Python only where an ``Idempotency-Key`` must be looked up in the
transaction: Python in that thread holds the GIL the event loop wants.

The dispatcher takes due deliveries from an in-memory heap that mirrors the
table; on start the heap is refilled from disk, so nothing accepted is lost
to a crash or a restart. A delivery row is deleted only after its final
outcome is recorded; its id is the ``webhook-id`` targets see, the same on
every retry and after a restart.

``Idempotency-Key`` values (and their answers) are kept in the same database
for a configurable window, so a retried request is accepted once, also across
restarts. An event made of several source events (a registry adapter coalescing
the tags of one envelope) also *claims* each source event's own key, in the same
transaction: no source event is queued twice, whichever envelope carries it.

Events and deliveries are keyed by SQLite's own integer row ids (``seq``), not by
their UUIDs: a ``TEXT PRIMARY KEY`` is a second B-tree beside the table, and
random UUIDs land all over it. Measured on the exact statements (WAL,
``synchronous=FULL``, batches of 64), inserting one event and one delivery cost
~90 us of CPU with UUID keys and ~30 us with row ids; deleting them, ~50 us and
~12 us. The UUIDs are still stored (``id``): the delivery's is its ``webhook-id``.
The outbox hands the row ids out itself (it is the file's one writer), so a batch
writes each kind of row with one ``executemany``, with no ``lastrowid`` to read
back per row.
The payload is stored as the event serialised it once (``Event.payload_json``),
the same text a webhook without a template sends.

The file's layout is ``PRAGMA user_version`` (``SCHEMA_VERSION``). A file of the
layout before it (version 0: UUID keys) is migrated when opened, in one
transaction: a crash half-way leaves it as it was. A file of a newer layout is
refused rather than misread.
"""
import asyncio
import collections
import concurrent.futures
import dataclasses
import heapq
import itertools
import pathlib
import sqlite3
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from reponotify.events import Event, event_from_json, new_id
from reponotify.notifications import NotificationKey

Clock = Callable[[], float]

# The layout this code reads and writes, stored as PRAGMA user_version (0: the layout with UUID keys).
SCHEMA_VERSION = 2

# Events and their deliveries, keyed by row id (see the module docstring for why).
TABLES = (
    """CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL,
        kind TEXT NOT NULL,
        repository TEXT NOT NULL,
        payload TEXT NOT NULL,
        received_at TEXT NOT NULL
    )""",
    """CREATE TABLE deliveries (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL,
        event_seq INTEGER NOT NULL REFERENCES events(seq),
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        due REAL NOT NULL
    )""",
)
# Deleting a delivery deletes its event once no other delivery refers to it: that check needs this.
DELIVERIES_BY_EVENT = 'CREATE INDEX deliveries_by_event ON deliveries(event_seq)'

# Looked up by key (the text of an Idempotency-Key), so keyed by it: the same in every layout.
IDEMPOTENCY = (
    """CREATE TABLE IF NOT EXISTS idempotency (
        key TEXT PRIMARY KEY,
        event_id TEXT NOT NULL,
        matched INTEGER NOT NULL,
        created REAL NOT NULL
    )""",
    'CREATE INDEX IF NOT EXISTS idempotency_by_age ON idempotency(created)',
)

# From version 0 (events.id and deliveries.id TEXT PRIMARY KEY, deliveries.event_id): the old rows keep
# their row ids as seq, so each delivery finds its event's new seq through the old id index, not a scan.
# Renaming a table takes its indexes along: dropping the old tables drops the old deliveries_by_event.
MIGRATION_FROM_UUID_KEYS = (
    'ALTER TABLE deliveries RENAME TO deliveries_v0',
    'ALTER TABLE events RENAME TO events_v0',
    *TABLES,
    """INSERT INTO events (seq, id, kind, repository, payload, received_at)
        SELECT rowid, id, kind, repository, payload, received_at FROM events_v0""",
    """INSERT INTO deliveries (seq, id, event_seq, namespace, name, attempts, due)
        SELECT d.rowid, d.id, e.rowid, d.namespace, d.name, d.attempts, d.due
        FROM deliveries_v0 d JOIN events_v0 e ON e.id = d.event_id""",
    'DROP TABLE deliveries_v0',
    'DROP TABLE events_v0',
    DELIVERIES_BY_EVENT,
)

PENDING = ('SELECT d.seq, d.id, d.namespace, d.name, d.attempts, d.due, e.seq, e.id, e.kind, e.repository, '
           'e.payload, e.received_at FROM deliveries d JOIN events e ON e.seq = d.event_seq ORDER BY d.seq')


class OutboxError(Exception):
    """The outbox database cannot be used; the message says which file and why."""


@dataclasses.dataclass(frozen=True)
class Accepted:
    """What the receiver answers for an accepted event."""
    id: str
    matched: int
    replayed: bool = False
    taken: tuple[str, ...] = ()  # claims already held by earlier events: nothing was queued (see accept)


@dataclasses.dataclass
class PendingDelivery:
    """One event to deliver to one notification, with its retry bookkeeping."""
    event: Event
    key: NotificationKey
    id: str = dataclasses.field(default_factory=new_id)  # also the webhook-id
    attempts: int = 0
    due: float = 0.0
    # Where it is on disk (row ids, set once written): storage bookkeeping, not part of what it is.
    seq: int | None = dataclasses.field(default=None, compare=False)
    event_seq: int | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass
class _Submission:
    """One write for the next group commit: an accepted event, or a delivery to update or delete."""
    action: str  # 'accept' | 'update' | 'delete'
    event: Event
    idempotency_key: str | None = None
    claims: Sequence[str] = ()
    delivery: PendingDelivery | None = None
    future: asyncio.Future[Any] | None = None
    # An accept's deliveries and rows, made on the event loop (the writer thread only runs statements):
    # written unless its idempotency key or a claim is already held.
    deliveries: list[PendingDelivery] = dataclasses.field(default_factory=list)
    event_row: tuple[Any, ...] | None = None
    delivery_rows: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)


IDEMPOTENCY_PURGE_INTERVAL = 60.0  # seconds between deletions of expired Idempotency-Keys


@dataclasses.dataclass
class _Rows:
    """The rows one batch writes, each kind with one statement (see Outbox._commit)."""
    events: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)
    deliveries: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)
    updates: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)
    deletes: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    emptied: list[tuple[int, str, int]] = dataclasses.field(default_factory=list)  # events whose deliveries went

    def write(self, db: sqlite3.Connection) -> None:
        # Rows are found by row id; the UUID in the WHERE costs nothing more (the row is already found)
        # and keeps a late write (a bug) from touching a row that is not its own.
        if self.events:
            db.executemany('INSERT INTO events (seq, id, kind, repository, payload, received_at) '
                           'VALUES (?, ?, ?, ?, ?, ?)', self.events)
        if self.deliveries:
            db.executemany('INSERT INTO deliveries (seq, id, event_seq, namespace, name, attempts, due) '
                           'VALUES (?, ?, ?, ?, ?, 0, ?)', self.deliveries)
        if self.updates:
            db.executemany('UPDATE deliveries SET attempts = ?, due = ? WHERE seq = ? AND id = ?', self.updates)
        if self.deletes:
            db.executemany('DELETE FROM deliveries WHERE seq = ? AND id = ?', self.deletes)
            # An event goes with its last delivery: once per event, however many of its deliveries went.
            db.executemany('DELETE FROM events WHERE seq = ? AND id = ? '
                           'AND NOT EXISTS (SELECT 1 FROM deliveries WHERE event_seq = ?)', self.emptied)


class Outbox:
    """Pending deliveries on disk, with an in-memory schedule of what is due when."""

    def __init__(self, path: pathlib.Path | str, *, clock: Clock = time.time,
                 idempotency_window: float = 24 * 3600, max_batch: int = 1000) -> None:
        self._path = str(path)
        self._clock = clock
        self._idempotency_window = idempotency_window
        self._max_batch = max_batch
        self._db: sqlite3.Connection | None = None
        # One thread owns the connection: SQLite work never blocks the event loop.
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='outbox')
        self._heap: list[tuple[float, int, PendingDelivery]] = []
        self._sequence = itertools.count()
        # Row ids, handed out here (one writer: this outbox) so that a batch's rows go in with one
        # executemany and no lastrowid each; counted on from the largest on disk at open.
        self._event_seqs = itertools.count(1)
        self._delivery_seqs = itertools.count(1)
        self._purged = float('-inf')  # when expired idempotency keys were last deleted
        self._pending: dict[str, PendingDelivery] = {}
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()  # idle takers
        self._submissions: list[_Submission] = []
        self._writer: asyncio.Task[None] | None = None
        self._submitted: asyncio.Event | None = None
        self._writing = False  # the writer holds a batch it has not committed yet

    def __len__(self) -> int:
        return len(self._pending)

    def pending_keys(self) -> set[NotificationKey]:
        """The notifications that deliveries wait for (due or not)."""
        return {delivery.key for delivery in self._pending.values()}

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> int:
        """Open (or create) the database and load what is pending; returns how many deliveries."""
        self._submitted = asyncio.Event()
        rows = await self._run(self._open_database)
        for delivery in rows:
            self._push(delivery)
        self._writer = asyncio.create_task(self._write_batches(), name='outbox-writer')
        return len(rows)

    async def close(self) -> None:
        """Write what is still queued, then close the database."""
        if self._writer is not None:
            # A batch the writer has taken is no longer in _submissions: wait for it too (cancelling the
            # writer then would drop a commit still queued for the database thread).
            while (self._submissions or self._writing) and not self._writer.done():
                await asyncio.sleep(0.01)
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._writer = None
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._thread.shutdown(wait=True)

    def _open_database(self) -> list[PendingDelivery]:
        if self._path != ':memory:':
            pathlib.Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            db.execute('PRAGMA journal_mode=WAL')
            db.execute('PRAGMA synchronous=FULL')
            check = db.execute('PRAGMA quick_check').fetchone()[0]
            if check != 'ok':
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
            self._prepare(db)
            rows = db.execute(PENDING).fetchall()
            self._event_seqs = itertools.count(db.execute('SELECT coalesce(max(seq), 0) + 1 FROM events').fetchone()[0])
            self._delivery_seqs = itertools.count(
                db.execute('SELECT coalesce(max(seq), 0) + 1 FROM deliveries').fetchone()[0])
        except sqlite3.DatabaseError as exc:
            if db is not None:
                db.close()
            raise OutboxError(f"{self._path}: cannot use the outbox database ({exc}); "
                              "move the file away to start with an empty queue") from None
        except BaseException:
            if db is not None:
                db.close()
            raise
        self._db = db
        events: dict[int, Event] = {}
        deliveries = []
        for (seq, delivery_id, namespace, name, attempts, due, event_seq, event_id, kind, repository, payload,
             received_at) in rows:
            event = events.get(event_seq)
            if event is None:
                event = events[event_seq] = event_from_json(event_id, kind, repository, payload, received_at)
            deliveries.append(PendingDelivery(event=event, key=NotificationKey(namespace, name), id=delivery_id,
                                              attempts=attempts, due=due, seq=seq, event_seq=event_seq))
        return deliveries

    def _prepare(self, db: sqlite3.Connection) -> None:
        """Create the tables, or bring a file of an older layout to this one, in one transaction."""
        db.execute('BEGIN IMMEDIATE')  # also keeps another process from migrating the same file meanwhile
        try:
            version = db.execute('PRAGMA user_version').fetchone()[0]
            if version > SCHEMA_VERSION:
                raise OutboxError(f"{self._path}: written by a newer reponotify (outbox layout {version}; this "
                                  f"version reads layouts up to {SCHEMA_VERSION}): run that version or newer, "
                                  "or move the file away to start with an empty queue")
            if version < SCHEMA_VERSION:
                old = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'").fetchone()
                for statement in MIGRATION_FROM_UUID_KEYS if old else (*TABLES, DELIVERIES_BY_EVENT):
                    db.execute(statement)
                db.execute(f'PRAGMA user_version = {SCHEMA_VERSION}')  # in the transaction: all or nothing
            for statement in IDEMPOTENCY:
                db.execute(statement)
            db.execute('COMMIT')
        except BaseException:
            if db.in_transaction:  # some errors (a full disk) have rolled it back already
                db.execute('ROLLBACK')
            raise

    # -- accepting -------------------------------------------------------------------------------

    async def accept(self, event: Event, keys: Sequence[NotificationKey],
                     idempotency_key: str | None = None, claims: Sequence[str] = ()) -> Accepted:
        """
        Durably queue one delivery per key; returns once committed (or the earlier answer for a key).

        ``claims``: further idempotency keys the event stands for (the source events coalesced
        into it), recorded with it. If an earlier event already holds any of them, nothing is
        queued and the answer's ``taken`` lists them: the caller rebuilds the event without
        those parts and tries again.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._submit(self._accept_submission(event, keys, idempotency_key, claims, future))
        accepted, deliveries = await future
        for delivery in deliveries:
            self._push(delivery)
        # One waiting worker per delivery, not all of them: with 64 idle workers, waking every one
        # (each to find the heap empty again) cost more CPU than accepting the event.
        self._wake(len(deliveries))
        return accepted

    def _accept_submission(self, event: Event, keys: Sequence[NotificationKey], idempotency_key: str | None,
                           claims: Sequence[str], future: asyncio.Future[Any]) -> _Submission:
        """
        An accept with its deliveries and rows made here, on the event loop, not in the writer thread.

        Python code in that thread holds the GIL the event loop wants: the thread should only run
        statements (which give the GIL up). Row ids are handed out here, in submission order; an accept
        that turns out to be a replay leaves a gap in them, which is harmless.
        """
        submission = _Submission('accept', event, idempotency_key, claims=claims, future=future)
        if keys:
            now = self._clock()
            event_seq = next(self._event_seqs)
            submission.event_row = (event_seq, event.id, event.kind, event.repository, event.payload_json,
                                    event.received_at.isoformat())
            for key in keys:
                delivery = PendingDelivery(event=event, key=key, due=now, seq=next(self._delivery_seqs),
                                           event_seq=event_seq)
                submission.deliveries.append(delivery)
                submission.delivery_rows.append((delivery.seq, delivery.id, event_seq, key.namespace, key.name,
                                                 now))
        return submission

    def _submit(self, submission: _Submission) -> None:
        assert self._submitted is not None, "the outbox is not open"
        self._submissions.append(submission)
        self._submitted.set()

    async def _write_batches(self) -> None:
        assert self._submitted is not None
        while True:
            await self._submitted.wait()
            self._submitted.clear()
            while self._submissions:
                batch = self._submissions[:self._max_batch]
                del self._submissions[:self._max_batch]
                self._writing = True
                try:
                    rows, results, checks = self._plan(batch)
                    results = await self._run(self._commit, batch, rows, results, checks)
                except Exception as exc:  # accepting requests get a 5xx; nothing half-written stays
                    for submission in batch:
                        if submission.future is not None and not submission.future.done():
                            submission.future.set_exception(OutboxError(f"could not queue the event: {exc}"))
                    continue
                finally:
                    self._writing = False
                for submission, result in zip(batch, results, strict=True):
                    if submission.future is not None and not submission.future.done():
                        submission.future.set_result(result)

    def _plan(self, batch: list[_Submission]) -> tuple[_Rows, list[Any], list[int]]:
        """
        On the event loop: the rows a batch writes and each submission's answer, as far as they are known.

        An accept with an ``Idempotency-Key`` or claims is answered by the writer thread, which looks the
        keys up in the transaction (its index is in the third list); every other submission is planned
        here, so that the thread runs little Python: Python there holds the GIL the event loop wants
        (measured end to end: the thread's CPU per event fell from about 55 us to 26 us once rows were made here).
        """
        rows = _Rows()
        results: list[Any] = []
        checks: list[int] = []
        emptied: dict[int, str] = {}
        for index, submission in enumerate(batch):
            if submission.action == 'accept':
                if submission.idempotency_key is not None or submission.claims:
                    checks.append(index)
                    results.append(None)
                else:
                    results.append(self._accepted(submission, rows))
                continue
            delivery = submission.delivery
            assert delivery is not None
            # A delivery with no row (never written) has nothing to update or delete.
            if delivery.seq is not None and delivery.event_seq is not None:
                if submission.action == 'update':
                    rows.updates.append((delivery.attempts, delivery.due, delivery.seq, delivery.id))
                else:
                    rows.deletes.append((delivery.seq, delivery.id))
                    emptied[delivery.event_seq] = delivery.event.id
            results.append(None)
        # An event goes with its last delivery: checked once per event, however many of its deliveries went.
        rows.emptied = [(seq, event_id, seq) for seq, event_id in emptied.items()]
        return rows, results, checks

    def _commit(self, batch: list[_Submission], rows: _Rows, results: list[Any], checks: list[int]) -> list[Any]:
        """
        Write a planned batch in one transaction (one fsync), with the effect of writing it in submission order.

        Idempotency keys are checked and recorded one submission at a time (a later request of the
        batch must see an earlier one's key); the rows of events and deliveries are then written with
        one ``executemany`` per statement. That order is the submission order's effect: a delivery is
        updated or deleted only after its accept has committed (an earlier batch), and within a batch
        its update comes before its delete. Few statements matter beyond their cost: each one hands
        the GIL back and forth between this thread and the event loop.
        """
        db = self._database()
        now = self._clock()
        db.execute('BEGIN IMMEDIATE')
        try:
            if now - self._purged >= IDEMPOTENCY_PURGE_INTERVAL:  # expired keys are ignored meanwhile
                db.execute('DELETE FROM idempotency WHERE created < ?', (now - self._idempotency_window,))
                self._purged = now
            for index in checks:
                results[index] = self._accept_one(db, batch[index], now, rows)
            rows.write(db)
            db.execute('COMMIT')
        except BaseException:
            if db.in_transaction:  # some errors (a full disk) have rolled it back already: keep the real one
                db.execute('ROLLBACK')
            raise
        return results

    @staticmethod
    def _accepted(submission: _Submission, rows: _Rows) -> tuple[Accepted, list[PendingDelivery]]:
        """An accept's answer, its rows added to the batch's."""
        if submission.event_row is not None:
            rows.events.append(submission.event_row)
            rows.deliveries.extend(submission.delivery_rows)
        return Accepted(id=submission.event.id, matched=len(submission.deliveries)), submission.deliveries

    def _accept_one(self, db: sqlite3.Connection, submission: _Submission, now: float,
                    rows: '_Rows') -> tuple[Accepted, list[PendingDelivery]]:
        event = submission.event
        oldest = now - self._idempotency_window  # older keys are expired, whether deleted yet or not
        if submission.idempotency_key is not None:
            row = db.execute('SELECT event_id, matched FROM idempotency WHERE key = ? AND created >= ?',
                             (submission.idempotency_key, oldest)).fetchone()
            if row is not None:
                return Accepted(id=row[0], matched=row[1], replayed=True), []
        claims = [claim for claim in dict.fromkeys(submission.claims) if claim != submission.idempotency_key]
        taken = tuple(claim for claim in claims
                      if db.execute('SELECT 1 FROM idempotency WHERE key = ? AND created >= ?',
                                    (claim, oldest)).fetchone())
        if taken:
            return Accepted(id=event.id, matched=0, taken=taken), []
        if submission.idempotency_key is not None:
            claims.insert(0, submission.idempotency_key)
        if claims:
            # OR REPLACE: an expired key may still be on disk until the next purge; a live one was found above.
            db.executemany('INSERT OR REPLACE INTO idempotency (key, event_id, matched, created) VALUES (?, ?, ?, ?)',
                           [(key, event.id, len(submission.deliveries), now) for key in claims])
        return self._accepted(submission, rows)

    # -- dispatching -----------------------------------------------------------------------------

    async def take(self) -> PendingDelivery:
        """Wait for the next due delivery and hand it out (it stays on disk until completed)."""
        # Each idle taker waits on a future of its own, woken one at a time by _wake(). No lock: a
        # taker cancelled while waiting (the dispatcher stopping) has nothing to re-acquire; with
        # Condition.wait() under wait_for, Python 3.11 could leave it stuck forever (tests/test_outbox.py).
        # Checking the heap and registering as a waiter happen with no await in between: no lost wake-up.
        loop = asyncio.get_running_loop()
        while True:
            delay = None
            if self._heap:
                delay = self._heap[0][0] - self._clock()
                if delay <= 0:
                    delivery = heapq.heappop(self._heap)[2]
                    if self._heap:
                        self._wake(1)  # someone else watches the next due time
                    return delivery
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                # asyncio.timeout, not wait_for: on 3.11, wait_for can swallow a cancellation that
                # arrives in the same loop turn as the wake-up, and a stopping worker would go on.
                async with asyncio.timeout(delay):  # until woken, or until the earliest is due
                    await waiter
            except TimeoutError:
                pass
            finally:
                if waiter in self._waiters:  # timed out or cancelled: not a waiter any more
                    self._waiters.remove(waiter)

    async def retry_later(self, delivery: PendingDelivery, delay: float) -> None:
        # Written with the next group commit; lost only in a crash, which repeats an attempt (at least once).
        delivery.due = self._clock() + delay
        self._submit(_Submission('update', delivery.event, delivery=delivery))
        self._push(delivery)
        self._wake(1)  # one worker re-reads the heap (and its next due time)

    async def postpone(self, delivery: PendingDelivery, delay: float) -> None:
        """Put a delivery back for a moment without an attempt (its target is busy): nothing to write."""
        delivery.due = self._clock() + delay
        self._push(delivery)
        self._wake(1)  # one worker re-reads the heap (and its next due time)

    def put_back(self, deliveries: Collection[PendingDelivery]) -> None:
        """Deliveries a taker set aside (without an attempt) are due again, now."""
        now = self._clock()
        for delivery in deliveries:
            delivery.due = now
            self._push(delivery)
        self._wake(len(deliveries))

    async def make_due(self, keys: Collection[NotificationKey]) -> int:
        """
        Make every waiting delivery of these notifications due now; returns how many.

        For deliveries held back by a gate (an e-mail address waiting for verification):
        once the gate opens they go out at once rather than at their next check.
        """
        now = self._clock()
        changed = 0
        for index, (due, sequence, delivery) in enumerate(self._heap):
            if due > now and delivery.key in keys:
                delivery.due = now
                self._heap[index] = (now, sequence, delivery)
                changed += 1
        if changed:
            heapq.heapify(self._heap)
            self._wake(changed)
        return changed

    async def complete(self, delivery: PendingDelivery) -> None:
        """The delivery's final outcome is recorded: remove it (and its event, once nothing refers to it)."""
        self._pending.pop(delivery.id, None)
        self._submit(_Submission('delete', delivery.event, delivery=delivery))

    def oldest_due(self) -> float | None:
        """When the longest-waiting pending delivery was due (for metrics), or None if none is."""
        return min((delivery.due for delivery in self._pending.values()), default=None)

    # -- helpers ---------------------------------------------------------------------------------

    def _push(self, delivery: PendingDelivery) -> None:
        self._pending[delivery.id] = delivery
        heapq.heappush(self._heap, (delivery.due, next(self._sequence), delivery))

    def _wake(self, count: int) -> None:
        """Wake up to ``count`` idle takers to look at the schedule again."""
        while count > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    def _database(self) -> sqlite3.Connection:
        assert self._db is not None, "the outbox is not open"
        return self._db

    async def _run(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)
