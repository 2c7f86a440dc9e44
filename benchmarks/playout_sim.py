"""The playout engine's start, corrections and freeze recovery on the simulated clock: figures, not tests.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/playout_sim.py [--seconds 20]

Runs ``StreamPlayout`` through the harness of tests/test_playout.py (real Opus packets, a ManualClock, a
5 ms sink block; 48 kHz stereo, drift compensation on, ``--latency auto``) in four scenarios and prints,
for each, what the issue measured on the virtual sound card:

    clean     a link with 5-7 ms of one-way delay, nothing else
    burst N   the same, but the sender's first N frames come in one burst (a capture device's start-up)
    freeze    a clean link on which nothing arrives for 150 or 300 ms at 5 s, then the backlog in one
              burst: a frozen network delivers it at once, a frozen sender sends it at once
    jitter    0-4 ms of jitter for 10 s, then 0-40 ms (the target jumps: how is latency raised?)

Latency here is B (the playout delay beyond the earliest arrivals): on a link with a constant floor it
differs from the capture-to-speaker latency by a constant. "Steady" is B's median over the run's last
half. The largest correction is the largest step in B from one 5 ms pull to the next.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tests.test_playout import (
    MS,
    STEREO_48K,
    T0,
    Network,
    Receiver,
    S,
    Sender,
    Trace,
    stall,
    transmit,
)
from tiality_cli.playout import PlayoutConfig
from tiality_cli.stats import ReceiverStats

T = STEREO_48K.frame_ns


def burst(n: int, frames: range) -> list[tuple[int, int, int, bytes]]:
    """The first ``n`` frames leave together, when frame n - 1 does (their capture times are kept)."""
    sender = Sender()
    out = transmit(sender, frames, Network())
    hold = sender.send_ns(n - 1) + 5 * MS
    return sorted(((max(t, hold), s, c, p) for t, s, c, p in out), key=lambda a: a[0])


def freeze(where: str, ms: int, frames: range) -> list[tuple[int, int, int, bytes]]:
    """Nothing arrives for ``ms`` from 5 s on, then the backlog: a frozen network delivers what it held
    at once, a frozen sender sends it at once (each packet then crossing the network on its own)."""
    sender = Sender()
    a, b = T0 + 5 * S, T0 + 5 * S + ms * MS
    if where == "network":
        return stall(transmit(sender, frames), 5.0, 5.0 + ms / 1000)
    net = Network()
    sent = [(b if a <= sender.send_ns(k) < b else sender.send_ns(k)) for k in frames]
    return sorted((sender.packet(k, sent[k] + net.delay_ns()) for k in frames), key=lambda x: x[0])


def figures(name: str, tr: Trace, seconds: float, st: ReceiverStats) -> None:
    b = np.frombuffer(tr.buffer_ms)
    played = np.frombuffer(tr.played, dtype=np.int8).astype(bool)
    t = (np.frombuffer(tr.t_ns, dtype=np.int64) - tr.t_ns[0]) / 1e9
    steady = float(np.median(b[played & (t >= seconds / 2)]))
    start = int(np.argmax(played))
    excess = b[played] - steady
    tp = t[played] - t[start]
    first = float(np.abs(excess[tp < 1.0]).max())
    later = float(np.abs(excess[tp >= 1.0]).max())
    out = np.flatnonzero(np.abs(excess) > 2.0)
    settle = float(tp[out[-1]]) if len(out) else 0.0
    step = float(np.abs(np.diff(b[played])).max())
    print(
        f"{name:10s} steady {steady:6.2f} ms | excess 1st s {first:5.2f} ms, after {later:5.2f} ms | "
        f"last >2 ms off at {settle:5.2f} s | largest step {step:5.2f} ms | "
        f"skipped {st.skipped} inserted {st.inserted} concealed {st.concealed} late {st.late}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    a = ap.parse_args()
    n = round(a.seconds * 1e9 / T)
    cfg = PlayoutConfig()
    rx = Receiver(config=cfg, record=False).send(transmit(Sender(), range(n))).run(a.seconds - 0.2)
    figures("clean", rx.trace, a.seconds, rx.playout.stats)
    for k in (3, 8):
        rx = Receiver(config=cfg, record=False).send(burst(k, range(n))).run(a.seconds - 0.2)
        figures(f"burst {k}", rx.trace, a.seconds, rx.playout.stats)
    for where in ("network", "sender"):
        for ms in (150, 300):
            rx = Receiver(config=cfg, record=False).send(freeze(where, ms, range(n))).run(a.seconds - 0.2)
            before = float(np.median(rx.trace.buffer(1.0, 5.0)))
            after = rx.trace.buffer(5.0 + ms / 1000)
            off = np.flatnonzero(np.abs(after - before) > 10.0)
            st = rx.playout.stats
            print(
                f"freeze {where} {ms} ms: B before {before:.2f} ms, at most {after.max():.2f} ms after, "
                f"back within 10 ms {float(off[-1]) * 0.005 if len(off) else 0.0:.2f} s after the burst; "
                f"target before {rx.trace.target(1.0, 5.0).max():.2f} ms, at most "
                f"{rx.trace.target(5.0).max():.2f} ms after, {rx.trace.target(12.0, 12.01)[0]:.2f} ms 7 s "
                f"later; queued at the end {rx.playout.jb.count}; skipped {st.skipped} inserted "
                f"{st.inserted} concealed {st.concealed} late {st.late}"
            )
    rng = np.random.default_rng(3)
    extra = [float(rng.uniform(0, 40.0 if k * 0.02 >= 10.0 else 4.0)) for k in range(n)]
    arrivals = transmit(Sender(), range(n), Network(jitter_ms=0.0), extra_ms=lambda k: extra[k])
    rx = Receiver(config=cfg, record=False).send(arrivals).run(a.seconds - 0.2)
    figures("jitter", rx.trace, a.seconds, rx.playout.stats)


if __name__ == "__main__":
    main()
