"""
reponotify's benchmark: every scenario on this machine, side by side with its reference.

    bash bench/run.sh                  # everything (about 6-9 minutes on 2 cores)
    bash bench/run.sh --smoke          # tiny sizes, one run each: checks the benchmark still works
    bash bench/run.sh --only routing,memory --repeat 5

Prints a table and writes ``results.json`` and ``results.md`` to ``--out``
(default: bench/results/). Each figure is the median of ``--repeat`` runs, with
the median of its reference measured in the same run and the ratio of the two.
Goals are read from the output; nothing here fails because a goal is missed.

Everything runs on loopback (127.0.0.1) and is stopped by the benchmark itself.
"""
import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import shutil
import sys
import textwrap
import time
import traceback
from collections.abc import Callable
from typing import Any

BENCH = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from common import (LOOPBACK, PYTHON, ROOT, BenchError, Figure, Process, Skipped, Target,  # noqa: E402
                    cpu_used, free_port, load_average, machine, median, processes, run_json, start_target,
                    wait_http, workdir)
from reponotify.delivery_processes import process_count  # noqa: E402
from reponotify.eventloop import DEFAULT_EVENT_LOOP, EVENT_LOOPS  # noqa: E402

NOTIFICATION = """\
apiVersion: reponotify.dev/v1alpha1
kind: RepositoryNotification
metadata: {{name: {name}, namespace: bench}}
spec:
  repository: acme/web
  event: repo_push
  method: webhook
  config: {{url: "{url}"}}
"""


@dataclasses.dataclass(frozen=True)
class Sizes:
    repeat: int
    routing_sizes: tuple[int, ...]
    glob_share: float
    wrk_seconds: float
    latency_seconds: float
    delivery_count: int
    peer_count: int
    memory_counts: tuple[int, ...]
    status_events: int
    recovery_pending: int
    # The process model measured: reponotify's --delivery-processes ('auto', its default, is resolved
    # for this machine before the runs, so that every scenario and BENCH_OPERATOR copy gets the number).
    delivery_processes: int | str = 'auto'
    event_loop: str = DEFAULT_EVENT_LOOP  # reponotify's --event-loop


FULL = Sizes(repeat=3, routing_sizes=(100, 10_000, 100_000), glob_share=0.05, wrk_seconds=5, latency_seconds=5,
             delivery_count=5000, peer_count=5000, memory_counts=(0, 10_000, 100_000), status_events=10_000,
             recovery_pending=100_000)
SMOKE = Sizes(repeat=1, routing_sizes=(100, 1000), glob_share=0.05, wrk_seconds=1, latency_seconds=1,
              delivery_count=200, peer_count=200, memory_counts=(0, 1000), status_events=200,
              recovery_pending=500)


def sample_body(folder: pathlib.Path) -> pathlib.Path:
    from reponotify.events import sample_payload
    path = folder / 'repo_push.json'
    path.write_text(json.dumps(sample_payload('repo_push', 'acme/web')))
    return path


def standalone(started: list[Process], folder: pathlib.Path, target: Target, sizes: Sizes, *, name: str,
               state: pathlib.Path | None = None) -> tuple[Process, str]:
    """reponotify itself, as users run it: the standalone command, one webhook notification to the target."""
    manifests = folder / f'{name}-manifests'
    manifests.mkdir(exist_ok=True)
    (manifests / 'hook.yaml').write_text(NOTIFICATION.format(name='hook', url=f'{target.url}/hook'))
    port = free_port()
    process = Process(
        [PYTHON, '-m', 'reponotify', 'standalone', '--manifests', str(manifests),
         '--state-dir', str(state or folder / f'{name}-state'), '--host', LOOPBACK, '--port', str(port),
         '--allow-targets', '127.0.0.0/8', '--workers', '64', '--per-target', '64',
         '--delivery-processes', str(sizes.delivery_processes), '--event-loop', sizes.event_loop,
         '--no-email-verification', '--log-level', 'warning'],
        name=name, log=folder / f'{name}.log')
    started.append(process)
    url = f'http://{LOOPBACK}:{port}'
    return process, url


def client(mode: str, url: str, body: pathlib.Path, *, timeout: float = 300, **options: Any) -> dict[str, Any]:
    argv = [PYTHON, str(BENCH / 'client.py'), mode, '--url', url, '--body', str(body)]
    for name, value in options.items():
        argv += [f'--{name}', str(value)]
    return run_json(argv, timeout=timeout, name=f'client {mode}')


