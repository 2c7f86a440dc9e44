"""`--json` lines carry exactly the fields docs/stats.md documents, with the documented types.

The tables under the doc's "### recv stats line", "### recv sender entry", "### recv summary line",
"### send stats line" and "### send summary line" headings are parsed; one real run of `tiality recv
--json` and `tiality send --json` provides the lines they are compared with.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "stats.md"
SECTIONS = (
    "recv stats line",
    "recv sender entry",
    "recv summary line",
    "send stats line",
    "send summary line",
)
TIALITY = [sys.executable, "-m", "tiality_cli"]
ENV = {**os.environ, "NO_COLOR": "1"}


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


TYPES: dict[str, Callable[[Any], bool]] = {
    "integer": _integer,
    "number": _number,
    "number or null": lambda v: v is None or _number(v),
    "integer or null": lambda v: v is None or _integer(v),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "list of sender entries": lambda v: isinstance(v, list),
}


def documented() -> dict[str, dict[str, str]]:
    """{section: {field: type}} from the doc's tables."""
    out: dict[str, dict[str, str]] = {}
    section: str | None = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip()
            section = title if title in SECTIONS else None
            if section:
                out[section] = {}
            continue
        m = re.match(r"\|\s*`(\w+)`\s*\|\s*([^|]+?)\s*\|\s*([^|]+?)\s*\|\s*(.+?)\s*\|\s*$", line)
        if section and m:
            name, type_, unit, meaning = m.groups()
            assert name not in out[section], f"{section}: {name} documented twice"
            assert unit and meaning, f"{section}: {name} needs a unit (or -) and a meaning"
            out[section][name] = type_
    return out


@dataclass
class Run:
    recv: list[dict[str, Any]]
    send: list[dict[str, Any]]


@pytest.fixture(scope="module")
def run() -> Run:
    """One stream of 2.5 s from `tiality send --json` to `tiality recv --json`, then Ctrl-C."""
    recv = subprocess.Popen(
        [*TIALITY, "recv", "--port", "0", "--bind", "127.0.0.1", "-o", "null://", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert recv.stderr is not None
        port = int(re.findall(r"listening on port (\d+)", recv.stderr.readline())[0])
        sent = subprocess.run(
            [*TIALITY, "send", f"127.0.0.1:{port}", "-i", "tone://440", "--seconds", "2.5", "--json"],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=30,
        )
        assert sent.returncode == 0, sent.stderr
        recv.send_signal(signal.SIGINT)
        out, _ = recv.communicate(timeout=20)
        assert recv.returncode == 0
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    return Run(
        [json.loads(ln) for ln in out.splitlines()], [json.loads(ln) for ln in sent.stdout.splitlines()]
    )


def check(line: dict[str, Any], fields: dict[str, str], what: str) -> None:
    assert set(line) == set(fields), (
        f"{what}: undocumented {sorted(set(line) - set(fields))}, missing {sorted(set(fields) - set(line))}"
    )
    for name, type_ in fields.items():
        assert TYPES[type_](line[name]), f"{what}: {name}={line[name]!r} is not {type_}"


def test_the_doc_documents_every_section_with_known_types() -> None:
    doc = documented()
    assert set(doc) == set(SECTIONS)
    for section, fields in doc.items():
        assert len(fields) >= 8, section
        assert set(fields.values()) <= set(TYPES), (
            f"{section}: unknown types {set(fields.values()) - set(TYPES)}"
        )
        if section != "recv sender entry":
            assert fields["event"] == "string", section


def test_recv_json_lines_match_the_doc(run: Run) -> None:
    doc = documented()
    stats = [ln for ln in run.recv if ln["event"] == "stats"]
    summary = run.recv[-1]
    assert len(stats) >= 2 and run.recv[:-1] == stats
    for ln in stats:
        check(ln, doc["recv stats line"], "recv stats line")
        for entry in ln["senders"]:
            check(entry, doc["recv sender entry"], "recv sender entry")
    entries = [e for ln in stats for e in ln["senders"]]
    assert entries, "no stats line was written while the sender was connected"
    assert entries[-1]["peer"].startswith("ipv4:127.0.0.1:") and entries[-1]["state"] == "playing"
    check(summary, doc["recv summary line"], "recv summary line")
    assert summary["event"] == "summary" and summary["packets"] == 125 and summary["streams_started"] == 1


def test_send_json_lines_match_the_doc(run: Run) -> None:
    doc = documented()
    *stats, summary = run.send
    assert len(stats) >= 2
    for ln in stats:
        assert ln["event"] == "stats"
        check(ln, doc["send stats line"], "send stats line")
    check(summary, doc["send summary line"], "send summary line")
    assert summary["event"] == "summary" and summary["state"] == "done"
    assert summary["packets_sent"] == summary["receiver_packets"] == 125
    assert isinstance(summary["rtt_ms"], float) and summary["rtt_ms"] > 0  # a clock exchange was made
