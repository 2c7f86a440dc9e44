"""examples/operator_gui.py runs under a virtual X server: its controls reach the audio, its events arrive.

The example's ``--self-test`` moves its own widgets on a script (the volume slider to -6 dB at 1.5 s, the
mute box at 2.5 s) while a local sender plays a -12 dBFS tone into ``null://``, and prints what its level
meter showed before each move, the events it received and the senders it listed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_operator_gui_example_plays_mixes_and_closes_cleanly() -> None:
    if shutil.which("xvfb-run") is None:
        pytest.fail("xvfb-run is missing: run scripts/sysdeps.sh test (Debian: xvfb, xauth)", pytrace=False)
    proc = subprocess.run(
        [
            "xvfb-run",
            "-a",
            sys.executable,
            str(ROOT / "examples" / "operator_gui.py"),
            "-o",
            "null://",
            "--port",
            "0",
            "--demo",
            "tone://440",
            "--seconds",
            "4.5",
            "--self-test",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["level_db"] == pytest.approx(-12.0, abs=0.5)  # tone:// peaks at -12 dBFS
    assert report["level_after_volume_db"] - report["level_db"] == pytest.approx(-6.0, abs=0.5)
    # Muted, the meter falls at its 20 dB/s: a second later it is at least 15 dB down.
    assert report["level_after_mute_db"] < report["level_after_volume_db"] - 15
    assert report["events"] == ["stream_started", "stream_ended"]
    assert len(report["senders"]) == 1 and report["senders"][0].endswith("tone://440")