def accepted(result: dict[str, Any], expected: int) -> None:
    if result['statuses'] != {'202': expected} and result['statuses'] != {'200': expected}:
        raise BenchError(f"not every request was accepted: {result['statuses']}")


# -- scenarios -----------------------------------------------------------------------------------

def routing(sizes: Sizes, folder: pathlib.Path) -> list[Figure]:
    result = run_json([PYTHON, str(BENCH / 'work.py'), 'routing', '--sizes', ','.join(map(str, sizes.routing_sizes)),
                       '--glob-share', str(sizes.glob_share), '--repeat', str(max(5, sizes.repeat))],
                      timeout=600, name='routing')
    smallest, largest = sizes.routing_sizes[0], sizes.routing_sizes[-1]
    reference = result[str(smallest)]['hot']['us_per_route']
    figures = []
    for size in sizes.routing_sizes:
        entry = result[str(size)]
        for pattern in ('hot', 'spread'):
            if pattern not in entry:
                continue
            measured = entry[pattern]
            traffic = '100 repositories' if pattern == 'hot' else '5,000 repositories'
            figure = Figure(
                'routing', f'route one event, {size:,} notifications ({entry["globs"]:,} globs), '
                           f'events to {traffic}', 'µs', measured['us_per_route'], higher_is_better=False,
                note=f"{measured['matched_per_event']:.2f} matches per event; 100 notifications per organization, "
                     f"5% of them globs on it (org/* or org/prefix*)")
            if size != smallest:
                figure.reference_name = f'{smallest:,} notifications'
                figure.reference_runs = reference
            if size == largest and pattern == 'hot':
                figure.goal = f'<= 1.5x the {smallest:,} case'
                figure.met = figure.ratio is not None and figure.ratio <= 1.5
            if pattern == 'spread':
                figure.note += ('; events spread over many repositories: the working set outgrows the CPU '
                                'caches (a plain dict lookup slows alike)')
            figures.append(figure)
    return figures


def wrk_script(folder: pathlib.Path, body: pathlib.Path) -> pathlib.Path:
    text = body.read_text()
    script = folder / 'post.lua'
    script.write_text(textwrap.dedent(f'''\
        wrk.method = "POST"
        wrk.headers["Content-Type"] = "application/json"
        wrk.body = [==[{text}]==]
        done = function(summary, latency, requests)
          local e = summary.errors
          io.write(string.format(
            'JSON {{"requests": %d, "duration_us": %d, "status_errors": %d, "socket_errors": %d}}\\n',
            summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout))
        end
        '''))
    return script


def load(url: str, body: pathlib.Path, seconds: float, script: pathlib.Path | None) -> float:
    """Accepted events per second at full load: wrk (one thread, 64 connections), or the aiohttp client."""
    if script is not None:
        import subprocess
        done = subprocess.run(['wrk', '-t1', '-c64', f'-d{seconds:g}s', '-s', str(script), url],
                              capture_output=True, timeout=seconds + 60, env={**os.environ, 'NO_PROXY': '*'})
        line = next((line for line in done.stdout.decode().splitlines() if line.startswith('JSON ')), None)
        if done.returncode != 0 or line is None:
            raise BenchError(f"wrk failed ({done.returncode}): {done.stdout.decode()[-1000:]} "
                             f"{done.stderr.decode()[-1000:]}")
        result = json.loads(line[5:])
        ok = result['requests'] - result['status_errors']
        if result['status_errors'] or result['socket_errors']:
            raise BenchError(f"wrk saw errors: {result}")
        return ok / (result['duration_us'] / 1e6)
    result = client('blast', url, body, count=int(2500 * seconds), concurrency=64)
    accepted(result, int(2500 * seconds))
    return result['rate']


