"""
The benchmark's CPU accounting (``bench/common.py``): the peer scenario's CPU-per-event figures.

A real process group is measured: a process that burns a known amount of CPU time and starts a
child that burns another. The figures must count both, and tell the process from its child.
"""
import importlib.util
import pathlib
import sys
import textwrap
import time
from types import ModuleType

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PARENT_CPU = 0.6  # seconds of CPU time each burns (process_time: whatever else the machine runs)
CHILD_CPU = 0.3
STARTUP_ALLOWANCE = 0.25  # what starting Python and the child may add


@pytest.fixture(scope='module')
def common() -> ModuleType:
    # Loaded under a name of its own: the benchmark's modules import each other as top-level modules.
    spec = importlib.util.spec_from_file_location('bench_common', ROOT / 'bench' / 'common.py')
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BURNER = textwrap.dedent(f"""
    import subprocess, sys, time

    def burn(seconds):
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass

    if sys.argv[1:] == ['child']:
        burn({CHILD_CPU})
        print('CHILD DONE', flush=True)
    else:
        child = subprocess.Popen([sys.executable, __file__, 'child'])
        print(f'CHILD {{child.pid}}', flush=True)
        burn({PARENT_CPU})
        print('PARENT DONE', flush=True)
    time.sleep(60)  # alive until stopped: only live processes are counted
""")


def test_cpu_time_of_a_process_group_is_split_between_the_process_and_its_children(
        common: ModuleType, tmp_path: pathlib.Path) -> None:
    script = tmp_path / 'burner.py'
    script.write_text(BURNER)
    process = common.Process([sys.executable, str(script)], name='burner', log=tmp_path / 'burner.log')
    try:
        child = int(process.wait_for_line('CHILD ').split()[1])
        before = process.cpu_seconds()
        process.wait_for_line('PARENT DONE', timeout=60)
        process.wait_for_line('CHILD DONE', timeout=60)
        time.sleep(0.1)  # the kernel's counters catch up with the last tick
        after = process.cpu_seconds()
    finally:
        process.stop()

    assert set(after) == {process.pid, child}
    main, children = common.cpu_used(before, after, process.pid)
    # The snapshot before may already hold some of each burn: compare the totals since the start too.
    assert PARENT_CPU <= after[process.pid] <= PARENT_CPU + STARTUP_ALLOWANCE
    assert CHILD_CPU <= after[child] <= CHILD_CPU + STARTUP_ALLOWANCE
    assert main == pytest.approx(after[process.pid] - before[process.pid])
    assert children == pytest.approx(after[child] - before.get(child, 0.0))
    assert main > children > 0


def test_a_group_with_no_live_process_is_an_error(common: ModuleType, tmp_path: pathlib.Path) -> None:
    process = common.Process([sys.executable, '-c', 'pass'], name='quick', log=tmp_path / 'quick.log')
    process.popen.wait(30)
    process.stop()
    with pytest.raises(common.BenchError, match=rf"no process of group {process.pid} in /proc"):
        common.group_cpu_seconds(process.pid)
