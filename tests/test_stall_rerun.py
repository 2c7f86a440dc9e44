"""The test suite's own rule for host stalls (tests/helpers/stalls.py), tried on a real stall: processes at
SCHED_FIFO 99 take every CPU away from everything else for 30 ms, as a hypervisor does to a vCPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

INNER = '''
import os, subprocess, sys
from pathlib import Path

BURN = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(99))
end = time.monotonic() + 0.030
while time.monotonic() < end:
    pass
"""


def stall_every_cpu():
    burners = [subprocess.Popen([sys.executable, "-c", BURN, str(cpu)]) for cpu in os.sched_getaffinity(0)]
    assert all(b.wait(timeout=10) == 0 for b in burners)


def attempt(name):
    count = Path(name)
    n = int(count.read_text()) if count.exists() else 0
    count.write_text(str(n + 1))
    return n


def test_fails_once_during_a_stall():
    if attempt("once") == 0:
        stall_every_cpu()
        assert False, "late by 30 ms"


def test_fails_every_time_during_stalls():
    attempt("every")
    stall_every_cpu()
    assert False, "late again"


def test_fails_without_a_stall():
    attempt("calm")
    assert False, "a bug"
'''


def can_use_fifo_99() -> bool:
    probe = "import os; os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(99))"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def test_a_failure_during_a_host_stall_runs_again_and_only_then(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(INNER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.helpers.stalls", "test_inner.py"]
    done = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True)
    out = done.stdout
    count = {name: int((tmp_path / name).read_text()) for name in ("once", "every", "calm")}
    if not can_use_fifo_99():  # no real-time priority: neither the stall nor the canaries can be real
        assert "canaries WITHOUT real-time priority (no re-runs)" in out, out
        assert count == {"once": 1, "every": 1, "calm": 1}
        return
    assert done.returncode == 1, out
    assert re.search(r"2 failed, 1 passed", out), out
    # Stalled failures run again, up to 5 times in all; the calm one runs once: a bug gets no second go.
    assert count == {"once": 2, "every": 5, "calm": 1}, out
    assert "test_inner.py::test_fails_once_during_a_stall: passed on attempt 2 of 5" in out
    assert "test_inner.py::test_fails_every_time_during_stalls: did not pass on attempt 5 of 5" in out
    assert "test_fails_without_a_stall: " not in out
    # Listed: the failed attempts that ran again (1 + 4), each with its stall and its failure.
    listed = re.findall(r"attempt (\d) failed while CPU \d+ stalled (\d+) ms .*: AssertionError: (.*)", out)
    assert [(k, why) for k, _, why in listed] == [
        ("1", "late by 30 ms"),
        *[(str(k), "late again") for k in range(1, 5)],
    ], out
    assert all(25 <= int(ms) <= 200 for _, ms, _ in listed), out  # the 30 ms each burner took
    # The last attempt's failure shows the stall it failed during.
    assert "host stalls during this attempt" in out, out