def ingest(sizes: Sizes, folder: pathlib.Path) -> list[Figure]:
    body = sample_body(folder)
    script = wrk_script(folder, body) if shutil.which('wrk') else None
    tool = 'wrk -t1 -c64' if script else 'aiohttp client, 64 connections (wrk is not installed)'
    rates, bare_rates = [], []
    p50, p99, bare_p50, bare_p99 = [], [], [], []
    with processes() as started:
        target = start_target(started, folder)
        bare = Process([PYTHON, str(BENCH / 'bare_server.py'), '--port', '0'], name='bare server',
                       log=folder / 'bare.log')
        started.append(bare)
        bare_url = f"http://{LOOPBACK}:{bare.wait_for_line('PORT ').split()[1]}/v1/events/repo_push"
        process, base = standalone(started, folder, target, sizes, name='ingest')
        wait_http(f'{base}/healthz', process=process)
        url = f'{base}/v1/events/repo_push'
        for _ in range(sizes.repeat):
            bare_rates.append(load(bare_url, body, sizes.wrk_seconds, script))
            before = target.stats()['count']
            rates.append(load(url, body, sizes.wrk_seconds, script))
            # Let the deliveries of this run finish before the next measurement.
            wait_idle(target, before)
        half = median(rates) / 2
        for _ in range(sizes.repeat):
            reference = client('rate', bare_url, body, rate=half, duration=sizes.latency_seconds, warmup=1)
            bare_p50.append(reference['p50_ms'])
            bare_p99.append(reference['p99_ms'])
            before = target.stats()['count']
            result = client('rate', url, body, rate=half, duration=sizes.latency_seconds, warmup=1)
            accepted(result, result['sent'])
            p50.append(result['p50_ms'])
            p99.append(result['p99_ms'])
            wait_idle(target, before)
    reference = 'bare aiohttp server (202, no work)'
    return [
        Figure('ingest', 'events/s accepted (202), durable outbox', 'events/s', rates, reference,
               bare_rates, goal='>= 3,000 events/s', met=median(rates) >= 3000,
               note=f"load: {tool}; deliveries run alongside (one notification matches)"),
        Figure('ingest', f'p50 latency at half load ({half:,.0f}/s)', 'ms', p50, reference, bare_p50,
               higher_is_better=False,
               note='open-loop client on raw keep-alive connections (bench/client.py rate); '
                    'latency from the scheduled send time'),
        Figure('ingest', f'p99 latency at half load ({half:,.0f}/s)', 'ms', p99, reference, bare_p99,
               goal='< 20 ms', met=median(p99) < 20, higher_is_better=False),
    ]


def wait_idle(target: Target, before: int, quiet: float = 0.5, timeout: float = 120) -> None:
    """Wait until the target stops receiving (the previous run's deliveries are done)."""
    deadline = time.monotonic() + timeout
    last, since = target.stats()['count'], time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        count = target.stats()['count']
        if count != last:
            last, since = count, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
    raise BenchError(f"the target was still receiving after {timeout:g}s ({last - before} deliveries)")


def end_to_end(url: str, body: pathlib.Path, count: int, target: Target, timeout: float) -> float:
    """POSTs/s from the first of ``count`` requests to ``url`` (64 concurrent) to the last the target got."""
    result = client('blast', url, body, count=count, concurrency=64)
    accepted(result, count)
    stats = target.wait_count(count, timeout)
    return count / (stats['last'] - result['first_send'])


def end_to_end_cpu(process: Process, url: str, body: pathlib.Path, count: int, target: Target,
                   timeout: float) -> tuple[float, float, float]:
    """
    end_to_end() through ``process``, with the CPU time it and its child processes used meanwhile:
    (POSTs/s, its own us per event, its children's us per event).
    """
    before = process.cpu_seconds()
    rate = end_to_end(url, body, count, target, timeout)
    main, children = cpu_used(before, process.cpu_seconds(), process.pid)
    return rate, main / count * 1e6, children / count * 1e6


