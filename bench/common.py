"""
Shared pieces of the benchmark: processes on loopback, figures, medians.

Everything the benchmark starts listens on 127.0.0.1 and is stopped by the
benchmark itself (by process id), also when a scenario fails.
"""
import asyncio
import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

BENCH = pathlib.Path(__file__).resolve().parent
ROOT = BENCH.parent
PYTHON = sys.executable
LOOPBACK = '127.0.0.1'


class BenchError(Exception):
    """A scenario could not be measured; the message says why."""


class Skipped(Exception):
    """A scenario cannot run here (an external tool is missing); the message says which."""


# -- the reference servers -----------------------------------------------------------------------

async def serve_until_stopped(app: Any, host: str, port: int) -> None:
    """
    Serve an aiohttp application (bench/bare_server.py, bench/relay.py) until the benchmark stops it.

    Prints ``PORT <n>`` once listening (``Process.wait_for_line`` reads it). The listen backlog is
    reponotify's receiver's (1024), so that the references queue connection bursts as it does.
    """
    from aiohttp import web  # the servers' need only: the benchmark's driver does not import aiohttp

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    print(f'PORT {site._server.sockets[0].getsockname()[1]}', flush=True)  # type: ignore[union-attr]
    await asyncio.Event().wait()  # until the benchmark stops us (SIGTERM)


# -- figures -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Figure:
    """One measured figure: every run's value, its median, and the reference measured alongside."""
    scenario: str
    name: str
    unit: str
    runs: list[float]
    reference_name: str | None = None
    reference_runs: list[float] | None = None
    reference_unit: str | None = None
    goal: str | None = None  # in words, e.g. ">= 0.6x the reference"
    met: bool | None = None  # whether the goal is met (None: no goal for this figure)
    note: str = ''
    higher_is_better: bool = True

    @property
    def median(self) -> float:
        return statistics.median(self.runs) if self.runs else float('nan')

    @property
    def reference_median(self) -> float | None:
        return statistics.median(self.reference_runs) if self.reference_runs else None

    @property
    def ratio(self) -> float | None:
        reference = self.reference_median
        if reference is None or reference == 0:
            return None
        return self.median / reference

    def to_json(self) -> dict[str, Any]:
        return {
            'scenario': self.scenario, 'name': self.name, 'unit': self.unit,
            'median': self.median, 'runs': self.runs,
            'reference': None if self.reference_name is None else {
                'name': self.reference_name, 'unit': self.reference_unit or self.unit,
                'median': self.reference_median, 'runs': self.reference_runs,
            },
            'ratio': self.ratio, 'goal': self.goal, 'met': self.met, 'note': self.note,
        }


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# -- processes -----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def child_env() -> dict[str, str]:
    """The environment of child processes: the package importable, no proxies (loopback only)."""
    env = {key: value for key, value in os.environ.items()
           if key.lower() not in ('http_proxy', 'https_proxy', 'all_proxy')}
    # BENCH_OPERATOR: another copy of operator/ to measure instead (before/after comparisons, bench/README.md).
    operator = os.environ.get('BENCH_OPERATOR') or str(ROOT / 'operator')
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [operator, str(BENCH), env.get('PYTHONPATH', '')]))
    env['NO_PROXY'] = env['no_proxy'] = '*'
    env.setdefault('PYTHONDONTWRITEBYTECODE', '1')
    return env


