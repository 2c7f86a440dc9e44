"""Subprocesses and time-stamped recordings, shared by the device tests and the latency benchmark.

``Proc`` runs a program (``Proc.tiality(...)``: ``python -m tiality_cli ...``) and collects its stdout and
stderr lines as they arrive, so a caller can wait for a line ("listening on port N", a JSON stats line)
instead of sleeping. ``StampedRecorder`` records a PulseAudio monitor with ``parec`` and notes when each
block arrived: a null sink hands a block to its monitor as it starts rendering it, so the earliest
(arrival - block start) over a recording's blocks is the wall time of its first sample, to about half a
millisecond. Two recordings placed that way can be compared in time (end-to-end latency).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from tests.helpers.soundcard import RATE, parec_command, wait_until

WAIT_S = 20.0  # default ceiling for each condition wait (a loaded 2-core machine starts Python slowly)

I16 = npt.NDArray[np.int16]


class ProcessError(RuntimeError):
    """A program did not say what was waited for, or did not exit cleanly; the message has its last lines."""


class Proc:
    """A subprocess whose stdout and stderr lines are collected as they arrive."""

    def __init__(self, name: str, cmd: list[str], env: Mapping[str, str], cwd: Path | None = None) -> None:
        self.name = name
        self.out: list[str] = []
        self.err: list[str] = []
        self._changed = threading.Condition()
        self._open_streams = 2
        self.proc = subprocess.Popen(
            cmd, env=dict(env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._collect, args=(stream, lines), daemon=True)
            for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for reader in self._readers:
            reader.start()

    @classmethod
    def tiality(cls, args: list[str], env: Mapping[str, str]) -> Proc:
        """``tiality ARGS`` as an operator would start it (this interpreter, ``-m tiality_cli``)."""
        return cls(f"tiality {args[0]}", [sys.executable, "-m", "tiality_cli", *args], env)

    def _collect(self, stream: IO[str], lines: list[str]) -> None:
        for line in stream:
            with self._changed:
                lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._open_streams -= 1
            self._changed.notify_all()

    def wait_for(self, what: str, found: Callable[[], Any], timeout_s: float = WAIT_S) -> Any:
        """Waits until ``found()`` returns something truthy (checked on each new line); returns it.

        Raises ProcessError when the program closes its output first, or after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not (result := found()):
                left = deadline - time.monotonic()
                if self._open_streams == 0 or left <= 0:
                    raise ProcessError(f"{self.name}: no {what}; {self.describe()}")
                self._changed.wait(left)
            return result

    def stderr_match(self, pattern: str) -> re.Match[str] | None:
        """The first stderr line so far that matches ``pattern`` (from its start), if any."""
        with self._changed:
            lines = list(self.err)
        return next((m for line in lines if (m := re.match(pattern, line))), None)

    def port(self) -> int:
        """The port from ``tiality recv: listening on port N, ...`` (always on stderr), once it is there."""
        pattern = r"tiality recv: listening on port (\d+),"
        m: re.Match[str] = self.wait_for("'listening on port' line", lambda: self.stderr_match(pattern))
        return int(m[1])

    def json_lines(self, event: str | None = None) -> list[dict[str, Any]]:
        """The JSON objects printed on stdout so far (``--json``), only those of ``event`` if given."""
        with self._changed:
            lines = [line for line in self.out if line.startswith("{")]
        parsed = [json.loads(line) for line in lines]
        return [d for d in parsed if event is None or d.get("event") == event]

    def finish(self, timeout_s: float = WAIT_S) -> dict[str, Any]:
        """Waits for a clean exit (code 0, exactly one JSON summary line); returns that summary."""
        code = self.proc.wait(timeout_s)
        for reader in self._readers:
            reader.join(timeout_s)
        summaries = self.json_lines("summary")
        if code != 0 or len(summaries) != 1:
            raise ProcessError(f"{self.name}: {len(summaries)} summary line(s); {self.describe()}")
        return summaries[0]

    def interrupt(self) -> None:
        """SIGINT, as Ctrl-C: the programs stop cleanly and print their summary."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def describe(self) -> str:
        with self._changed:
            tail = [*self.out[-3:], *self.err[-5:]]
        return f"exit {self.proc.poll()}, last output: {' | '.join(tail) or '(none)'}"


class StampedRecorder:
    """Records a monitor with ``parec`` and notes when each block arrived, to place it on the wall clock."""

    def __init__(self, env: Mapping[str, str], device: str, channels: int = 2, latency_ms: int = 10) -> None:
        """``latency_ms``: the blocks asked of the server, which also become the monitored sink's render
        blocks (the lowest latency any client asks for): 2 ms makes the virtual card's timing as fine as
        a hardware period, for latency figures that must match the receiver's (benchmarks/latency.py,
        tests/test_true_latency.py); 10 ms is lighter on a loaded machine (docs/performance.md)."""
        self.device = device
        self.channels = channels
        self._chunks: list[bytes] = []
        self._ends: list[int] = []  # samples per channel received after each block
        self._arrivals: list[int] = []  # time.monotonic_ns() of its arrival
        self._frames = 0
        self._lock = threading.Lock()
        cmd = parec_command(device, channels, RATE, latency_ms)  # small blocks: each arrival says more
        self._proc = subprocess.Popen(cmd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._thread = threading.Thread(target=self._pump, name=f"parec {device}", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        out = self._proc.stdout
        assert out is not None
        leftover = b""
        size = 2 * self.channels
        while chunk := os.read(out.fileno(), 1 << 16):
            now = time.monotonic_ns()
            data = leftover + chunk
            usable = len(data) - len(data) % size
            leftover = data[usable:]
            with self._lock:
                self._chunks.append(data[:usable])
                self._frames += usable // size
                self._ends.append(self._frames)
                self._arrivals.append(now)

    @property
    def frames(self) -> int:
        with self._lock:
            return self._frames

    def wait_frames(self, frames: int, timeout_s: float = WAIT_S) -> StampedRecorder:
        wait_until(lambda: self.frames >= frames, timeout_s, f"{frames} samples from {self.device}")
        return self

    def start_ns(self) -> float:
        """time.monotonic_ns() of the recording's first sample.

        Only blocks of the usual size count (a block split or merged on its way has no clean start), and
        of those the earliest arrival relative to its start: the one that met no scheduling delay.
        """
        with self._lock:
            ends = np.array(self._ends, dtype=np.float64)
            arrivals = np.array(self._arrivals, dtype=np.float64)
        sizes = np.diff(ends, prepend=0.0)
        values, counts = np.unique(sizes[1:], return_counts=True)
        block = values[np.argmax(counts)]
        usual = sizes == block
        return float(np.min(arrivals[usual] - (ends[usual] - block) * 1e9 / RATE))

    def stop(self) -> I16:
        """Ends the recording (again is harmless); returns it, shape (frames, channels)."""
        if self._proc.poll() is None:
            self._proc.terminate()
        self._proc.wait(10)
        self._thread.join(10)
        with self._lock:
            data = b"".join(self._chunks)
        pcm: I16 = np.frombuffer(data, dtype="<i2").astype(np.int16).reshape(-1, self.channels)
        return pcm