def delivery(sizes: Sizes, folder: pathlib.Path) -> list[Figure]:
    body = sample_body(folder)
    count = sizes.delivery_count
    bare, fanout, many = [], [], []
    with processes() as started:
        target = start_target(started, folder)
        for run in range(sizes.repeat):
            target.reset()
            bare.append(end_to_end(f'{target.url}/hook', body, count, target, 30))
            for mode, runs in (('fanout', fanout), ('many', many)):
                target.reset()
                work = folder / f'{mode}-{run}'
                work.mkdir()
                result = run_json([PYTHON, str(BENCH / 'work.py'), 'delivery', '--mode', mode, '--count', str(count),
                                   '--target', target.url, '--folder', str(work),
                                   '--delivery-processes', str(sizes.delivery_processes),
                                   '--event-loop', sizes.event_loop],
                                  timeout=300, name=f'delivery {mode}')
                if result['received'] != count or result['succeeded'] != count:
                    raise BenchError(f"delivery {mode}: {result}")
                runs.append(result['rate'])
                shutil.rmtree(work, ignore_errors=True)
    reference = 'bare aiohttp client, 64 concurrent, same POSTs'
    note = (f'in-process engine, durable outbox, 64 workers, per-target limit 64, '
            f'delivery processes: {sizes.delivery_processes}')
    return [
        Figure('delivery', f'deliveries/s, one event to {count:,} notifications', 'deliveries/s', fanout,
               reference, bare, goal='>= 0.6x the reference', met=median(fanout) >= 0.6 * median(bare), note=note),
        Figure('delivery', f'deliveries/s, {count:,} events to one notification each', 'deliveries/s', many,
               reference, bare, goal='>= 0.6x the reference', met=median(many) >= 0.6 * median(bare), note=note),
    ]


ALERTMANAGER_CONFIG = """\
route:
  receiver: hook
  group_by: ['...']
  group_wait: 0s
  group_interval: 1h
  repeat_interval: 100h
receivers:
- name: hook
  webhook_configs:
  - url: {url}
    send_resolved: false
"""
ALERT = '[{"labels": {"alertname": "RepoPush", "repository": "acme/web", "id": "{{i}}"}, ' \
        '"annotations": {"summary": "pushed to acme/web"}}]'


def alertmanager_binary() -> str | None:
    return shutil.which('prometheus-alertmanager') or shutil.which('alertmanager')


def peer(sizes: Sizes, folder: pathlib.Path) -> list[Figure]:
    body = sample_body(folder)
    alert = folder / 'alert.json'
    alert.write_text(ALERT)
    count = sizes.peer_count
    binary = alertmanager_binary()
    ours, theirs, floor = [], [], []
    # CPU per event (us) in each end-to-end run: what the 2 cores are spent on, and so why a figure is what it is.
    ours_cpu, receiver_cpu, senders_cpu, theirs_cpu, floor_cpu = [], [], [], [], []
    with processes() as started:
        target = start_target(started, folder)
        for run in range(sizes.repeat):
            if binary is not None:
                target.reset()
                config = folder / f'alertmanager-{run}.yml'
                config.write_text(ALERTMANAGER_CONFIG.format(url=f'{target.url}/alert'))
                port = free_port()
                manager = Process([binary, f'--config.file={config}', f'--storage.path={folder}/am-{run}',
                                   f'--web.listen-address={LOOPBACK}:{port}', '--cluster.listen-address=',
                                   '--log.level=warn'], name='alertmanager', log=folder / f'alertmanager-{run}.log')
                started.append(manager)
                wait_http(f'http://{LOOPBACK}:{port}/-/ready', process=manager)
                alerts_url = f'http://{LOOPBACK}:{port}/api/v2/alerts'
                rate, main, _ = end_to_end_cpu(manager, alerts_url, alert, count, target, 120)
                theirs.append(rate)
                theirs_cpu.append(main)
                time.sleep(0.3)
                if target.stats()['count'] != count:
                    raise BenchError(f"Alertmanager sent {target.stats()['count']} notifications for {count} alerts")
                manager.stop()
            target.reset()
            relay = Process([PYTHON, str(BENCH / 'relay.py'), '--port', '0', '--target', f'{target.url}/hook'],
                            name='relay', log=folder / f'relay-{run}.log')
            started.append(relay)
            port = int(relay.wait_for_line('PORT ').split()[1])
            relay_url = f'http://{LOOPBACK}:{port}/v1/events/repo_push'
            rate, main, _ = end_to_end_cpu(relay, relay_url, body, count, target, 120)
            floor.append(rate)
            floor_cpu.append(main)
            relay.stop()
            target.reset()
            process, base = standalone(started, folder, target, sizes, name=f'peer-{run}')
            wait_http(f'{base}/healthz', process=process)
            rate, main, children = end_to_end_cpu(process, f'{base}/v1/events/repo_push', body, count, target, 300)
            ours.append(rate)
            ours_cpu.append(main + children)
            receiver_cpu.append(main)
            senders_cpu.append(children)
            process.stop()
    figure = Figure('peer', f'end to end, {count:,} events to one webhook each', 'deliveries/s', ours,
                    note='first ingest request to last delivery; aiohttp client, 64 concurrent, one event per '
                         f'request; reponotify: the standalone command, delivery processes: '
                         f'{sizes.delivery_processes}, durable outbox')
    floor_figure = Figure(
        'peer', f'end to end, {count:,} events, bare aiohttp relay (the floor)', 'deliveries/s', floor,
        note='bench/relay.py: one uvloop process answering 202 and forwarding each body with aiohttp, '
             'nothing else (no routing, outbox or status): the most the Python stack gives')
    cpu_note = ('CPU time (user + system) the process and its children used during the end-to-end run, per event; '
                'the load client and the target use the same cores')
    cpu_figure = Figure(
        'peer', 'CPU per event end to end, reponotify', 'µs', ours_cpu, higher_is_better=False,
        note=f'{cpu_note}: the receiving process {median(receiver_cpu):.0f} µs, the delivery processes '
             f'{median(senders_cpu):.0f} µs (medians)')
    floor_cpu_figure = Figure('peer', 'CPU per event end to end, bare aiohttp relay', 'µs', floor_cpu,
                              higher_is_better=False, note=cpu_note)
    if binary is not None:
        for each in (figure, floor_figure):
            each.reference_name = 'Prometheus Alertmanager (group_by ..., group_wait 0s), same load and target'
            each.reference_runs = theirs
        for each in (cpu_figure, floor_cpu_figure):
            each.reference_name = 'Prometheus Alertmanager, same run'
            each.reference_runs = theirs_cpu
        figure.goal = '> 1x Alertmanager'
        figure.met = median(ours) > median(theirs)
    else:
        figure.note += '; Alertmanager is not installed: no reference'
    return [figure, floor_figure, cpu_figure, floor_cpu_figure]


