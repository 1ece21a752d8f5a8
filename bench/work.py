"""
The scenarios that measure reponotify's core in a process of their own.

Each subcommand prints one JSON line on stdout (its figures); bench/run.py runs
them as separate processes so that every measurement starts from a fresh
interpreter (memory figures especially).

    python bench/work.py routing  --sizes 100,10000,100000 --glob-share 0.05 --repeat 5
    python bench/work.py memory   --count 10000
    python bench/work.py delivery --mode fanout|many --count 5000 --target http://127.0.0.1:PORT
    python bench/work.py status   --events 10000 --target http://127.0.0.1:PORT
    python bench/work.py fill     --count 100000 --outbox PATH
"""
import argparse
import asyncio
import gc
import json
import os
import pathlib
import random
import sys
import time
from typing import Any

BENCH = pathlib.Path(__file__).resolve().parent
# BENCH_OPERATOR: another copy of operator/ to measure (before/after comparisons of a change).
sys.path[:0] = [os.environ.get('BENCH_OPERATOR') or str(BENCH.parent / 'operator'), str(BENCH)]

from common import LOOPBACK, PYTHON, rss_bytes  # noqa: E402
from reponotify.eventloop import DEFAULT_EVENT_LOOP, EVENT_LOOPS, run  # noqa: E402

NAMESPACE = 'bench'


# -- notifications as the front ends compile them ------------------------------------------------

ORGANIZATION_SIZE = 100  # notifications per organization: a larger installation has more teams


def organization(i: int) -> str:
    return f'org{i // ORGANIZATION_SIZE}'


def exact_repository(i: int) -> str:
    return f'{organization(i)}/repo{i}'


