"""
Delivery processes: delivery attempts made in child processes, so that sending uses more than one core.

A Python process runs its code on one core at a time. With ``--delivery-processes N``
the dispatcher hands each attempt of a method that needs nothing of the operator's own
state (webhook, Slack, Flowdock, HipChat, e-mail: see ``Method.runs_in_delivery_process``)
to one of N child processes, which make the HTTP or SMTP call and answer how it went.

Everything the guarantees rest on stays in the parent: the outbox (one writer), the retry
schedule, the failure counts, the e-mail gate and the status book. A child only ever holds
attempts in flight. If it dies, each of those is a failed attempt, retried on the schedule
as a timeout would be (delivery stays at least once), and the child is started again.

Parent and child talk over a socket pair, in length-prefixed pickled tuples; frames written
in one loop turn go out in one system call. Settings (the SMTP password among them) travel
over that socket, never on the command line. A notification's prepared target (its URL and
other secrets resolved) is sent to a child once per compiled version of the notification,
then named by its key (and forgotten when the notification is deleted); the child makes
the attempt with the same method code as the parent.

Messages, parent to child: ``('settings', ChildSettings)`` first, then ``('target', key,
method name, target)``, ``('forget', key)`` and ``('attempt', seq, key, delivery id, event
fields, timeout)``.
Child to parent: ``('result', seq, AttemptResult, seconds)`` or ``('error', seq)`` when the
method raised (a bug: the child logs it; the parent handles it as it does an in-process one).
"""
import asyncio
import dataclasses
import itertools
import logging
import pickle
import signal
import socket
import struct
import sys
import time
from typing import Any

import aiohttp

from reponotify.events import Event
from reponotify.logs import configure_logging, logging_setup
from reponotify.methods import METHODS, AttemptResult, DeliveryContext
from reponotify.methods.base import Method, MethodSettings
from reponotify.notifications import Notification, NotificationKey
from reponotify.outbox import PendingDelivery
from reponotify.targets import GuardedConnector, TargetPolicy

logger = logging.getLogger(__name__)

EXITED_MESSAGE = "the delivery process exited during the attempt"
NOT_RUNNING_MESSAGE = "no delivery process is running"
RESTART_DELAY = 1.0  # seconds between restarts of a child that exits, so a crash loop cannot spin

_HEADER = struct.Struct('!I')


class DeliveryProcessError(Exception):
    """A method raised in a delivery process (its traceback is in that process's log)."""


@dataclasses.dataclass(frozen=True)
class ChildSettings:
    """What a delivery process needs to make attempts as the parent would."""
    methods: MethodSettings
    target_policy: TargetPolicy | None
    connections: int  # the HTTP connection pool's limit
    log_level: str = 'info'
    log_format: str = 'text'


# -- framing ---------------------------------------------------------------------------------------