def memory(sizes: Sizes, folder: pathlib.Path) -> list[Figure]:
    rss: dict[int, list[float]] = {count: [] for count in sizes.memory_counts}
    per: dict[int, list[float]] = {count: [] for count in sizes.memory_counts if count}
    for _ in range(sizes.repeat):
        for count in sizes.memory_counts:
            result = run_json([PYTHON, str(BENCH / 'work.py'), 'memory', '--count', str(count)], timeout=600,
                              name=f'memory {count}')
            rss[count].append(result['rss_after'] / 2 ** 20)
            if count:
                per[count].append((result['rss_after'] - result['rss_before']) / count)
    zero = sizes.memory_counts[0]
    figures = []
    for count in sizes.memory_counts:
        figure = Figure('memory', f'RSS with {count:,} notifications', 'MiB', rss[count], higher_is_better=False,
                        note='compiled webhook notifications in a RoutingTable + StatusBook entries')
        if count != zero:
            figure.reference_name = f'RSS with {zero:,}'
            figure.reference_runs = rss[zero]
        figures.append(figure)
    for count, runs in per.items():
        figures.append(Figure('memory', f'bytes per notification ({count:,} loaded)', 'B', runs,
                              goal='< 2,048 B', met=median(runs) < 2048, higher_is_better=False,
                              note='RSS growth over the same process before loading, divided by the count'))
    return figures


def status(sizes: Sizes, folder: pathlib.Path) -> list[Figure]:
    rates, delivery_rates, exact, gaps = [], [], [], []
    with processes() as started:
        target = start_target(started, folder)
        for run in range(sizes.repeat):
            target.reset()
            work = folder / f'status-{run}'
            work.mkdir()
            result = run_json([PYTHON, str(BENCH / 'work.py'), 'status', '--events', str(sizes.status_events),
                               '--target', target.url, '--folder', str(work), '--port', str(free_port())],
                              timeout=600, name='status')
            rates.append(result['patches_per_second'])
            delivery_rates.append(result['events'] / result['burst_seconds'])
            exact.append(result['final_exact'])
            if result['min_gap'] is not None:
                gaps.append(result['min_gap'])
    return [Figure(
        'status', f'status PATCH/s for one resource, burst of {sizes.status_events:,} events', 'PATCH/s', rates,
        'deliveries/s recorded in that burst', delivery_rates, reference_unit='deliveries/s',
        goal='<= 1/s and the final status exact', met=median(rates) <= 1.0 and all(exact), higher_is_better=False,
        note=f"kopf operator against kmock's KubernetesEmulator; PATCH/s = (writes - 1) / (last - first write); "
             f"final status exact in {sum(exact)}/{len(exact)} runs; "
             f"shortest gap between two PATCHes {min(gaps) if gaps else float('nan'):.2f}s")]