def glob_repository(i: int) -> str:
    """Team-scoped globs, as tenancy makes them: a whole organization, or a name prefix in it."""
    return f'{organization(i)}/*' if (i // 7) % 2 else f'{organization(i)}/repo{i // 7 % 10}*'


def webhook_spec(repository: str, url: str) -> dict[str, Any]:
    return {'repository': repository, 'event': 'repo_push', 'method': 'webhook', 'config': {'url': url}}


class NoSecrets:
    async def read(self, namespace: str, name: str, key: str) -> str:
        raise AssertionError("the benchmark's notifications take no Secrets")


class NullSink:
    """A status sink that keeps the last status of each notification (what an API server would hold)."""

    def __init__(self) -> None:
        self.writes = 0
        self.last: dict[Any, dict[str, Any]] = {}

    async def write(self, key: Any, status: dict[str, Any]) -> None:
        self.writes += 1
        self.last[key] = status


async def load_notifications(engine: Any, count: int, *, glob_share: float = 0.0, url: str,
                             repository: str | None = None, per_notification_url: bool = True) -> list[str]:
    """Compile ``count`` webhook notifications into the engine (as load_into does); returns the exact repositories."""
    from reponotify.notifications import NotificationKey, compile_notification

    secrets = NoSecrets()
    every = round(1 / glob_share) if glob_share else 0  # every n-th notification is a glob
    exact: list[str] = []
    for i in range(count):
        if repository is not None:
            repo = repository
        elif every and i % every == every // 2:
            repo = glob_repository(i)
        else:
            repo = exact_repository(i)
            exact.append(repo)
        key = NotificationKey(NAMESPACE, f'rn-{i}')
        target = f'{url}/hook/{i}' if per_notification_url else f'{url}/hook'
        notification = await compile_notification(key, webhook_spec(repo, target), secrets, generation=1)
        engine.admit(notification)
    return exact


def engine_settings(*, workers: int = 64, per_target: int = 64, status_interval: float = 1.0,
                    delivery_processes: int = 0) -> Any:
    from reponotify.dispatcher import DispatcherSettings
    from reponotify.email_verification import VerificationSettings
    from reponotify.engine import EngineSettings
    from reponotify.targets import TargetPolicy

    return EngineSettings(
        dispatcher=DispatcherSettings(workers=workers, per_target=per_target, retry_schedule=(1.0, 1.0, 1.0),
                                      timeout=10.0, target_policy=TargetPolicy.parse('127.0.0.0/8'),
                                      delivery_processes=delivery_processes),
        status_interval=status_interval,
        verification=VerificationSettings(enabled=False))


# -- routing -------------------------------------------------------------------------------------

async def routing(args: argparse.Namespace) -> dict[str, Any]:
    from reponotify.engine import Engine
    from reponotify.events import new_event, sample_payload

    results: dict[str, Any] = {}
    cases = []  # (size, pattern, match, events)
    engines = []
    for size in (int(s) for s in args.sizes.split(',')):
        engine = Engine(engine_settings())
        engines.append(engine)
        exact = await load_notifications(engine, size, glob_share=args.glob_share, url='http://127.0.0.1:9')
        rng = random.Random(size)
        globs = sum(1 for n in engine.routing._by_key.values() if '*' in n.repository)
        results[str(size)] = {'globs': globs}
        # Events for repositories that have notifications (each matches its exact one plus the globs
        # of its organization that match it), and as many for repositories of those organizations that
        # have none. "hot": the events of 50 + 50 repositories (the same traffic whatever the size: the
        # cost of the routing structure); "spread": of 2,500 + 2,500 (where the working set outgrows the
        # CPU caches, which every lookup structure feels).
        for pattern, distinct in (('hot', 50), ('spread', 2500)):
            if pattern == 'spread' and size < 10_000:
                continue
            repositories = [rng.choice(exact) for _ in range(distinct)] + [
                f'{organization(rng.randrange(size))}/none{i}' for i in range(distinct)]
            events = [new_event('repo_push', sample_payload('repo_push', rng.choice(repositories)))
                      for _ in range(5000)]
            match = engine.routing.match
            started = time.perf_counter()
            matched = sum(len(match(event)) for event in events[:200])  # warm-up, and a sanity figure
            per_event = (time.perf_counter() - started) / 200
            # About a fifth of a second per run, whatever one lookup costs (a slow table must not make
            # the benchmark slow): the events, repeated or cut to that many lookups.
            lookups = max(200, min(args.lookups, int(0.2 / max(per_event, 1e-9))))
            events = (events * (lookups // len(events) + 1))[:lookups]
            results[str(size)][pattern] = {'us_per_route': [], 'matched_per_event': matched / 200}
            cases.append((size, pattern, match, events))
    gc.collect()
    # Round robin, so that a noisy neighbour slows every case alike rather than one of them.
    for _ in range(args.repeat):
        for size, pattern, match, events in cases:
            started = time.perf_counter()
            for event in events:
                match(event)
            elapsed = time.perf_counter() - started
            results[str(size)][pattern]['us_per_route'].append(elapsed / len(events) * 1e6)
    return results


# -- memory --------------------------------------------------------------------------------------

async def memory(args: argparse.Namespace) -> dict[str, Any]:
    from reponotify.engine import Engine

    engine = Engine(engine_settings())
    # Everything imported and warmed up with one notification, which is then removed.
    await load_notifications(engine, 1, url='http://127.0.0.1:9')
    from reponotify.notifications import NotificationKey
    engine.remove_notification(NotificationKey(NAMESPACE, 'rn-0'))
    engine.book.forget(NotificationKey(NAMESPACE, 'rn-0'))
    gc.collect()
    before = rss_bytes()
    await load_notifications(engine, args.count, glob_share=args.glob_share, url='http://127.0.0.1:9')
    engine.book.take_dirty()  # what the status flusher does once it has written them
    gc.collect()
    after = rss_bytes()
    assert len(engine.routing) == args.count
    statuses = len(engine.book.keys())
    return {'count': args.count, 'rss_before': before, 'rss_after': after, 'statuses': statuses}


# -- delivery ------------------------------------------------------------------------------------

async def wait_target(url: str, count: int, timeout: float) -> dict[str, Any]:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f'{url}/stats') as response:
                stats = await response.json()
            if stats['count'] >= count:
                return stats
            if time.monotonic() > deadline:
                raise RuntimeError(f"the target got {stats['count']} of {count} deliveries within {timeout:g}s")
            # Not more often: this runs in the process measured. The figure uses the target's own time
            # of the last delivery, so how soon the end is noticed does not change it.
            await asyncio.sleep(0.05)


async def delivery(args: argparse.Namespace) -> dict[str, Any]:
    from reponotify.engine import Engine
    from reponotify.events import sample_payload

    folder = pathlib.Path(args.folder)
    engine = Engine(engine_settings(delivery_processes=args.delivery_processes), outbox_path=folder / 'outbox.sqlite3')
    fanout = args.mode == 'fanout'
    await load_notifications(engine, args.count if fanout else 1, url=args.target, repository='acme/web',
                             per_notification_url=fanout)
    sink = NullSink()
    await engine.start(sink)
    payload = sample_payload('repo_push', 'acme/web')
    try:
        started = time.time()
        if fanout:
            accepted = await engine.ingest('repo_push', payload)
            queued = accepted.matched
        else:
            answers = await asyncio.gather(*(engine.ingest('repo_push', payload) for _ in range(args.count)))
            queued = sum(answer.matched for answer in answers)
        accepted_at = time.time()
        stats = await wait_target(args.target, args.count, args.timeout)
        # Every outcome recorded (the status book), then compare with what the target got.
        deadline = time.monotonic() + args.timeout
        while len(engine.outbox) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        succeeded = sum(engine.book.status(key)['deliveries']['succeeded'] for key in engine.book.keys())
    finally:
        await engine.stop()
    seconds = stats['last'] - started
    return {'mode': args.mode, 'count': args.count, 'queued': queued, 'received': stats['count'],
            'succeeded': succeeded, 'seconds': seconds, 'accept_seconds': accepted_at - started,
            'rate': args.count / seconds}


# -- status load against kmock's emulator --------------------------------------------------------

async def status_load(args: argparse.Namespace) -> dict[str, Any]:
    import concurrent.futures
    import threading

    import aiohttp
    import kmock

    sys.path.insert(0, str(BENCH.parent / 'tests'))
    from kube_emulator import RN, VersionedKubernetesEmulator, declare_resources, namespace_paths
    from reponotify.config import ReceiverSettings, Settings
    from reponotify.engine import Engine
    from reponotify.events import sample_payload
    from reponotify.kube.handlers import OperatorSettings, run_operator
    from reponotify.models import API_VERSION, KIND, PLURAL

    folder = pathlib.Path(args.folder)
    name = 'burst'
    status_patches: list[float] = []  # when the API server got each PATCH of the resource's status

    class TimedEmulator(VersionedKubernetesEmulator):
        async def _handle(self, request: kmock.Request) -> Any:
            if (request.method == 'PATCH' and request.subresource == 'status' and request.name == name
                    and request.resource is not None and request.resource.plural == PLURAL):
                status_patches.append(time.monotonic())
            return await super()._handle(request)

    with namespace_paths():
        async with TimedEmulator() as kube, kmock.Server(kube) as server:
            declare_resources(kube)
            http = aiohttp.ClientSession(base_url=str(server.url))

            async def call(method: str, path: str, body: Any, content_type: str = 'application/json') -> Any:
                async with http.request(method, path, data=json.dumps(body),
                                        headers={'Content-Type': content_type}) as response:
                    answer = await response.json()
                    assert response.status == 200, (method, path, response.status, answer)
                    return answer

            await call('POST', '/api/v1/namespaces', {'apiVersion': 'v1', 'kind': 'Namespace',
                                                      'metadata': {'name': NAMESPACE}})
            port = args.port
            settings = Settings(receiver=ReceiverSettings(host=LOOPBACK, port=port),
                                engine=engine_settings(status_interval=1.0), state_dir=folder, shutdown_grace=1.0)
            options = OperatorSettings(common=settings, kube_api_url=str(server.url))
            engine = Engine(settings.engine, outbox_path=folder / 'outbox.sqlite3')
            stop_flag, ready_flag = threading.Event(), threading.Event()

            def main() -> None:
                asyncio.run(run_operator(options, namespaces=[NAMESPACE], stop_flag=stop_flag,  # type: ignore
                                         ready_flag=ready_flag, engine=engine))  # type: ignore

            executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
            done = asyncio.get_running_loop().run_in_executor(executor, main)
            try:
                while not ready_flag.is_set():
                    if done.done():
                        done.result()
                        raise RuntimeError("the operator exited before it was ready")
                    await asyncio.sleep(0.02)
                body = {'apiVersion': API_VERSION, 'kind': KIND, 'metadata': {'name': name, 'namespace': NAMESPACE},
                        'spec': webhook_spec('acme/web', f'{args.target}/hook')}
                await call('POST', f'/apis/{API_VERSION}/namespaces/{NAMESPACE}/{PLURAL}', body)

                def status() -> dict[str, Any]:
                    return (kube.objects[RN, NAMESPACE, name].raw.get('status') or {})

                deadline = time.monotonic() + 30
                while not any(c.get('reason') == 'Accepted' for c in status().get('conditions') or []):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the notification was not accepted: {status()}")
                    await asyncio.sleep(0.02)
                await asyncio.sleep(1.2)  # past the status interval of the acceptance write
                patches_before = len(status_patches)

                payload = folder / 'event.json'
                payload.write_text(json.dumps(sample_payload('repo_push', 'acme/web')))
                burst_started = time.monotonic()
                client = await asyncio.create_subprocess_exec(
                    PYTHON, str(BENCH / 'client.py'), 'blast', '--url', f'http://{LOOPBACK}:{port}/v1/events/repo_push',
                    '--body', str(payload), '--count', str(args.events), '--concurrency', '64',
                    stdout=asyncio.subprocess.PIPE)
                out, _ = await client.communicate()
                sent = json.loads(out.decode().strip().splitlines()[-1])
                accepted = sent['statuses'].get('202', 0)
                deadline = time.monotonic() + args.timeout
                while (status().get('deliveries') or {}).get('succeeded', 0) < args.events:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"final status not reached: {status().get('deliveries')}")
                    await asyncio.sleep(0.02)
                final_at = time.monotonic()
                await asyncio.sleep(1.5)  # a write after the final one would show here
                final = status()
            finally:
                stop_flag.set()
                await asyncio.wait_for(asyncio.shield(done), 30)
                executor.shutdown(wait=False)
                await http.close()
    patches = [t for t in status_patches[patches_before:]]
    gaps = [b - a for a, b in zip(patches, patches[1:])]
    burst_seconds = final_at - burst_started
    stats = await wait_target(args.target, args.events, 5)
    recent = final.get('recentDeliveries') or []
    exact = (final.get('deliveries') == {'succeeded': args.events, 'failed': 0, 'dropped': 0}
             and final.get('numberOfFailures') == 0 and len(recent) == 10
             and final.get('lastDelivery') == recent[0] and stats['count'] == args.events)
    # The write rate: PATCHes over the time they span (n writes at least `interval` apart span (n-1) intervals).
    rate = (len(patches) - 1) / (patches[-1] - patches[0]) if len(patches) > 1 else len(patches) / burst_seconds
    return {'events': args.events, 'accepted': accepted, 'patches': len(patches), 'burst_seconds': burst_seconds,
            'patches_per_second': rate,
            'min_gap': min(gaps) if gaps else None, 'final_exact': exact,
            'final_deliveries': final.get('deliveries'), 'received': stats['count']}


# -- filling an outbox (recovery) ----------------------------------------------------------------

async def fill(args: argparse.Namespace) -> dict[str, Any]:
    from reponotify.events import new_event, sample_payload
    from reponotify.notifications import NotificationKey
    from reponotify.outbox import Outbox

    outbox = Outbox(args.outbox)
    await outbox.open()
    key = NotificationKey(NAMESPACE, 'hook')
    started = time.perf_counter()
    chunk = 2000
    for first in range(0, args.count, chunk):
        await asyncio.gather(*(outbox.accept(new_event('repo_push', sample_payload('repo_push', 'acme/web')), [key])
                               for _ in range(min(chunk, args.count - first))))
    pending = len(outbox)
    await outbox.close()
    return {'pending': pending, 'seconds': time.perf_counter() - started,
            'bytes': os.path.getsize(args.outbox)}


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('routing')
    p.add_argument('--sizes', default='100,10000,100000')
    p.add_argument('--glob-share', type=float, default=0.05)
    p.add_argument('--repeat', type=int, default=5)
    p.add_argument('--lookups', type=int, default=100_000, help="at most this many per run")
    p = sub.add_parser('memory')
    p.add_argument('--count', type=int, required=True)
    p.add_argument('--glob-share', type=float, default=0.0)
    p = sub.add_parser('delivery')
    p.add_argument('--mode', choices=['fanout', 'many'], required=True)
    p.add_argument('--delivery-processes', type=int, default=0)
    p.add_argument('--event-loop', choices=EVENT_LOOPS, default=DEFAULT_EVENT_LOOP)
    p.add_argument('--count', type=int, required=True)
    p.add_argument('--target', required=True)
    p.add_argument('--folder', required=True)
    p.add_argument('--timeout', type=float, default=120)
    p = sub.add_parser('status')
    p.add_argument('--events', type=int, default=10000)
    p.add_argument('--target', required=True)
    p.add_argument('--folder', required=True)
    p.add_argument('--port', type=int, required=True)
    p.add_argument('--timeout', type=float, default=120)
    p = sub.add_parser('fill')
    p.add_argument('--count', type=int, required=True)
    p.add_argument('--outbox', required=True)
    args = parser.parse_args()
    command = {'routing': routing, 'memory': memory, 'delivery': delivery, 'status': status_load,
               'fill': fill}[args.command]
    result = run(command(args), getattr(args, 'event_loop', 'asyncio'))  # only delivery offers a choice
    json.dump(result, sys.stdout)
    sys.stdout.write('\n')


if __name__ == '__main__':
    main()
