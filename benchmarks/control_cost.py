"""What the playout's latency control costs per decoded frame, on the simulated clock: figures, not tests.

    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.control_cost [--runs 5] [--frames 3000]

Runs ``StreamPlayout`` through the harness of tests/test_playout.py (real Opus packets, a ManualClock, a
5 ms sink block, 48 kHz stereo, 20 ms frames, 0-2 ms of jitter) and times, inside each pull, the call to
the controller: ``_control`` (``LatencyController.update``) after a pull that decoded, ``tick`` after one
that did not. With drift compensation on (the converter stays at ratio 1 on this driftless link, so no
resampling is timed) and off (exact samples: what ``recv --economy`` turns a stream into). A receiver
pays this for every stream, 50 frames a second; docs/performance.md has the figures before and after
the controller moved to once per decoded frame.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from tests.test_playout import Network, Receiver, Sender, transmit
from tiality_cli.playout import PlayoutConfig


def _timed(fn: Callable[[int, int], None], acc: list[int]) -> Callable[[int, int], None]:
    def call(now: int, n: int) -> None:
        t = time.perf_counter_ns()
        fn(now, n)
        acc[0] += time.perf_counter_ns() - t
        acc[1] += 1

    return call


def run(drift_compensation: bool, frames: int) -> tuple[float, float, float]:
    """One stream of ``frames`` frames; returns (µs per update, µs per tick, µs of control per frame)."""
    config = PlayoutConfig(drift_compensation=drift_compensation)
    rx = Receiver(config=config, record=False).send(transmit(Sender(), range(frames), Network(jitter_ms=2.0)))
    pb = rx.playout
    upd, tick = [0, 0], [0, 0]
    pb._control = _timed(pb._control, upd)  # type: ignore[method-assign,assignment]
    if hasattr(pb.control, "tick"):  # a checkout from before the controller ran once per frame has none
        pb.control.tick = _timed(pb.control.tick, tick)  # type: ignore[method-assign,assignment]
    rx.run_to_end()
    per_frame = (upd[0] + tick[0]) / 1000 / frames
    return upd[0] / 1000 / max(1, upd[1]), tick[0] / 1000 / max(1, tick[1]), per_frame


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="runs of each mode (medians are reported)")
    ap.add_argument("--frames", type=int, default=3000, help="20 ms frames per run")
    args = ap.parse_args()
    print("| drift compensation | update, per call | tick, per call | control per frame | per stream per s |")
    print("|---|---:|---:|---:|---:|")
    for dc in (True, False):
        rows = np.array([run(dc, args.frames) for _ in range(args.runs)])
        u, t, f = np.median(rows, axis=0)
        mode = "on (ratio 1)" if dc else "off (exact, as in economy)"
        print(f"| {mode} | {u:.2f} µs | {t:.2f} µs | {f:.1f} µs | {f * 50 / 1000:.2f} ms |")


if __name__ == "__main__":
    main()