def recovery(sizes: Sizes, folder: pathlib.Path) -> list[Figure]:
    filled = {}
    for pending in (1, sizes.recovery_pending):
        path = folder / f'outbox-{pending}.sqlite3'
        result = run_json([PYTHON, str(BENCH / 'work.py'), 'fill', '--count', str(pending), '--outbox', str(path)],
                          timeout=600, name='fill')
        if result['pending'] != pending:
            raise BenchError(f"filled {result['pending']} of {pending} deliveries")
        filled[pending] = path
    times: dict[int, list[float]] = {pending: [] for pending in filled}
    with processes() as started:
        target = start_target(started, folder)
        for run in range(sizes.repeat):
            for pending, path in filled.items():
                target.reset()
                state = folder / f'recovery-{pending}-{run}'
                state.mkdir()
                shutil.copy(path, state / 'outbox.sqlite3')
                process, _ = standalone(started, folder, target, sizes,
                                        name=f'recovery-{pending}-{run}', state=state)
                stats = target.wait_count(1, 120)
                times[pending].append(stats['first'] - process.started)
                process.stop()
                shutil.rmtree(state, ignore_errors=True)
    large = sizes.recovery_pending
    return [Figure('recovery', f'start to first delivery, {large:,} pending deliveries', 's', times[large],
                   'the same with 1 pending delivery', times[1], goal='< 10 s', met=median(times[large]) < 10,
                   higher_is_better=False, note='the standalone command started on a copy of a filled outbox')]


SCENARIOS: dict[str, Callable[[Sizes, pathlib.Path], list[Figure]]] = {
    'routing': routing, 'ingest': ingest, 'delivery': delivery, 'peer': peer, 'memory': memory,
    'status': status, 'recovery': recovery,
}


# -- output --------------------------------------------------------------------------------------

def number(value: float | None, unit: str = '') -> str:
    if value is None:
        return '-'
    if value != value:  # NaN
        return 'n/a'
    if abs(value) >= 100:
        text = f'{value:,.0f}'
    elif abs(value) >= 10:
        text = f'{value:.1f}'
    else:
        text = f'{value:.2f}'
    return f'{text} {unit}'.strip()


def rows(figures: list[Figure]) -> list[list[str]]:
    table = []
    for figure in figures:
        reference = '-' if figure.reference_name is None else \
            f'{number(figure.reference_median, figure.reference_unit or figure.unit)} ({figure.reference_name})'
        met = '-' if figure.met is None else ('yes' if figure.met else 'NO')
        ratio = '-' if figure.ratio is None else f'{figure.ratio:.3g}x'
        table.append([figure.scenario, figure.name, number(figure.median, figure.unit), str(len(figure.runs)),
                      reference, ratio, figure.goal or '-', met])
    return table


HEADER = ['scenario', 'figure', 'median', 'runs', 'reference (median)', 'ratio', 'goal', 'met']


def text_table(table: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [HEADER, *table]) for i in range(len(HEADER))]
    lines = ['  '.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [HEADER, *table]]
    lines.insert(1, '  '.join('-' * width for width in widths))
    return '\n'.join(lines)


