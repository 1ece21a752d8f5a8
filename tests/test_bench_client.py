"""
The benchmark's paced load generator (``bench/client.py rate``): what it sends, and that it measures
latency open loop.

Its p50/p99 figures are the ingest goal's evidence, so the client itself is checked against a real
aiohttp server on loopback (in a thread of its own, so that it can be stalled without stalling the test):
every request arrives with its exact bytes, and a server that stops answering for a while shows up in
the latency of every request that fell due meanwhile, not only of the requests already in flight.
"""
import asyncio
import json
import os
import pathlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from conftest import serve_on_loopback

ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclass
class ThreadedServer:
    """An aiohttp server on its own loop in a thread; records bodies; can stall its loop once."""
    stall_at: int | None = None  # block the loop (time.sleep) when this many requests have arrived
    stall_seconds: float = 0.0
    bodies: list[bytes] = field(default_factory=list)
    content_types: set[str] = field(default_factory=set)
    port: int = 0

    async def _accept(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        self.content_types.add(request.headers.get('Content-Type', ''))
        if len(self.bodies) == self.stall_at:
            time.sleep(self.stall_seconds)  # the whole server stops, as a GC pause or a busy CPU would
        return web.json_response({'id': str(len(self.bodies))}, status=202)

    def serve(self) -> Iterator['ThreadedServer']:
        loop = asyncio.new_event_loop()

        async def start() -> web.AppRunner:
            app = web.Application()
            app.router.add_post('/v1/events/{event}', self._accept)
            # The receiver's backlog: the burst of connections the frozen server gets waits in the queue.
            runner, self.port = await serve_on_loopback(app, backlog=1024)
            return runner

        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        runner = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
        try:
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()


def paced(port: int, body: pathlib.Path, rate: float, duration: float, warmup: float = 0.0) -> dict:
    done = subprocess.run(
        [sys.executable, str(ROOT / 'bench' / 'client.py'), 'rate', '--url',
         f'http://127.0.0.1:{port}/v1/events/repo_push', '--body', str(body), '--rate', str(rate),
         '--duration', str(duration), '--warmup', str(warmup)],
        capture_output=True, text=True, timeout=60, env={**os.environ, 'NO_PROXY': '*'})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def body(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / 'body.json'
    path.write_bytes(b'{"repository": "acme/app", "n": {{i}}}')
    return path


def test_every_request_arrives_whole_and_numbered(body: pathlib.Path) -> None:
    for server in ThreadedServer().serve():
        result = paced(server.port, body, rate=400, duration=0.5)

    assert result['sent'] == 200
    assert result['statuses'] == {'202': 200}
    assert sorted(server.bodies) == sorted(b'{"repository": "acme/app", "n": %d}' % i for i in range(200))
    assert server.content_types == {'application/json'}
    assert result['measured'] == 200
    assert 0 < result['p50_ms'] <= result['p90_ms'] <= result['p99_ms'] <= result['max_ms']
    assert result['achieved_rate'] == pytest.approx(400, rel=0.2)


def test_a_stalled_server_delays_every_request_due_meanwhile(body: pathlib.Path) -> None:
    # 1,000/s for a second, the server frozen for 0.4 s after its 300th request: about 400 requests
    # fall due during the freeze. An open-loop client sends them all on time (opening connections as
    # needed) and counts each from its due time; a closed-loop client with 64 connections would have
    # counted only its 64 requests in flight as slow, leaving the 90th percentile near zero.
    for server in ThreadedServer(stall_at=300, stall_seconds=0.4).serve():
        result = paced(server.port, body, rate=1000, duration=1.0)

    assert result['statuses'] == {'202': 1000}
    assert result['max_ms'] >= 350
    assert result['p90_ms'] >= 100
