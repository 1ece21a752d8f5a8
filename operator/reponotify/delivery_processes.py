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
Children run at a lower CPU priority than the parent (``NICENESS``): sending is background
work, and when the cores are busy the receiver should answer first.

Parent and child talk over a socket pair, in length-prefixed pickled tuples; frames written
in one loop turn go out in one system call, and every complete frame a read brings is handled
at once. An event crosses as its payload's JSON text (``Event.payload_json``), not as a dict.
Settings (the SMTP password among them) travel over that socket, never on the command line.
A notification's prepared target (its URL and other secrets resolved) is sent to a child once
per compiled version of the notification, then named by its key (and forgotten when the
notification is deleted); the child makes the attempt with the same method code as the parent.

How many children: ``--delivery-processes auto`` (the default) starts one per CPU the process
may use (:func:`available_cpus`: its CPU affinity, lowered by a container's CPU limit), at most
``AUTO_LIMIT``, and none on a single CPU, where a child would only add the cost of talking to it.

Messages, parent to child: ``('settings', ChildSettings)`` first, then ``('target', key,
method name, target)``, ``('forget', key)`` and ``('attempt', seq, key, delivery id, event
fields, timeout)``.
Child to parent: ``('ready',)`` once set up (the parent's ``start()`` waits for it), then
``('result', seq, AttemptResult, seconds)`` or ``('error', seq)`` when the method raised (a bug:
the child logs it; the parent handles it as it does an in-process one).
"""
import asyncio
import dataclasses
import functools
import itertools
import logging
import math
import os
import pathlib
import pickle
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import aiohttp

from reponotify.eventloop import DEFAULT_EVENT_LOOP, freeze_startup_objects, run, running_loop_name
from reponotify.events import Event, event_from_json
from reponotify.logs import configure_logging, logging_setup
from reponotify.methods import METHODS, AttemptResult, DeliveryContext
from reponotify.methods.base import Method, MethodSettings
from reponotify.notifications import Notification, NotificationKey
from reponotify.outbox import PendingDelivery
from reponotify.targets import TargetPolicy, delivery_session

logger = logging.getLogger(__name__)

EXITED_MESSAGE = "the delivery process exited during the attempt"
NOT_RUNNING_MESSAGE = "no delivery process is running"
RESTART_DELAY = 1.0  # seconds between restarts of a child that exits, so a crash loop cannot spin
START_TIMEOUT = 60.0  # seconds a new child may take to import and say it is ready
# Added to a child's CPU niceness: when the cores are busy, the parent (receiving events, answering
# registries that wait for it) runs first, and sending catches up after. Raising one's own niceness
# needs no privilege. The parent also feeds the pipeline, so sending goes faster when it never waits
# for a child. Measured here (2 cores, two children), +15 against +5: deliveries/s +7-23% and end to
# end +2-14% (two pairs of benchmark runs); the receiver's median latency at 2,200 events/s about
# halved (five pairs; its p99 did not move). +10 and +19 did no better.
NICENESS = 15

_HEADER = struct.Struct('!I')

AUTO = 'auto'
# The most children ``auto`` starts. Measured on 2 CPUs: two children sent 1.3x what one did (the
# delivery benchmark). Each child is a Python process of its own (about 55 MB resident here), and the
# parent's own work (receiving, the outbox, the status) stays on one core whatever the count, so on a
# large node more children would mostly cost memory.
AUTO_LIMIT = 4
CGROUP_ROOT = pathlib.Path('/sys/fs/cgroup')


class DeliveryProcessError(Exception):
    """A delivery process did not start, or a method raised in one (its log has the traceback)."""


@dataclasses.dataclass(frozen=True)
class ChildSettings:
    """What a delivery process needs to make attempts as the parent would."""
    methods: MethodSettings
    target_policy: TargetPolicy | None
    connections: int  # the HTTP connection pool's limit
    log_level: str = 'info'
    log_format: str = 'text'


# -- how many -------------------------------------------------------------------------------------

def available_cpus(cgroup_root: pathlib.Path = CGROUP_ROOT) -> int:
    """
    How many CPUs this process can keep busy: those it may run on, lowered by a cgroup CPU quota
    (a container's CPU limit, ``resources.limits.cpu`` in Kubernetes), rounded up.

    The quota is read from cgroup v2's ``cpu.max``, else cgroup v1's ``cpu/cpu.cfs_quota_us``,
    in the container's own view of the cgroup tree (what cgroup namespaces give it).
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return cpus


def cgroup_cpu_quota(root: pathlib.Path = CGROUP_ROOT) -> float | None:
    """The cgroup's CPU quota in CPUs (1.5: one and a half), or None: no quota, or none readable."""
    try:
        text = (root / 'cpu.max').read_text()  # cgroup v2: "<quota or max> <period>"
    except OSError:
        text = None
    if text is not None:
        quota, _, period = text.strip().partition(' ')
        return None if quota == 'max' else _ratio(quota, period)
    try:  # cgroup v1: the quota is -1 when there is none
        quota = (root / 'cpu' / 'cpu.cfs_quota_us').read_text()
        period = (root / 'cpu' / 'cpu.cfs_period_us').read_text()
    except OSError:
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        microseconds, per = int(quota), int(period)
    except ValueError:
        return None
    return microseconds / per if microseconds > 0 and per > 0 else None


def process_count(value: int | str, cpus: int | None = None) -> int:
    """
    The number of delivery processes ``--delivery-processes`` asks for: a number as it is, or for
    ``auto`` one per available CPU (``cpus``, else :func:`available_cpus`), at most ``AUTO_LIMIT``,
    none with a single CPU.
    """
    if value != AUTO:
        return int(value)
    cpus = available_cpus() if cpus is None else cpus
    count = 0 if cpus < 2 else min(cpus, AUTO_LIMIT)
    logger.info("Delivery processes: %d (auto, %d CPU%s available)", count, cpus, '' if cpus == 1 else 's')
    return count


# -- framing ---------------------------------------------------------------------------------------

Handler = Callable[[tuple[Any, ...]], None]


class _Channel(asyncio.Protocol):
    """
    One end of the socket pair: frames written in one loop turn are sent together, and every
    complete frame that one read brings is handed to ``handler`` at once.

    A protocol rather than a StreamReader: two ``readexactly`` awaits per message (header,
    body) cost more than the message itself at thousands of attempts per second.
    """

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._transport: asyncio.Transport | None = None
        self._outgoing: list[bytes] = []
        self._incoming = bytearray()
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def attach(self, sock: socket.socket) -> None:
        # The handler may be called before this returns (a message can arrive with the connection):
        # whoever answers through this channel holds it already.
        await asyncio.get_running_loop().connect_accepted_socket(lambda: self, sock)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though not always an asyncio.Transport subclass (uvloop's are not).
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._incoming
        buffer += data
        start = 0
        while len(buffer) - start >= _HEADER.size:
            end = start + _HEADER.size + _HEADER.unpack_from(buffer, start)[0]
            if end > len(buffer):
                break
            self._handler(pickle.loads(memoryview(buffer)[start + _HEADER.size:end]))
            start = end
        del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed.done():
            self._closed.set_result(None)

    def send(self, message: tuple[Any, ...]) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing.append(_HEADER.pack(len(data)))
        self._outgoing.append(data)

    def _flush(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(b''.join(self._outgoing))
        self._outgoing.clear()

    async def close(self) -> None:
        self._flush()
        if self._transport is not None:
            self._transport.close()
        await self.wait_closed()

    async def wait_closed(self) -> None:
        """Until the connection is closed (by either end); cancelling the waiter leaves it be."""
        await asyncio.shield(self._closed)


def _event_fields(event: Event) -> tuple[str, str, str, str, str]:
    # What event_from_json takes, in its order. The payload as the JSON text the event serialised
    # once: a string pickles in a fraction of the time of the nested dict, and a webhook without a
    # template sends that text as it is. The time as ISO text too: a datetime pickles through
    # copyreg (measured: 4.9 us a message, 0.5 us with text).
    return event.id, event.kind, event.repository, event.payload_json, event.received_at.isoformat()


def _names(key: NotificationKey) -> tuple[str, str]:
    # A plain tuple pickles several times faster than the dataclass: it is in every message.
    return key.namespace, key.name


# -- parent side -----------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class _Child:
    """One delivery process as the parent sees it."""
    index: int
    process: asyncio.subprocess.Process
    channel: _Channel | None = None  # set once connected (its handler needs this object)
    pending: dict[int, asyncio.Future[tuple[AttemptResult, float]]] = dataclasses.field(default_factory=dict)
    # The compiled notification whose target this child holds, per key: a new version is sent again.
    targets: dict[NotificationKey, Notification] = dataclasses.field(default_factory=dict)
    ready: asyncio.Future[None] = dataclasses.field(default_factory=lambda: asyncio.get_running_loop().create_future())


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
        """
        Start every child, all at once; returns once each is ready for attempts (its imports done: none
        wait on them). If one cannot start, its error is raised; ``stop()`` closes those that did.
        """
        spawned = await asyncio.gather(*(self._spawn(index) for index in range(self._count)),
                                       return_exceptions=True)
        for index, child in enumerate(spawned):
            if isinstance(child, _Child):
                self._children[index] = child
        errors = [error for error in spawned if isinstance(error, BaseException)]
        if errors:
            raise errors[0]
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
        assert child.channel is not None  # connected before it is one of the running children
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
            if child is not None and child.channel is not None and child.targets.pop(key, None) is not None:
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
                sys.executable, '-m', 'reponotify.delivery_processes', str(child_end.fileno()), running_loop_name(),
                pass_fds=(child_end.fileno(),), stdin=asyncio.subprocess.DEVNULL)
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        child = _Child(index=index, process=process)
        child.channel = _Channel(functools.partial(self._answer, child))
        await child.channel.attach(parent_end)
        child.channel.send(('settings', self._settings))
        closed = asyncio.ensure_future(child.channel.wait_closed())
        try:
            await asyncio.wait((child.ready, closed), timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # stopped while starting: leave no child behind
            await self._close(child)
            raise
        finally:
            closed.cancel()
        if not child.ready.done():
            await self._close(child)
            raise DeliveryProcessError(f"delivery process {index} did not start (exit code {child.process.returncode}; "
                                       "see its log)")
        logger.debug("Delivery process %d started (pid %d)", index, process.pid)
        async with self._ready:
            self._ready.notify_all()
        return child

    @staticmethod
    def _answer(child: _Child, message: tuple[Any, ...]) -> None:
        """Hand an answer to the attempt waiting for it (or note that the child is ready)."""
        if message[0] == 'ready':
            if not child.ready.done():
                child.ready.set_result(None)
            return
        future = child.pending.get(message[1])
        if future is None or future.done():  # its attempt was cancelled meanwhile
            return
        if message[0] == 'result':
            future.set_result((message[2], message[3]))
        else:
            future.set_exception(DeliveryProcessError("the method raised in a delivery process (see its log)"))

    async def _keep(self, index: int) -> None:
        """Restart the child in slot ``index`` whenever it exits, failing its attempts in flight."""
        while True:
            child = self._children[index]
            assert child is not None and child.channel is not None
            await child.channel.wait_closed()
            code = await child.process.wait()
            self._children[index] = None
            logger.error("Delivery process %d (pid %d) exited with code %s; %d attempts in flight are retried",
                         index, child.process.pid, code, len(child.pending))
            for future in child.pending.values():
                if not future.done():
                    future.set_result((AttemptResult(ok=False, message=EXITED_MESSAGE), 0.0))
            while self._children[index] is None:
                await asyncio.sleep(RESTART_DELAY)
                try:
                    self._children[index] = await self._spawn(index)
                except DeliveryProcessError as exc:
                    logger.error("%s; trying again", exc)

    @staticmethod
    async def _close(child: _Child) -> None:
        if child.channel is not None:
            await child.channel.close()  # the child sees the end of its input and exits
        try:
            async with asyncio.timeout(5):
                await child.process.wait()
        except TimeoutError:
            child.process.kill()
            await child.process.wait()
        for future in child.pending.values():
            if not future.done():
                future.cancel()


# -- child side ------------------------------------------------------------------------------------

class _Server:
    """A delivery process's side: makes each attempt it is sent and answers how it went."""

    def __init__(self) -> None:
        self.channel: _Channel | None = None
        self._settings: ChildSettings | None = None
        self._http: aiohttp.ClientSession | None = None
        self._targets: dict[tuple[str, str], tuple[Method, Any]] = {}  # (namespace, name) -> method, target
        self._attempts: set[asyncio.Task[None]] = set()

    def handle(self, message: tuple[Any, ...]) -> None:
        if message[0] == 'attempt':
            _, sequence, key, delivery_id, fields, timeout = message
            method, target = self._targets[key]
            assert self._http is not None and self._settings is not None, "no settings before the first attempt"
            context = DeliveryContext(http=self._http, delivery_id=delivery_id, timeout=timeout,
                                      settings=self._settings.methods, notification=key)
            task = asyncio.create_task(self._attempt(sequence, method, target, event_from_json(*fields), context))
            self._attempts.add(task)
            task.add_done_callback(self._attempts.discard)
        elif message[0] == 'target':
            _, key, method_name, target = message
            self._targets[key] = (METHODS[method_name], target)
        elif message[0] == 'forget':
            self._targets.pop(message[1], None)
        elif message[0] == 'settings':
            self._start(message[1])
            freeze_startup_objects()
            assert self.channel is not None
            self.channel.send(('ready',))

    def _start(self, settings: ChildSettings) -> None:
        self._settings = settings
        configure_logging(settings.log_level, settings.log_format)
        self._http = delivery_session(settings.target_policy, settings.connections)

    async def _attempt(self, sequence: int, method: Method, target: Any, event: Event,
                       context: DeliveryContext) -> None:
        assert self.channel is not None
        started = time.monotonic()
        try:
            result = await method.deliver(target, event, context)
        except Exception:  # a bug must not kill the process; the parent retries as for one of its own
            logger.exception("Unexpected error delivering %s to %s/%s", context.delivery_id, *context.notification)
            self.channel.send(('error', sequence))
            return
        self.channel.send(('result', sequence, result, time.monotonic() - started))

    async def close(self) -> None:
        """The parent has closed its end: it no longer waits for the attempts in flight."""
        for task in self._attempts:
            task.cancel()
        await asyncio.gather(*self._attempts, return_exceptions=True)
        if self._http is not None:
            await self._http.close()


async def _serve(descriptor: int) -> None:
    server = _Server()
    server.channel = _Channel(server.handle)
    await server.channel.attach(socket.socket(fileno=descriptor))
    await server.channel.wait_closed()
    await server.close()


def main() -> None:
    # Ctrl-C and SIGTERM reach the whole process group: the parent decides when we stop (it
    # closes the socket after its grace period), so attempts in flight are not cut short here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.nice(NICENESS)
    run(_serve(int(sys.argv[1])), sys.argv[2] if len(sys.argv) > 2 else DEFAULT_EVENT_LOOP)


def child_settings(methods: MethodSettings, target_policy: TargetPolicy | None, connections: int) -> ChildSettings:
    """Settings for the children, logging as this process does."""
    level, log_format = logging_setup()
    return ChildSettings(methods=methods, target_policy=target_policy, connections=connections,
                         log_level=level, log_format=log_format)


if __name__ == '__main__':
    main()
