"""
The demo: reponotify end to end on one machine, in a few seconds.

It starts a local HTTP target on 127.0.0.1:9911 (the examples' webhook and
Slack URLs point there; ``/hooks/broken`` always answers 500), runs standalone
mode on the examples folder with a short retry schedule, posts each of the
seven documented Quay sample payloads to the receiver over HTTP, waits for
every delivery's final outcome, and prints what each target received and
each notification's status.
"""
import asyncio
import dataclasses
import json
import pathlib
import socket
import tempfile
import time
from typing import Any

import httpx
from aiohttp import web

from reponotify.config import ReceiverSettings, Settings
from reponotify.dispatcher import DispatcherSettings
from reponotify.engine import EngineSettings
from reponotify.events import sample_payload
from reponotify.standalone import run_standalone
from reponotify.targets import TargetPolicy

TARGET_PORT = 9911
DOCUMENTED_SAMPLES = ('repo_push', 'build_queued', 'build_start', 'build_success', 'build_failure',
                      'build_cancelled', 'vulnerability_found')


@dataclasses.dataclass
class Received:
    path: str
    body: bytes


async def _start_target(received: list[Received]) -> web.AppRunner:
    async def record(request: web.Request) -> web.Response:
        received.append(Received(request.path, await request.read()))
        if request.path.endswith('/broken'):
            return web.Response(status=500, text='broken on purpose')
        return web.Response(text='ok')

    app = web.Application()
    app.router.add_post('/{tail:.*}', record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, '127.0.0.1', TARGET_PORT).start()
    return runner


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return int(probe.getsockname()[1])


def _describe(item: Received) -> str:
    try:
        body = json.loads(item.body)
    except ValueError:
        return f"{len(item.body)} bytes"
    if isinstance(body, dict) and 'attachments' in body:  # a Slack message
        return f"Slack: {body.get('text')}"
    text = json.dumps(body)
    return text if len(text) <= 90 else text[:87] + '...'


async def _wait_for_final_outcomes(client: httpx.AsyncClient, expected: int, timeout: float
                                   ) -> list[dict[str, Any]]:
    """Poll until ``expected`` deliveries have a final outcome (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    while True:
        items = (await client.get('/v1/notifications')).json()['items']
        final = sum(sum(item['status']['deliveries'].values()) for item in items)
        if final >= expected or time.monotonic() > deadline:
            return items
        await asyncio.sleep(0.1)


async def run_demo(manifests: pathlib.Path | None = None) -> int:
    folder = manifests or pathlib.Path('examples')
    if not folder.is_dir():
        print(f"No {folder}/ folder here: run the demo from the repository root, or pass --manifests DIR.")
        return 2
    received: list[Received] = []
    target = await _start_target(received)
    port = _free_port()
    stop, started = asyncio.Event(), asyncio.Event()
    with tempfile.TemporaryDirectory(prefix='reponotify-demo-') as state_dir:
        settings = Settings(
            receiver=ReceiverSettings(host='127.0.0.1', port=port),
            engine=EngineSettings(
                dispatcher=DispatcherSettings(retry_schedule=(0.2, 0.4, 0.8),
                                              target_policy=TargetPolicy.parse('127.0.0.1')),  # the local target
                status_interval=0.1),
            state_dir=pathlib.Path(state_dir),
        )
        service = asyncio.create_task(run_standalone(settings, folder, stop=stop, started=started))
        await asyncio.wait([service, asyncio.create_task(started.wait())], return_when=asyncio.FIRST_COMPLETED)
        if service.done():
            await target.cleanup()
            service.result()  # raises the reason it could not start
        try:
            async with httpx.AsyncClient(base_url=f'http://127.0.0.1:{port}') as client:
                print(f"Receiver on http://127.0.0.1:{port}, target on http://127.0.0.1:{TARGET_PORT}\n")
                print("Events posted (the seven documented Quay sample payloads):")
                expected = 0
                for kind in DOCUMENTED_SAMPLES:
                    response = await client.post(f'/v1/events/{kind}', json=sample_payload(kind))
                    answer = response.json()
                    expected += answer.get('matched') or 0
                    print(f"  {kind:<22} -> {response.status_code} matched={answer.get('matched')}")
                items = await _wait_for_final_outcomes(client, expected, timeout=15)
        finally:
            stop.set()
            await service
            await target.cleanup()

    print("\nWhat the targets received:")
    for item in received:
        print(f"  POST {item.path:<42} {_describe(item)}")
    print("\nNotification status:")
    print(f"  {'NAME':<24} {'EVENT':<20} {'READY':<6} {'REASON':<14} {'FAILURES':>8} "
          f"{'OK':>3} {'FAILED':>6}  LAST DELIVERY")
    for notification in items:
        status = notification['status']
        ready = status['conditions'][0]
        last = status.get('lastDelivery') or {}
        print(f"  {notification['name']:<24} {notification['event']:<20} {ready['status']:<6} {ready['reason']:<14} "
              f"{status['numberOfFailures']:>8} {status['deliveries']['succeeded']:>3} "
              f"{status['deliveries']['failed']:>6}  {last.get('outcome', '-')} {last.get('message', '')}")
    return 0