class _Channel:
    """One end of the socket pair: frames written in one loop turn are sent together."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._buffer: list[bytes] = []

    def send(self, message: tuple[Any, ...]) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if not self._buffer:
            asyncio.get_running_loop().call_soon(self._flush)
        self._buffer.append(_HEADER.pack(len(data)))
        self._buffer.append(data)

    def _flush(self) -> None:
        if not self._writer.is_closing():
            self._writer.write(b''.join(self._buffer))
        self._buffer.clear()

    async def receive(self) -> tuple[Any, ...] | None:
        """The next message, or None once the other end has closed."""
        try:
            header = await self._reader.readexactly(_HEADER.size)
            message: tuple[Any, ...] = pickle.loads(await self._reader.readexactly(_HEADER.unpack(header)[0]))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return message

    async def close(self) -> None:
        self._flush()
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except ConnectionError:
            pass


def _event_fields(event: Event) -> tuple[Any, ...]:
    return event.id, event.kind, event.repository, event.payload, event.received_at


def _names(key: NotificationKey) -> tuple[str, str]:
    # A plain tuple pickles several times faster than the dataclass: it is in every message.
    return key.namespace, key.name


# -- parent side -----------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class _Child:
    """One delivery process as the parent sees it."""
    index: int
    process: asyncio.subprocess.Process
    channel: _Channel
    pending: dict[int, asyncio.Future[tuple[AttemptResult, float]]] = dataclasses.field(default_factory=dict)
    # The compiled notification whose target this child holds, per key: a new version is sent again.
    targets: dict[NotificationKey, Notification] = dataclasses.field(default_factory=dict)
    reader: asyncio.Task[None] | None = None


class DeliveryProcesses:
    """N child processes making delivery attempts for the dispatcher."""

    def __init__(self, count: int, settings: ChildSettings) -> None:
        if count < 1:
            raise ValueError("at least one delivery process")
        self._count = count
        self._settings = settings
        self._children: list[_Child | None] = [None] * count
        self._keepers: list[asyncio.Task[None]] = []
        self._ready = asyncio.Condition()
        self._sequence = itertools.count()
        self._closing = False

    @property
    def pids(self) -> list[int]:
        """The running children's process ids (for tests and diagnostics)."""
        return [child.process.pid for child in self._children if child is not None]

    async def start(self) -> None:
        """Start every child; returns once each is running."""
        for index in range(self._count):
            self._children[index] = await self._spawn(index)
        self._keepers = [asyncio.create_task(self._keep(index), name=f'delivery-process-{index}')
                         for index in range(self._count)]

    async def stop(self) -> None:
        """Close every child: attempts still in flight there are abandoned (they stay in the outbox)."""
        self._closing = True
        for keeper in self._keepers:
            keeper.cancel()
        await asyncio.gather(*self._keepers, return_exceptions=True)
        self._keepers = []
        for index, child in enumerate(self._children):
            if child is not None:
                await self._close(child)
                self._children[index] = None

    async def attempt(self, notification: Notification, delivery: PendingDelivery,
                      timeout: float) -> tuple[AttemptResult, float]:
        """Make one attempt in a child: its result and how long it took there, in seconds."""
        child = await self._choose(timeout)
        if child is None:
            return AttemptResult(ok=False, message=NOT_RUNNING_MESSAGE), 0.0
        key = delivery.key
        if child.targets.get(key) is not notification:
            child.channel.send(('target', _names(key), notification.method.name, notification.target))
            child.targets[key] = notification
        sequence = next(self._sequence)
        future: asyncio.Future[tuple[AttemptResult, float]] = asyncio.get_running_loop().create_future()
        child.pending[sequence] = future
        child.channel.send(('attempt', sequence, _names(key), delivery.id, _event_fields(delivery.event), timeout))
        try:
            return await future
        finally:
            child.pending.pop(sequence, None)

    def holds(self, key: NotificationKey) -> bool:
        """Whether a child was sent this notification's target (and not told to forget it)."""
        return any(child is not None and key in child.targets for child in self._children)

    def forget(self, key: NotificationKey) -> None:
        """A notification is gone: every child drops its target (and the secrets in it)."""
        for child in self._children:
            if child is not None and child.targets.pop(key, None) is not None:
                child.channel.send(('forget', _names(key)))

    async def _choose(self, timeout: float) -> _Child | None:
        """The running child with the fewest attempts in flight, waiting up to ``timeout`` for one."""
        running = [child for child in self._children if child is not None]
        if not running:
            try:
                async with asyncio.timeout(timeout):
                    async with self._ready:
                        await self._ready.wait_for(lambda: any(self._children) or self._closing)
            except TimeoutError:
                return None
            running = [child for child in self._children if child is not None]
            if not running:
                return None
        return min(running, key=lambda child: len(child.pending))

    async def _spawn(self, index: int) -> _Child:
        parent_end, child_end = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, '-m', 'reponotify.delivery_processes', str(child_end.fileno()),
                pass_fds=(child_end.fileno(),), stdin=asyncio.subprocess.DEVNULL)
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        reader, writer = await asyncio.open_connection(sock=parent_end)
        child = _Child(index=index, process=process, channel=_Channel(reader, writer))
        child.channel.send(('settings', self._settings))
        child.reader = asyncio.create_task(self._read(child), name=f'delivery-process-{index}-reader')
        logger.debug("Delivery process %d started (pid %d)", index, process.pid)
        async with self._ready:
            self._ready.notify_all()
        return child

    async def _read(self, child: _Child) -> None:
        """Hand each answer to the attempt waiting for it, until the child's end closes."""
        while (message := await child.channel.receive()) is not None:
            future = child.pending.get(message[1])
            if future is None or future.done():  # its attempt was cancelled meanwhile
                continue
            if message[0] == 'result':
                future.set_result((message[2], message[3]))
            else:
                future.set_exception(DeliveryProcessError("the method raised in a delivery process (see its log)"))

    async def _keep(self, index: int) -> None:
        """Restart the child in slot ``index`` whenever it exits, failing its attempts in flight."""
        while True:
            child = self._children[index]
            assert child is not None and child.reader is not None
            await child.reader
            code = await child.process.wait()
            self._children[index] = None
            logger.error("Delivery process %d (pid %d) exited with code %s; %d attempts in flight are retried",
                         index, child.process.pid, code, len(child.pending))
            for future in child.pending.values():
                if not future.done():
                    future.set_result((AttemptResult(ok=False, message=EXITED_MESSAGE), 0.0))
            await child.channel.close()
            await asyncio.sleep(RESTART_DELAY)
            self._children[index] = await self._spawn(index)

    @staticmethod
    async def _close(child: _Child) -> None:
        await child.channel.close()  # the child sees the end of its input and exits
        try:
            async with asyncio.timeout(5):
                await child.process.wait()
        except TimeoutError:
            child.process.kill()
            await child.process.wait()
        if child.reader is not None:
            child.reader.cancel()
            await asyncio.gather(child.reader, return_exceptions=True)
        for future in child.pending.values():
            if not future.done():
                future.cancel()


