"""
The load generator: a bare aiohttp client, run as its own process.

Two modes, each printing one JSON line on stdout:

``blast``  N POSTs at concurrency C, as fast as they go (closed loop). This is
           the reference "loopback limit" (a bare aiohttp client to the same
           target) and the ingest side of the end-to-end scenarios.
           -> {"sent", "statuses", "first_send", "last_done", "seconds", "rate"}

``rate``   POSTs at a fixed rate R for D seconds (open loop: request i is due at
           start + i/R whatever happened before). Latency is measured from the
           time a request was *due*, so a stalled server shows up in the figures
           (no coordinated omission).
           -> {"sent", "statuses", "p50_ms", "p90_ms", "p99_ms", "max_ms", "achieved_rate"}

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

import aiohttp


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


async def fixed_rate(url: str, template: bytes, rate: float, duration: float, headers: dict[str, str],
                     warmup: float) -> dict:
    total = int(rate * (duration + warmup))
    payloads = bodies(template, total)
    statuses: collections.Counter[int] = collections.Counter()
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=0)  # open loop: never wait for a free connection
    async with aiohttp.ClientSession(connector=connector) as session:
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05

        async def one(i: int, due: float) -> None:
            try:
                async with session.post(url, data=payloads[i], headers=headers) as response:
                    await response.read()
                    statuses[response.status] += 1
            except aiohttp.ClientError as exc:
                statuses[type(exc).__name__] += 1  # type: ignore[index]
                return
            if due - start >= warmup:
                latencies.append((loop.time() - due) * 1000)

        tasks = []
        for i in range(total):
            due = start + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
        elapsed = loop.time() - start
    latencies.sort()
    return {'sent': total, 'statuses': {str(k): v for k, v in statuses.items()},
            'p50_ms': percentile(latencies, 0.50), 'p90_ms': percentile(latencies, 0.90),
            'p99_ms': percentile(latencies, 0.99), 'max_ms': latencies[-1] if latencies else float('nan'),
            'achieved_rate': total / elapsed, 'measured': len(latencies)}


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
        result = asyncio.run(fixed_rate(args.url, template, args.rate, args.duration, headers, args.warmup))
    json.dump(result, sys.stdout)
    sys.stdout.write('\n')


if __name__ == '__main__':
    main()
