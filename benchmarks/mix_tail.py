"""What the end of the mixer's block costs: the limiter, the peak meter and the int16 conversion.

    python -m benchmarks.mix_tail [--runs 6] [--blocks 300]

``Receiver.fill`` ends every block (5 ms: 240 stereo samples at 48 kHz) with ``soft_limit``, the peak
for the level meter, and ``to_int16``. Timed here two ways on the same quiet block, each the median
thread CPU of ``--blocks`` blocks, ``--runs`` times interleaved (the median of the runs is reported):

- *with the limiter's peak* (what ``fill`` does): ``soft_limit`` returns the peak it measured with the
  reductions' own ufuncs, and ``to_int16`` skips its clip when that peak cannot reach full scale;
- *peak measured again* (what ``fill`` did before, but for the limiter's own test, which also went
  through ndarray's methods then): the limiter, then the meter's ``max``/``min`` through ndarray's
  methods, and ``to_int16`` with its clip.

Back to back (caches warm), and each block after 5 ms asleep, as a sink's thread runs it 200 times a
second. docs/performance.md ("the mixer's block tail") has the figures.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import numpy as np

from benchmarks.cpu import median_thread_us
from tiality_cli.io.base import to_int16
from tiality_cli.receiver import soft_limit


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.mix_tail", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--blocks", type=int, default=300)
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    quiet = (rng.standard_normal((240, 2)) * 0.1).astype(np.float32)  # -20 dBFS rms: below the knee
    acc, s1, s2 = np.empty_like(quiet), np.empty_like(quiet), np.empty_like(quiet)
    pcm = np.empty((240, 2), np.int16)

    def with_peak() -> None:
        np.copyto(acc, quiet)
        peak = soft_limit(acc, s1, s2)
        to_int16(acc, pcm, peak=peak)

    def measured_again() -> None:
        np.copyto(acc, quiet)
        soft_limit(acc, s1, s2)
        max(float(acc.max()), -float(acc.min()))
        to_int16(acc, pcm)

    def blocks(fn: Callable[[], None], gap_s: float) -> float:
        return median_thread_us(fn, args.blocks, functools.partial(time.sleep, gap_s) if gap_s else None)

    print("| between blocks | with the limiter's peak | peak measured again |")
    print("|---|---:|---:|")
    for gap_s, name in ((0.0, "nothing (back to back)"), (0.005, "5 ms asleep (as a sink runs it)")):
        new, old = [], []
        for _ in range(args.runs):
            new.append(blocks(with_peak, gap_s))
            old.append(blocks(measured_again, gap_s))
        print(f"| {name} | {statistics.median(new):.1f} µs | {statistics.median(old):.1f} µs |", flush=True)


if __name__ == "__main__":
    main()
