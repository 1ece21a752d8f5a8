"""
The benchmark's smoke run: every scenario of bench/ at tiny sizes, so that the benchmark cannot rot.

Only that it runs and reports is checked here, never its figures against the goals: those are read
from a full run's output (bench/README.md). A scenario whose external tool is missing still runs
without it (wrk: the aiohttp load generator instead; Alertmanager: no reference figure).
"""
import json
import os
import pathlib
import subprocess
import sys

from reponotify.delivery_processes import available_cpus, process_count

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCENARIOS = {'routing', 'ingest', 'delivery', 'peer', 'memory', 'status', 'recovery'}


def test_the_benchmark_runs_every_scenario_and_writes_its_figures(tmp_path: pathlib.Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / 'bench' / 'run.py'), '--smoke', '--out', str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                          env={**os.environ, 'PYTHONDONTWRITEBYTECODE': '1'})
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]

    report = json.loads((tmp_path / 'results.json').read_text())
    assert report['mode'] == 'smoke'
    assert report['errors'] == {}
    # reponotify's default process model, resolved for this machine once, so every scenario runs the same.
    assert report['sizes']['delivery_processes'] == process_count('auto', available_cpus())
    measured = {figure['scenario'] for figure in report['figures']}
    assert measured | set(report['skipped']) == SCENARIOS, (measured, report['skipped'])
    for figure in report['figures']:
        assert figure['runs'] and all(isinstance(value, (int, float)) for value in figure['runs']), figure
        assert figure['median'] == figure['median'], figure  # not NaN
        if figure['reference'] is not None:
            assert figure['reference']['runs'] and figure['ratio'] is not None, figure
        assert figure['met'] in (True, False, None), figure

    markdown = (tmp_path / 'results.md').read_text()
    assert markdown.count('\n| ') == len(report['figures']) + 1  # the header and one row per figure
    assert 'scenario' in done.stdout and 'written:' in done.stdout  # the table, printed
