"""
The ingest reference: a bare aiohttp server answering ``202`` to every POST, nothing else.

It reads the body and answers a JSON object shaped like the receiver's, so the
difference between it and reponotify's receiver is exactly what reponotify does
per event (validation, routing, the durable outbox, deliveries running alongside).

Usage: ``python bench/bare_server.py --port 0`` prints ``PORT <n>`` once listening.
"""
import argparse
import asyncio
import uuid

from aiohttp import web
from common import serve_until_stopped


async def accept(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({'id': str(uuid.uuid4()), 'matched': 1}, status=202)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--host', default='127.0.0.1')
    parser.add_argument('--port', type=int, default=0)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_post('/v1/events/{event}', accept)
    await serve_until_stopped(app, args.host, args.port)


if __name__ == '__main__':
    asyncio.run(main())