# -- child side ------------------------------------------------------------------------------------

async def _serve(descriptor: int) -> None:
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=descriptor))
    channel = _Channel(reader, writer)
    first = await channel.receive()
    if first is None:
        return
    settings: ChildSettings = first[1]
    configure_logging(settings.log_level, settings.log_format)
    connector: aiohttp.TCPConnector
    if settings.target_policy is not None:
        connector = GuardedConnector(settings.target_policy, limit=settings.connections)
    else:
        connector = aiohttp.TCPConnector(limit=settings.connections)
    targets: dict[tuple[str, str], tuple[Method, Any]] = {}  # (namespace, name) -> method, target
    attempts: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as http:
        while (message := await channel.receive()) is not None:
            if message[0] == 'target':
                _, key, method_name, target = message
                targets[key] = (METHODS[method_name], target)
            elif message[0] == 'forget':
                targets.pop(message[1], None)
            else:
                _, sequence, key, delivery_id, fields, timeout = message
                method, target = targets[key]
                context = DeliveryContext(http=http, delivery_id=delivery_id, timeout=timeout,
                                          settings=settings.methods, notification=key)
                task = asyncio.create_task(_attempt(channel, sequence, method, target, Event(*fields), context))
                attempts.add(task)
                task.add_done_callback(attempts.discard)
        for task in attempts:  # the parent has closed: it no longer waits for these
            task.cancel()
        await asyncio.gather(*attempts, return_exceptions=True)
    await channel.close()


async def _attempt(channel: _Channel, sequence: int, method: Method, target: Any, event: Event,
                   context: DeliveryContext) -> None:
    started = time.monotonic()
    try:
        result = await method.deliver(target, event, context)
    except Exception:  # a bug must not kill the process; the parent retries as for one of its own
        logger.exception("Unexpected error delivering %s to %s/%s", context.delivery_id, *context.notification)
        channel.send(('error', sequence))
        return
    channel.send(('result', sequence, result, time.monotonic() - started))


def main() -> None:
    # Ctrl-C and SIGTERM reach the whole process group: the parent decides when we stop (it
    # closes the socket after its grace period), so attempts in flight are not cut short here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    asyncio.run(_serve(int(sys.argv[1])))


def child_settings(methods: MethodSettings, target_policy: TargetPolicy | None, connections: int) -> ChildSettings:
    """Settings for the children, logging as this process does."""
    level, log_format = logging_setup()
    return ChildSettings(methods=methods, target_policy=target_policy, connections=connections,
                         log_level=level, log_format=log_format)


if __name__ == '__main__':
    main()
