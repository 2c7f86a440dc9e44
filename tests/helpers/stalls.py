"""Host stalls seen from outside the code under test: one canary process per CPU.

The tests that run on a real-time clock (the virtual sound card, paced sinks) hold tiality to figures a
shared virtual machine cannot always give anyone: when the hypervisor takes a vCPU away for 20-50 ms,
every process on it stops, and audio late by that much is late whatever the code does. A canary is a
tiny process pinned to one CPU at SCHED_FIFO 90, above the sound server (5) and tiality's audio threads
(4), that wakes every 2 ms and logs each wake that came late. Nothing in user space can delay it on its
own CPU; a late wake means the CPU itself was gone (hypervisor steal, a kernel stall). That is the
evidence this module's pytest plugin asks for before it runs a failed test again (``ATTEMPTS``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from _pytest.runner import runtestprotocol

PERIOD_S = 0.002
LOG_GAP_S = 0.004  # a wake this late is logged (2 ms or more lost)
RT_PRIORITY = 90

# Runs as ``python -c``: the standard library only, so it starts in a few ms and imports nothing of ours.
_CANARY = """
import os, sys, time
cpu, path, period, gap = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
os.sched_setaffinity(0, {cpu})
try:
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(int(sys.argv[5])))
    rt = 1
except OSError:
    rt = 0
parent = os.getppid()
with open(path, "w", buffering=1) as out:
    out.write(f"rt {rt}\\n")
    prev = time.monotonic()
    n = 0
    while True:
        time.sleep(period)
        now = time.monotonic()
        if now - prev > gap:
            out.write(f"{prev:.6f} {now:.6f}\\n")
            now = time.monotonic()  # a slow write is the canary's own delay, not the host's
        prev = now
        n += 1
        if n % 500 == 0 and os.getppid() != parent:
            break
"""


@dataclass(frozen=True)
class Stall:
    """One late wake of a canary: its CPU was not running anything from ``start`` to ``end``."""

    cpu: int
    start: float  # time.monotonic(), shared by all processes
    end: float

    @property
    def ms(self) -> float:
        """The time lost: the gap between two wakes less the period the canary asked for."""
        return (self.end - self.start - PERIOD_S) * 1000


class StallWatch:
    """A canary per CPU for the life of the test session; ``between`` says which stalls fell in a span."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._canaries: list[tuple[int, Path, subprocess.Popen[bytes]]] = []

    def start(self) -> None:
        for cpu in sorted(os.sched_getaffinity(0)):
            log = self.directory / f"canary-cpu{cpu}.log"
            args = [str(cpu), str(log), str(PERIOD_S), str(LOG_GAP_S), str(RT_PRIORITY)]
            proc = subprocess.Popen([sys.executable, "-I", "-c", _CANARY, *args], stdin=subprocess.DEVNULL)
            self._canaries.append((cpu, log, proc))

    @property
    def realtime(self) -> bool:
        """True when every canary got SCHED_FIFO: only then is a late wake the host's and not a process's."""
        firsts = [_first_line(log) for _, log, _ in self._canaries]
        return bool(firsts) and all(line == "rt 1" for line in firsts)

    def between(self, t0: float, t1: float) -> list[Stall]:
        """Every stall that overlaps [t0, t1] (monotonic seconds), on any CPU."""
        found = []
        for cpu, log, _ in self._canaries:
            try:
                lines = log.read_text().splitlines()[1:]
            except FileNotFoundError:
                continue
            for line in lines:
                parts = line.split()
                if len(parts) != 2:
                    continue  # a line being written
                start, end = float(parts[0]), float(parts[1])
                if end >= t0 and start <= t1:
                    found.append(Stall(cpu, start, end))
        return found

    def stop(self) -> None:
        """Ends the canaries; their logs stay readable for the session's summary."""
        for _, _, proc in self._canaries:
            proc.kill()
            proc.wait(timeout=5)


def _first_line(path: Path) -> str:
    try:
        with path.open() as f:
            return f.readline().strip()
    except FileNotFoundError:
        return ""