class Process:
    """A child process that the benchmark started; stopped by its pid (and its group) on exit."""

    def __init__(self, argv: Sequence[str], *, name: str, log: pathlib.Path, stdin_pipe: bool = False,
                 cwd: pathlib.Path | None = None) -> None:
        self.name = name
        self.log_path = log
        self._log = open(log, 'wb')
        self.popen = subprocess.Popen(
            list(argv), stdout=self._log, stderr=subprocess.STDOUT, env=child_env(), cwd=cwd or ROOT,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL, start_new_session=True)
        self.started = time.time()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_seconds(self) -> dict[int, float]:
        """CPU time used so far by this process and every live process it started (its process group)."""
        return group_cpu_seconds(self.pid)  # started in a session of its own: the group's id is its pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors='replace')

    def wait_for_line(self, prefix: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.output().splitlines():
                if line.startswith(prefix):
                    return line
            if self.popen.poll() is not None:
                raise BenchError(f"{self.name} exited ({self.popen.returncode}) before printing {prefix!r}:\n"
                                 + self.output()[-2000:])
            time.sleep(0.02)
        raise BenchError(f"{self.name} did not print {prefix!r} within {timeout:g}s:\n{self.output()[-2000:]}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        self._log.close()


@contextlib.contextmanager
def processes() -> Iterator[list[Process]]:
    """Every process appended to the list is stopped on exit, last started first."""
    started: list[Process] = []
    try:
        yield started
    finally:
        for process in reversed(started):
            process.stop()


@contextlib.contextmanager
def workdir(keep: bool = False) -> Iterator[pathlib.Path]:
    """A scratch folder on the real disk (fsync costs what it costs in production)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix='reponotify-bench-'))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def wait_http(url: str, timeout: float = 30.0, process: Process | None = None) -> None:
    """Wait until ``url`` answers at all (any HTTP status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            if process is not None and process.popen.poll() is not None:
                raise BenchError(f"{process.name} exited ({process.popen.returncode}):\n{process.output()[-3000:]}")
            time.sleep(0.02)
    raise BenchError(f"{url} did not answer within {timeout:g}s")


def http_json(url: str, data: bytes | None = None, timeout: float = 10.0) -> Any:
    request = urllib.request.Request(url, data=data, method='POST' if data is not None else 'GET')
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body.startswith((b'{', b'[')) else body.decode()


def run_json(argv: Sequence[str], *, timeout: float, name: str) -> dict[str, Any]:
    """Run a helper process to its end; its last stdout line is a JSON object."""
    try:
        done = subprocess.run(list(argv), capture_output=True, env=child_env(), cwd=ROOT, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{name} did not finish within {timeout:g}s") from None
    if done.returncode != 0:
        raise BenchError(f"{name} failed ({done.returncode}):\n{done.stderr.decode(errors='replace')[-3000:]}")
    lines = done.stdout.decode().strip().splitlines()
    if not lines:
        raise BenchError(f"{name} printed nothing:\n{done.stderr.decode(errors='replace')[-3000:]}")
    return json.loads(lines[-1])


# -- the target ----------------------------------------------------------------------------------

class Target:
    """The loopback webhook target (bench/target.py), in its own process."""

    def __init__(self, process: Process, port: int) -> None:
        self.process = process
        self.port = port

    @property
    def url(self) -> str:
        return f'http://{LOOPBACK}:{self.port}'

    def stats(self) -> dict[str, Any]:
        return http_json(f'{self.url}/stats')

    def reset(self) -> None:
        http_json(f'{self.url}/reset', data=b'')

    def wait_count(self, count: int, timeout: float) -> dict[str, Any]:
        """Wait until the target has received ``count`` POSTs; returns its stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats['count'] >= count:
                return stats
            if time.monotonic() > deadline:
                raise BenchError(f"the target got {stats['count']} of {count} POSTs within {timeout:g}s")
            time.sleep(0.02)


def start_target(started: list[Process], folder: pathlib.Path) -> Target:
    process = Process([PYTHON, str(BENCH / 'target.py'), '--port', '0'], name='target',
                      log=folder / 'target.log', stdin_pipe=True)
    started.append(process)
    port = int(process.wait_for_line('PORT ').split()[1])
    return Target(process, port)


# -- the machine ---------------------------------------------------------------------------------

def load_average() -> float:
    return os.getloadavg()[0]


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (this one by default), from /proc."""
    path = f'/proc/{pid}/status' if pid else '/proc/self/status'
    with open(path) as file:
        for line in file:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) * 1024
    raise BenchError("no VmRSS in /proc (not Linux?)")


CLOCK_TICKS = os.sysconf('SC_CLK_TCK')  # the unit of /proc/<pid>/stat's CPU times


def group_cpu_seconds(group: int) -> dict[int, float]:
    """
    CPU time (user + system, all threads) each live process of a process group has used, by pid, from /proc.

    The kernel counts it in clock ticks (10 ms): a figure made of it needs thousands of events.
    """
    used = {}
    for entry in os.scandir('/proc'):
        if not entry.name.isdigit():
            continue
        try:
            with open(f'/proc/{entry.name}/stat') as file:
                # After the command name in parentheses (which may hold spaces): state, ppid, pgrp, ...
                fields = file.read().rpartition(')')[2].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[2]) == group:
            used[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    if not used:
        raise BenchError(f"no process of group {group} in /proc (not Linux, or it exited)")
    return used


def cpu_used(before: dict[int, float], after: dict[int, float], main: int) -> tuple[float, float]:
    """CPU seconds used between two snapshots of a group: by its ``main`` process, and by the others."""
    spent = {pid: seconds - before.get(pid, 0.0) for pid, seconds in after.items()}
    return spent.get(main, 0.0), sum(seconds for pid, seconds in spent.items() if pid != main)


def machine() -> dict[str, Any]:
    import platform
    info: dict[str, Any] = {
        'cpus': os.cpu_count(), 'python': platform.python_version(), 'platform': platform.platform(),
    }
    with contextlib.suppress(OSError):
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'):
                info['cpu'] = line.split(':', 1)[1].strip()
                break
    return info
