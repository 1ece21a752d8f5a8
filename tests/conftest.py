"""
Shared fixtures: real peers on loopback.

``http_target`` is a real aiohttp server that records every request exactly
as received (method, path, query, headers, raw body) and answers what the
test scripts (a status, headers, a delay), so tests assert on the bytes a
webhook or Slack endpoint really got.
"""
import asyncio
import dataclasses
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web


@dataclasses.dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclasses.dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    body: str = 'ok'
    delay: float = 0.0


class HttpTarget:
    """A loopback HTTP server that records requests; script replies per path with ``replies``."""

    def __init__(self) -> None:
        self.requests: list[ReceivedRequest] = []
        self.replies: dict[str, list[Reply]] = {}  # path -> replies used in order; the last one repeats
        self.default = Reply()
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f'http://127.0.0.1:{self.port}'

    def script(self, path: str, *replies: Reply) -> None:
        self.replies[path] = list(replies)

    def on(self, path: str) -> list[ReceivedRequest]:
        return [request for request in self.requests if request.path == path]

    async def wait_for(self, count: int, path: str | None = None, timeout: float = 10.0) -> list[ReceivedRequest]:
        """Wait until ``count`` requests arrived (on ``path``, if given); fail the test otherwise."""
        def arrived() -> list[ReceivedRequest]:
            return self.on(path) if path is not None else list(self.requests)
        async with self._arrived:
            try:
                await asyncio.wait_for(self._arrived.wait_for(lambda: len(arrived()) >= count), timeout)
            except asyncio.TimeoutError:
                pytest.fail(f"expected {count} requests on {path or 'any path'}, got {len(arrived())}")
        return arrived()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        async with self._arrived:
            self.requests.append(ReceivedRequest(request.method, request.path, dict(request.query),
                                                 dict(request.headers), body))
            self._arrived.notify_all()
        queue = self.replies.get(request.path)
        reply = (queue.pop(0) if len(queue) > 1 else queue[0]) if queue else self.default
        if reply.delay:
            await asyncio.sleep(reply.delay)
        return web.Response(status=reply.status, headers=reply.headers, text=reply.body)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route('*', '/{tail:.*}', self._handle)
        self._runner, self.port = await serve_on_loopback(app)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def serve_on_loopback(app: web.Application, backlog: int = 128) -> tuple[web.AppRunner, int]:
    """Serve an aiohttp app on a free loopback port; returns its runner (to clean up) and the port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, '127.0.0.1', 0, backlog=backlog)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return int(probe.getsockname()[1])


async def eventually(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Poll ``check`` (a function, sync or async) until it returns something truthy; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def http_target() -> AsyncIterator[HttpTarget]:
    target = HttpTarget()
    await target.start()
    yield target
    await target.stop()
