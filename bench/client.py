"""
The load generators, run as their own process: a bare aiohttp client, and a paced raw one.

Two modes, each printing one JSON line on stdout:

``blast``  N POSTs at concurrency C, as fast as they go (closed loop). This is
           the reference "loopback limit" (a bare aiohttp client to the same
           target) and the ingest side of the end-to-end scenarios.
           -> {"sent", "statuses", "first_send", "last_done", "seconds", "rate"}

``rate``   POSTs at a fixed rate R for D seconds (open loop: request i is due at
           start + i/R whatever happened before). Latency is measured from the
           time a request was *due*, so a stalled server shows up in the figures
           (no coordinated omission). Sent over raw keep-alive connections on
           uvloop, not aiohttp: see :class:`PacedClient`.
           -> {"sent", "statuses", "p50_ms", "p90_ms", "p99_ms", "max_ms", "achieved_rate",
               "measured", "client_cpu_s"}

The body is a file; ``{{i}}`` in it is replaced by the request's index (so every
alert sent to Alertmanager is a distinct alert).

Times are ``time.time()``: comparable with the target's, which runs in another process.
"""
import argparse
import asyncio
import collections
import json
import sys
import time
import urllib.parse

import aiohttp
import uvloop


def bodies(template: bytes, count: int) -> list[bytes]:
    if b'{{i}}' not in template:
        return [template] * count
    return [template.replace(b'{{i}}', str(i).encode()) for i in range(count)]


async def blast(url: str, template: bytes, count: int, concurrency: int, headers: dict[str, str]) -> dict:
    payloads = bodies(template, count)
    statuses: collections.Counter[int] = collections.Counter()
    next_index = iter(range(count))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker() -> None:
            for i in next_index:
                try:
                    async with session.post(url, data=payloads[i], headers=headers) as response:
                        await response.read()
                        statuses[response.status] += 1
                except aiohttp.ClientError as exc:
                    statuses[type(exc).__name__] += 1  # type: ignore[index]

        first_send = time.time()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        last_done = time.time()
    return {'sent': count, 'statuses': {str(k): v for k, v in statuses.items()}, 'first_send': first_send,
            'last_done': last_done, 'seconds': seconds, 'rate': count / seconds}


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float('nan')
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


ANSWER_TIMEOUT = 60.0  # seconds the rate mode waits for the last answers before giving up


