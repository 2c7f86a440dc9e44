"""A small operator GUI on tiality: an output level meter, volume and mute, and one row per sender with its
gain, mute and solo. See docs/embedding.md.

    python examples/operator_gui.py                                  # port 50052, default speakers
    python examples/operator_gui.py -o null:// --demo tone://440     # no sound card: a local test sender

Threads: tkinter owns the main thread. The receiver plays on its sink's thread and calls subscribers from
its event thread; this window hands events to tk through a queue that ``after()`` polls, because tk may
only be touched from its own thread. Controls are plain attribute writes, safe from the tk thread; the
receiver ramps every change, so sliders do not click.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
import tkinter as tk
from tkinter import ttk
from typing import Any

import tiality_cli as tiality

REFRESH_MS = 50  # 20 Hz: a smooth meter, a negligible cost
METER_FLOOR_DB = -60.0


class SenderRow:
    """One connected sender: name, gain slider, mute and solo, and its level."""

    def __init__(self, parent: tk.Misc, session: tiality.Session, row: int) -> None:
        self.session = session
        self.gain = tk.DoubleVar(value=session.gain_db)
        self.mute = tk.BooleanVar(value=session.muted)
        self.solo = tk.BooleanVar(value=session.solo)
        self.level = tk.StringVar(value="")
        self.widgets: list[tk.Widget] = [
            ttk.Label(parent, text=session.name, width=28),
            ttk.Scale(parent, from_=-30.0, to=12.0, variable=self.gain, length=160),
            ttk.Checkbutton(parent, text="mute", variable=self.mute),
            ttk.Checkbutton(parent, text="solo", variable=self.solo),
            ttk.Label(parent, textvariable=self.level, width=22),
        ]
        for col, w in enumerate(self.widgets):
            w.grid(row=row, column=col, sticky="w", padx=4, pady=2)
        self.gain.trace_add("write", lambda *_: setattr(session, "gain_db", self.gain.get()))
        self.mute.trace_add("write", lambda *_: setattr(session, "muted", self.mute.get()))
        self.solo.trace_add("write", lambda *_: setattr(session, "solo", self.solo.get()))

    def destroy(self) -> None:
        for w in self.widgets:
            w.destroy()


class OperatorWindow:
    def __init__(self, root: tk.Tk, rx: tiality.Receiver) -> None:
        self.root, self.rx = root, rx
        self.events: queue.SimpleQueue[tiality.ReceiverEvent] = queue.SimpleQueue()
        self.unsubscribe = rx.subscribe(self.events.put)  # called on the receiver's event thread
        self.rows: dict[int, SenderRow] = {}
        self.seen: list[str] = []  # event kinds, in order (printed at exit)
        self.names: set[str] = set()  # every sender shown
        root.title(f"tiality: port {rx.port}" if rx.port else "tiality")

        top = ttk.Frame(root, padding=8)
        top.pack(fill="x")
        self.meter = tk.Canvas(top, width=240, height=16, background="black", highlightthickness=0)
        self.meter.grid(row=0, column=0, padx=4)
        self.meter_text = tk.StringVar(value="")
        ttk.Label(top, textvariable=self.meter_text, width=10).grid(row=0, column=1)
        self.volume = tk.DoubleVar(value=rx.volume_db)
        ttk.Label(top, text="volume").grid(row=0, column=2, padx=(12, 2))
        ttk.Scale(top, from_=-60.0, to=12.0, variable=self.volume, length=160).grid(row=0, column=3)
        self.volume.trace_add("write", lambda *_: setattr(rx, "volume_db", self.volume.get()))
        self.muted = tk.BooleanVar(value=rx.muted)
        ttk.Checkbutton(top, text="mute", variable=self.muted).grid(row=0, column=4, padx=8)
        self.muted.trace_add("write", lambda *_: setattr(rx, "muted", self.muted.get()))

        self.senders = ttk.LabelFrame(root, text="senders", padding=8)
        self.senders.pack(fill="both", expand=True, padx=8)
        self.empty = ttk.Label(self.senders, text="waiting for senders")
        self.empty.grid(row=0, column=0)
        self.status = tk.StringVar(value="")
        ttk.Label(root, textvariable=self.status, padding=8).pack(fill="x")
        root.after(REFRESH_MS, self.refresh)

    def take_events(self) -> None:
        """The events so far, in order, now on tk's thread."""
        while True:
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                return
            self.seen.append(ev.kind)
            if ev.kind in ("output_error", "sender_refused"):
                self.status.set(f"{ev.kind}: {ev.detail}")

    def refresh(self) -> None:
        self.take_events()
        live = {s.id: s for s in self.rx.sessions()}
        for sid in self.rows.keys() - live.keys():
            self.rows.pop(sid).destroy()
        for sid, session in live.items():
            if sid not in self.rows:
                self.rows[sid] = SenderRow(self.senders, session, row=len(self.rows) + 1)
                self.names.add(session.name)
        if self.rows:
            self.empty.grid_remove()
        else:
            self.empty.grid()
        for v in self.rx.session_views():
            row = self.rows.get(v.id)
            if row is not None:
                row.level.set(f"{v.stats.level_dbfs:6.1f} dBFS  {v.stats.latency_ms_p50:5.1f} ms")
        self.draw_meter(self.rx.output_level_dbfs)
        self.root.after(REFRESH_MS, self.refresh)

    def draw_meter(self, db: float) -> None:
        frac = min(1.0, max(0.0, (db - METER_FLOOR_DB) / -METER_FLOOR_DB))
        self.meter.delete("bar")
        colour = "red" if db > -1.0 else "orange" if db > -12.0 else "green"
        self.meter.create_rectangle(0, 0, 240 * frac, 16, fill=colour, width=0, tags="bar")
        self.meter_text.set(f"{db:6.1f} dB" if db > -120 else "silent")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default="sd://default", help="output URI (sd://, alsa://, null://)")
    ap.add_argument("--port", type=int, default=50052, help="port to listen on (0: any free one)")
    ap.add_argument("--demo", metavar="INPUT", help="also run a local sender of INPUT (e.g. tone://440)")
    ap.add_argument("--seconds", type=float, help="close after this long (prints what happened as JSON)")
    ap.add_argument("--self-test", action="store_true", help="with --seconds: move the controls on a script")
    args = ap.parse_args()
    try:
        rx = tiality.Receiver(args.output, tiality.ReceiverConfig(port=args.port))
        port = rx.start()
    except tiality.TialityError as exc:
        print(f"operator_gui: {exc}", file=sys.stderr)
        return 1
    demo = None
    if args.demo:
        demo = tiality.Sender(args.demo, tiality.SenderConfig(f"127.0.0.1:{port}"))
        demo.start()
    root = tk.Tk()
    win = OperatorWindow(root, rx)
    report: dict[str, Any] = {}

    def close() -> None:
        if demo is not None:
            demo.stop()  # ends its stream cleanly: the receiver plays it out
        rx.stop()
        win.take_events()
        root.destroy()

    if args.self_test:
        t0 = time.monotonic()

        def step(name: str, action: Any) -> None:  # records the meter, then moves a control like a user
            report[name] = round(rx.output_level_dbfs, 1)
            report.setdefault("at_s", []).append(round(time.monotonic() - t0, 2))
            action()

        root.after(1500, lambda: step("level_db", lambda: win.volume.set(-6.0)))
        root.after(2500, lambda: step("level_after_volume_db", lambda: win.muted.set(True)))
        root.after(3500, lambda: step("level_after_mute_db", lambda: None))
    root.protocol("WM_DELETE_WINDOW", close)
    if args.seconds is not None:
        root.after(int(args.seconds * 1000), close)
    root.mainloop()
    if args.seconds is not None:
        report.update(events=win.seen, senders=sorted(win.names))
        print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
