"""
The loopback webhook target every delivery scenario sends to: a separate process.

A minimal HTTP/1.1 server on raw asyncio (keep-alive, Content-Length and chunked
bodies) so that the target costs as little CPU as possible and the figures say
how fast the *sender* is. It answers every POST ``200 ok`` and counts it, with
the wall-clock time (``time.time()``, comparable across processes) of the first
and the last one. Control paths (answered, never counted):

* ``GET /stats``  -> ``{"count", "first", "last", "bytes"}``
* ``POST /reset`` -> zeroes the counters

Usage: ``python bench/target.py --port 0`` prints ``PORT <n>`` once listening.
"""
import argparse
import asyncio
import json
import os
import sys
import time

OK = b'HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok'


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.bytes = 0

    def hit(self, size: int) -> None:
        now = time.time()
        if self.first is None:
            self.first = now
        self.last = now
        self.count += 1
        self.bytes += size


STATS = Stats()


class HttpProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self._one_request():
            pass

    def _one_request(self) -> bool:
        """Handle one complete request from the buffer; False if it is not complete yet."""
        buffer = self.buffer
        end = buffer.find(b'\r\n\r\n')
        if end < 0:
            return False
        head = bytes(buffer[:end]).decode('latin-1')
        lines = head.split('\r\n')
        method, path, _ = (lines[0].split(' ', 2) + ['', ''])[:3]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(':')
            headers[name.strip().lower()] = value.strip()
        start = end + 4
        if headers.get('transfer-encoding', '').lower() == 'chunked':
            position = start
            body_size = 0
            while True:
                line_end = buffer.find(b'\r\n', position)
                if line_end < 0:
                    return False
                size = int(bytes(buffer[position:line_end]).split(b';')[0], 16)
                position = line_end + 2 + size + 2
                if position > len(buffer):
                    return False
                body_size += size
                if size == 0:
                    break
            consumed = position
        else:
            body_size = int(headers.get('content-length') or 0)
            consumed = start + body_size
            if consumed > len(buffer):
                return False
        del buffer[:consumed]
        self._respond(method, path, body_size, headers.get('connection', '').lower() == 'close')
        return True

    def _respond(self, method: str, path: str, body_size: int, close: bool) -> None:
        assert self.transport is not None
        if path == '/stats':
            body = json.dumps({'count': STATS.count, 'first': STATS.first, 'last': STATS.last,
                               'bytes': STATS.bytes}).encode()
            self.transport.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: '
                                 + str(len(body)).encode() + b'\r\n\r\n' + body)
        elif path == '/reset':
            STATS.reset()
            self.transport.write(OK)
        else:
            if method == 'POST':
                STATS.hit(body_size)
            self.transport.write(OK)
        if close:
            self.transport.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--host', default='127.0.0.1')
    parser.add_argument('--port', type=int, default=0)
    args = parser.parse_args()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(HttpProtocol, args.host, args.port, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(f'PORT {port}', flush=True)
    stop = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not os.read(sys.stdin.fileno(), 1024) else None)
    await stop.wait()  # the parent closes our stdin (or dies) to stop us
    server.close()


if __name__ == '__main__':
    asyncio.run(main())