def markdown(report: dict[str, Any], figures: list[Figure]) -> str:
    out = [f"# reponotify benchmark ({report['mode']})", '',
           f"Run {report['started']} on {report['machine'].get('cpu', '?')}, {report['machine']['cpus']} CPUs, "
           f"Python {report['machine']['python']}; load average {report['load_average']['start']:.2f} at the start, "
           f"{report['load_average']['end']:.2f} at the end; {report['seconds']:.0f} s in all. "
           f"Each figure is the median of its runs; the ratio is figure / reference, both measured in this run.", '',
           '| ' + ' | '.join(HEADER) + ' |', '|' + '---|' * len(HEADER)]
    for row in rows(figures):
        out.append('| ' + ' | '.join(cell.replace('|', '\\|') for cell in row) + ' |')
    notes = [f'- **{f.scenario}**, {f.name}: {f.note}' for f in figures if f.note]
    if notes:
        out += ['', 'Notes:', '', *notes]
    if report['skipped']:
        out += ['', 'Skipped:', '', *[f'- {name}: {why}' for name, why in report['skipped'].items()]]
    if report['errors']:
        out += ['', 'Failed:', '', *[f'- {name}: {why.splitlines()[0] if why else ""}'
                                     for name, why in report['errors'].items()]]
    out += ['', 'Command: `bash bench/run.sh' + (' --smoke' if report['mode'] == 'smoke' else '') + '`', '']
    return '\n'.join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--smoke', action='store_true', help="tiny sizes, one run each (CI)")
    parser.add_argument('--only', default='', help=f"comma-separated scenarios ({', '.join(SCENARIOS)})")
    parser.add_argument('--repeat', type=int, default=None, help="runs per figure (default: 3, smoke: 1)")
    parser.add_argument('--out', type=pathlib.Path, default=BENCH / 'results', help="folder for results.json/.md")
    parser.add_argument('--keep', action='store_true', help="keep the scratch folder (logs) for a look")
    parser.add_argument('--delivery-processes', default=None,
                        help="reponotify's --delivery-processes in every scenario that delivers "
                             "(default: auto, reponotify's own default)")
    parser.add_argument('--event-loop', choices=EVENT_LOOPS, default=None,
                        help="reponotify's --event-loop in every scenario that delivers (default: uvloop)")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    if args.repeat:
        sizes = dataclasses.replace(sizes, repeat=args.repeat)
    if args.delivery_processes is not None:
        if args.delivery_processes != 'auto' and not args.delivery_processes.isdigit():
            parser.error(f"--delivery-processes: auto or a number, not {args.delivery_processes!r}")
        sizes = dataclasses.replace(sizes, delivery_processes=args.delivery_processes)
    sizes = dataclasses.replace(sizes, delivery_processes=process_count(sizes.delivery_processes))
    if args.event_loop is not None:
        sizes = dataclasses.replace(sizes, event_loop=args.event_loop)
    names = [name.strip() for name in args.only.split(',') if name.strip()] or list(SCENARIOS)
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")

    started = time.time()
    report: dict[str, Any] = {
        'mode': 'smoke' if args.smoke else 'full', 'started': datetime.datetime.now().isoformat(timespec='seconds'),
        'machine': machine(), 'sizes': dataclasses.asdict(sizes), 'load_average': {'start': load_average()},
        'skipped': {}, 'errors': {}, 'timings': {},
    }
    figures: list[Figure] = []
    with workdir(keep=args.keep) as folder:
        if args.keep:
            print(f"scratch folder: {folder}", flush=True)
        for name in names:
            print(f"[{time.time() - started:6.1f}s] {name} ...", flush=True)
            scenario_started = time.time()
            scratch = folder / name
            scratch.mkdir()
            try:
                found = SCENARIOS[name](sizes, scratch)
            except Skipped as exc:
                report['skipped'][name] = str(exc)
                print(f"    skipped: {exc}", flush=True)
                continue
            except Exception as exc:  # one broken scenario must not hide the others' figures
                report['errors'][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
                print(f"    FAILED: {type(exc).__name__}: {exc}", flush=True)
                continue
            finally:
                report['timings'][name] = round(time.time() - scenario_started, 1)
            figures += found
            for row in rows(found):
                print('    ' + ' | '.join(row[1:]), flush=True)
    report['load_average']['end'] = load_average()
    report['seconds'] = time.time() - started
    report['figures'] = [figure.to_json() for figure in figures]

    print()
    print(text_table(rows(figures)))
    for name, why in report['skipped'].items():
        print(f"skipped {name}: {why}")
    for name, why in report['errors'].items():
        print(f"FAILED {name}: {why.splitlines()[0]}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'results.json').write_text(json.dumps(report, indent=2) + '\n')
    (args.out / 'results.md').write_text(markdown(report, figures))
    print(f"\nwritten: {args.out / 'results.json'}, {args.out / 'results.md'} ({report['seconds']:.0f} s)")
    return 1 if report['errors'] else 0


if __name__ == '__main__':
    sys.path.insert(0, str(ROOT / 'operator'))
    sys.exit(main())
