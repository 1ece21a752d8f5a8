"""
The peer scenario's floor: a bare aiohttp relay, what one Python process does end to end at best.

It answers ``202`` to every event and forwards the body to one webhook URL with aiohttp's
client, on uvloop, as reponotify's receiver and delivery processes do; and nothing else: no
validation, no routing, no durable outbox, no retries, no status. Measured like reponotify in
the peer scenario (same load, same target), it shows how much of the way to Alertmanager the
Python stack alone goes, before reponotify does any of its own work.

Usage: ``python bench/relay.py --port 0 --target http://127.0.0.1:PORT/hook`` prints ``PORT <n>``
once listening.
"""
import argparse
import asyncio

import aiohttp
import uvloop
from aiohttp import web
from common import serve_until_stopped

CONNECTIONS = 64  # as reponotify's --workers and --per-target in the benchmark


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--host', default='127.0.0.1')
    parser.add_argument('--port', type=int, default=0)
    parser.add_argument('--target', required=True)
    args = parser.parse_args()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONNECTIONS))
    forwarding: set[asyncio.Task[None]] = set()  # strong references until each POST is done
    headers = {'Content-Type': 'application/json'}

    async def forward(body: bytes) -> None:
        async with session.post(args.target, data=body, headers=headers) as response:
            await response.read()

    async def accept(request: web.Request) -> web.Response:
        task = asyncio.create_task(forward(await request.read()))
        forwarding.add(task)
        task.add_done_callback(forwarding.discard)
        return web.json_response({'matched': 1}, status=202)

    app = web.Application()
    app.router.add_post('/v1/events/{event}', accept)
    await serve_until_stopped(app, args.host, args.port)


if __name__ == '__main__':
    uvloop.run(main())