# The plugin (conftest.py loads it): a test that fails while the host itself stalled runs again.
STALL_MS = 5.0  # the least lost time that counts: the tightest real-time tolerances are 5 ms
_watch: StallWatch | None = None
ATTEMPTS = 5  # a test is run at most this many times, each time after a failure during a stall
_retried: list[tuple[str, list[tuple[str, list[Stall]]], str, int]] = []  # nodeid, failures, outcome, runs


def pytest_sessionstart(session: pytest.Session) -> None:
    global _watch
    _watch = StallWatch(Path(tempfile.mkdtemp(prefix="tiality-canary-")))
    _watch.start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _watch is not None:
        _watch.stop()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _watch is not None:
        shutil.rmtree(_watch.directory, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    """Runs a test; while its call fails during a stall (a canary saw its CPU taken away for
    ``STALL_MS`` or more), runs it again from setup, up to ``ATTEMPTS`` in all, and reports the last
    attempt: same thresholds every time, and a failure with no stall fails. The failed attempts and
    their stalls are listed at the end of the session."""
    if _watch is None:
        return None
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    failures: list[tuple[str, list[Stall]]] = []  # the attempts that failed during a stall, and ran again
    attempt = 0
    while True:
        attempt += 1
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
        failed = [r for r in reports if r.when == "call" and r.failed]
        if not failed:
            break
        call = failed[0]
        stalls = _watch.between(*_monotonic_span(call))  # the call only: setup and teardown do not count
        first = call.longrepr
        crash = getattr(getattr(first, "reprcrash", None), "message", str(first)).splitlines()[0]
        stalled = (
            max((s.ms for s in stalls), default=0.0) >= STALL_MS
            and _watch.realtime
            and not any(r.failed for r in reports if r.when != "call")  # a broken setup or teardown stands
            and "Timeout" not in crash  # pytest-timeout arms its timer once for all attempts
        )
        if not stalled or attempt == ATTEMPTS:
            if stalls:
                _note_stalls(call, stalls)
            break
        failures.append((crash, stalls))
    if failures:
        passed = all(r.passed for r in reports)
        _retried.append((item.nodeid, failures, "passed" if passed else "did not pass", attempt))
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def _monotonic_span(report: pytest.TestReport) -> tuple[float, float]:
    """The report's start and stop (wall-clock seconds) on the canaries' monotonic clock."""
    offset = time.monotonic() - time.time()
    return report.start + offset, report.stop + offset


def _note_stalls(report: pytest.TestReport, stalls: list[Stall]) -> None:
    """A failure shows the host stalls during its last attempt (too small to run it again, or the last)."""
    lines = [f"CPU {s.cpu}: {s.ms:.1f} ms lost at monotonic {s.start:.3f}" for s in stalls]
    report.sections.append(("host stalls during this attempt", "\n".join(lines)))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _watch is None:
        return
    if _retried:
        terminalreporter.write_sep("=", "tests run again after failing during a host stall")
        for nodeid, failures, outcome, attempts in _retried:
            terminalreporter.write_line(f"{nodeid}: {outcome} on attempt {attempts} of {ATTEMPTS}")
            for k, (crash, stalls) in enumerate(failures, 1):
                worst = max(stalls, key=lambda s: s.ms)
                lost = sum(s.ms for s in stalls)
                terminalreporter.write_line(
                    f"    attempt {k} failed while CPU {worst.cpu} stalled {worst.ms:.0f} ms ({len(stalls)} "
                    f"stalls, {lost:.0f} ms lost in all): {crash}"
                )
    everything = _watch.between(0.0, time.monotonic())
    big = [s for s in everything if s.ms >= STALL_MS]
    worst_ms = max((s.ms for s in everything), default=0.0)
    how = "SCHED_FIFO canaries" if _watch.realtime else "canaries WITHOUT real-time priority (no re-runs)"
    terminalreporter.write_line(
        f"host stalls ({how}, one per CPU): {len(everything)} of 2 ms or more, {len(big)} of "
        f"{STALL_MS:.0f} ms or more, the worst {worst_ms:.1f} ms"
    )