class PacedConnection(asyncio.Protocol):
    """
    One keep-alive HTTP/1.1 connection of the ``rate`` mode: one request at a time.

    The request bytes are built once; the response is read just far enough to know its
    status and where it ends (the head and ``Content-Length`` bytes of body).
    """

    def __init__(self, paced: 'PacedClient') -> None:
        self.paced = paced
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.due = 0.0  # when the request in flight was due (time.monotonic())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes, due: float) -> None:
        assert self.transport is not None
        self.due = due
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head_end = self.buffer.find(b'\r\n\r\n')
        if head_end < 0:
            return
        head = bytes(self.buffer[:head_end]).lower()
        at = head.find(b'\r\ncontent-length:')
        if at < 0:  # the servers measured here all send one; a chunked body would be misread
            raise SystemExit(f"rate mode reads answers with a Content-Length only, got: {head[:300]!r}")
        line_end = head.find(b'\r\n', at + 2)
        length = int(head[at + 17:line_end if line_end >= 0 else None])
        if len(self.buffer) < head_end + 4 + length:
            return  # the rest of the body is still on its way
        del self.buffer[:head_end + 4 + length]
        self.paced.answered(self, int(head[9:12]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.paced.lost(self, exc)


class PacedClient:
    """
    The ``rate`` mode: requests sent on a fixed schedule over raw keep-alive connections.

    Not aiohttp: on a 2-core machine the load generator shares the cores with what it
    measures, and an aiohttp request costs about 200 µs of CPU here against about 50
    for these few lines; the difference is CPU taken from the server under test, so a
    cheaper generator measures the server rather than the machine's saturation.
    Requests due at the same millisecond leave together (the event loop's timers tick
    in milliseconds); latency still counts from each request's own due time, so that
    lateness shows in the figures of every server alike (the reference included).
    """

    def __init__(self, url: str, template: bytes, rate: float, duration: float, warmup: float,
                 headers: dict[str, str], connections: int = 64) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != 'http' or parts.hostname is None:
            raise SystemExit(f"rate mode takes plain http:// URLs, not {url!r}")
        self.address = (parts.hostname, parts.port or 80)
        self.total = int(rate * (duration + warmup))
        head = f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        head += ''.join(f"{name}: {value}\r\n" for name, value in headers.items())
        self.requests = [(head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
                         for body in bodies(template, self.total)]
        self.interval = 1 / rate
        self.warmup = warmup
        self.connections = connections
        self.idle: collections.deque[PacedConnection] = collections.deque()
        self.statuses: collections.Counter[int | str] = collections.Counter()
        self.latencies: list[float] = []
        self.in_flight = 0
        self.start = 0.0
        self.all_answered = asyncio.Event()
        self.sending_done = False

    async def connect(self) -> PacedConnection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(lambda: PacedConnection(self), *self.address)
        return connection

    def answered(self, connection: PacedConnection, status: int) -> None:
        now = time.monotonic()
        self.statuses[status] += 1
        if connection.due - self.start >= self.warmup:
            self.latencies.append((now - connection.due) * 1000)
        self.idle.append(connection)
        self.finish_one()

    def lost(self, connection: PacedConnection, exc: Exception | None) -> None:
        if connection in self.idle:
            self.idle.remove(connection)
        elif connection.due:  # a request was in flight: it got no answer
            self.statuses[type(exc).__name__ if exc else 'ConnectionClosed'] += 1
            self.finish_one()

    def finish_one(self) -> None:
        self.in_flight -= 1
        if self.sending_done and self.in_flight == 0:
            self.all_answered.set()

    async def run(self) -> dict:
        for connection in await asyncio.gather(*(self.connect() for _ in range(self.connections))):
            self.idle.append(connection)
        self.start = time.monotonic() + 0.05
        index = 0
        while index < self.total:
            now = time.monotonic()
            due = self.start + index * self.interval
            if due > now:
                await asyncio.sleep(max(due - now, 0.001))
                now = time.monotonic()
            # Open loop: every request due by now leaves, on a new connection if none is free.
            while index < self.total and (due := self.start + index * self.interval) <= now:
                connection = self.idle.popleft() if self.idle else await self.connect()
                self.in_flight += 1
                connection.send(self.requests[index], due)
                index += 1
        self.sending_done = True
        if self.in_flight:
            try:
                await asyncio.wait_for(self.all_answered.wait(), ANSWER_TIMEOUT)
            except TimeoutError:
                raise SystemExit(f"{self.in_flight} requests unanswered {ANSWER_TIMEOUT:g}s after the last was sent")
        elapsed = time.monotonic() - self.start
        latencies = sorted(self.latencies)
        return {'sent': self.total, 'statuses': {str(k): v for k, v in self.statuses.items()},
                'p50_ms': percentile(latencies, 0.50), 'p90_ms': percentile(latencies, 0.90),
                'p99_ms': percentile(latencies, 0.99), 'max_ms': latencies[-1] if latencies else float('nan'),
                'achieved_rate': self.total / elapsed, 'measured': len(latencies),
                'client_cpu_s': time.process_time()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('mode', choices=['blast', 'rate'])
    parser.add_argument('--url', required=True)
    parser.add_argument('--body', required=True, help="file with the request body ({{i}}: the index)")
    parser.add_argument('--count', type=int, default=1000)
    parser.add_argument('--concurrency', type=int, default=64)
    parser.add_argument('--rate', type=float, default=1000.0)
    parser.add_argument('--duration', type=float, default=5.0)
    parser.add_argument('--warmup', type=float, default=1.0)
    parser.add_argument('--header', action='append', default=[])
    args = parser.parse_args()
    headers = {'Content-Type': 'application/json'}
    for item in args.header:
        name, _, value = item.partition(':')
        headers[name.strip()] = value.strip()
    with open(args.body, 'rb') as file:
        template = file.read()
    if args.mode == 'blast':
        result = asyncio.run(blast(args.url, template, args.count, args.concurrency, headers))
    else:
        paced = PacedClient(args.url, template, args.rate, args.duration, args.warmup, headers)
        result = uvloop.run(paced.run())
    json.dump(result, sys.stdout)
    sys.stdout.write('\n')


if __name__ == '__main__':
    main()
