"""Options from the environment and the configuration files: precedence, errors, `tiality config`.

Real processes with a temporary HOME (the user file) and TIALITY_CONFIG (in place of the system file),
so nothing on this machine's /etc or ~ takes part. Precedence: cli > env > user file > system file >
default; a send and a recv configured only through files and variables stream to each other.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

TIALITY = [sys.executable, "-m", "tiality_cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Layout:
    """A temporary HOME with a user file, and a system file that TIALITY_CONFIG points at."""

    def __init__(self, root: Path) -> None:
        self.home = root / "home"
        self.user = self.home / ".config" / "tiality" / "tiality.toml"
        self.system = root / "etc" / "tiality.toml"
        self.user.parent.mkdir(parents=True)
        self.system.parent.mkdir(parents=True)
        self.system.write_text("")  # an empty file: no values, and /etc stays out of the tests

    def env(self, **variables: str) -> dict[str, str]:
        base = {
            k: v for k, v in os.environ.items() if not k.startswith("TIALITY_") and k != "XDG_CONFIG_HOME"
        }
        return {
            **base,
            "HOME": str(self.home),
            "TIALITY_CONFIG": str(self.system),
            "NO_COLOR": "1",
            "COLUMNS": "200",
            **variables,
        }

    def run(self, *args: str, **variables: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*TIALITY, *args], capture_output=True, text=True, timeout=60, env=self.env(**variables)
        )


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path)


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


def effective(layout: Layout, **variables: str) -> dict[str, Any]:
    proc = layout.run("config", "--json", **variables)
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def entry(doc: dict[str, Any], command: str, key: str) -> tuple[Any, str]:
    (row,) = [r for r in doc[command] if r["key"] == key]
    return row["value"], row["source"]


def test_config_shows_each_value_and_its_source_env_over_user_over_system_over_default(
    layout: Layout,
) -> None:
    layout.system.write_text(
        '[send]\nframe-ms = 40\nbitrate = 32\ncomplexity = 5\ntarget = "robot-gui:50052"\n'
        '[recv]\nport = 50060\nmax_latency = 120\n'
    )  # fmt: skip
    layout.user.write_text(
        "[send]\nframe_ms = 10\nbitrate = 48\nchannel-map = [2, 3]\n[recv]\nport = 50070\n"
    )
    doc = effective(layout, TIALITY_BITRATE="96", TIALITY_MAX_LATENCY="90")
    assert entry(doc, "send", "bitrate") == (96.0, "env")
    assert entry(doc, "send", "frame-ms") == (10.0, "user file")
    assert entry(doc, "send", "channel-map") == ("2,3", "user file")
    assert entry(doc, "send", "complexity") == (5, "system file")
    assert entry(doc, "send", "target") == ("robot-gui:50052", "system file")
    assert entry(doc, "send", "rate") == (48000, "default")
    assert entry(doc, "recv", "port") == (50070, "user file")
    assert entry(doc, "recv", "max-latency") == (90.0, "env")
    assert entry(doc, "recv", "latency") == ("auto", "default")
    (row,) = [r for r in doc["send"] if r["key"] == "frame-ms"]
    assert (
        row["file"] == str(layout.user) and row["env"] == "TIALITY_FRAME_MS" and row["option"] == "--frame-ms"
    )
    assert [(f["kind"], f["exists"]) for f in doc["files"]] == [("system file", True), ("user file", True)]
    table = layout.run("config", TIALITY_BITRATE="96")
    assert table.returncode == 0
    assert re.search(r"--bitrate\s+│\s+96\.0\s+│\s+env\s+│\s+TIALITY_BITRATE", table.stdout), table.stdout
    assert re.search(r"TARGET\s+│\s+robot-gui:50052\s+│\s+system file", table.stdout), table.stdout


def test_without_files_or_variables_every_value_is_the_default(layout: Layout) -> None:
    doc = effective(layout)
    assert {r["source"] for r in doc["send"] + doc["recv"]} == {"default"}
    assert [f["exists"] for f in doc["files"]] == [True, False]


def test_the_token_is_never_printed(layout: Layout) -> None:
    doc = effective(layout, TIALITY_TOKEN="s3cret-value")
    assert entry(doc, "send", "token") == ("(set)", "env")
    assert "s3cret-value" not in json.dumps(doc)


@pytest.mark.parametrize(
    ("cli", "env", "user", "expected"),
    [
        (True, True, True, "34"),  # the command line wins
        (False, True, True, "33"),  # then the environment
        (False, False, True, "32"),  # then the user file
        (False, False, False, "31"),  # then the system file
    ],
)
def test_send_takes_each_option_from_the_strongest_source(
    layout: Layout, cli: bool, env: bool, user: bool, expected: str
) -> None:
    # Every value is an invalid frame duration, so the error line tells which one send used.
    layout.system.write_text("[send]\nframe-ms = 31\n")
    if user:
        layout.user.write_text("[send]\nframe-ms = 32\n")
    variables = {"TIALITY_FRAME_MS": "33"} if env else {}
    args = ["send", "127.0.0.1:9", "-i", "tone://440", *(["--frame-ms", "34"] if cli else [])]
    proc = layout.run(*args, **variables)
    assert proc.returncode == 2
    assert one_line(proc) == f"tiality: --frame-ms {expected}: Opus frames are 2.5, 5, 10, 20, 40, 60 ms"


def test_recv_and_send_configured_only_by_files_and_variables_stream_to_each_other(layout: Layout) -> None:
    port = free_port()
    layout.system.write_text(f'[recv]\nport = {port}\nbind = "127.0.0.1"\noutput = "null://"\nonce = true\n')
    layout.user.write_text('[send]\ninput = "tone://440"\nseconds = 1\njson = true\n')
    rx = subprocess.Popen(
        [*TIALITY, "recv"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=layout.env()
    )
    try:
        assert rx.stderr is not None
        assert f"listening on port {port}, playing to null://" in rx.stderr.readline()
        tx = layout.run("send", TIALITY_TARGET=f"127.0.0.1:{port}")
        assert tx.returncode == 0, tx.stderr
        summary = json.loads(tx.stdout.splitlines()[-1])
        assert summary["event"] == "summary" and summary["source"] == "tone://440"
        assert summary["receiver_packets"] == summary["packets_sent"] == 50
        assert rx.wait(timeout=30) == 0  # once = true: the first stream's end ends it
    finally:
        if rx.poll() is None:
            rx.kill()
        rx.communicate()


def test_a_token_from_the_environment_or_a_file_is_not_warned_about(layout: Layout) -> None:
    layout.user.write_text('[send]\ntoken = "from-the-file"\n')
    for variables in ({}, {"TIALITY_TOKEN": "from-the-env"}):
        proc = layout.run("send", "127.0.0.1:9", "-i", "tone://440", "--once", **variables)
        assert proc.returncode == 4
        assert "warning" not in proc.stderr
    proc = layout.run("send", "127.0.0.1:9", "-i", "tone://440", "--once", "--token", "typed")
    assert "--token is visible to other users in the process list" in proc.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[send\nbitrate = 3\n",
            "{path}: not valid TOML: Expected ']' at the end of a table declaration (at line 1",
        ),
        ("[send]\nbitrat = 32\n", "{path}: [send] unknown key 'bitrat' (did you mean 'bitrate'?)"),
        ("[recv]\nframe-ms = 10\n", "{path}: [recv] unknown key 'frame-ms'"),
        ("[sned]\nrate = 1\n", "{path}: unknown section [sned] (did you mean [send]?)"),
        ("bitrate = 32\n", "{path}: bitrate = 32 is outside a section; put options under [send] or [recv]"),
        ('[send]\nrate = "fast"\n', "{path}: [send] rate = 'fast': "),
        ("[send]\nframe-ms = 10\nframe_ms = 20\n", "{path}: [send] sets 'frame_ms' twice"),
    ],
)
def test_a_bad_file_is_one_line_and_exit_2(layout: Layout, text: str, message: str) -> None:
    layout.user.write_text(text)
    commands = [["send", "127.0.0.1:9", "-i", "tone://440", "--once"], ["config"]]
    if "rate" not in text:  # a bad value is found by the commands that use it; the rest by all
        commands.append(
            ["recv", "--port", str(free_port()), "--bind", "127.0.0.1", "-o", "null://", "--once"]
        )
    for args in commands:
        proc = layout.run(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert one_line(proc).startswith("tiality: " + message.format(path=layout.user)), proc.stderr
    assert layout.run("send", "--help").returncode == 0  # help still works, to fix the file with


def test_a_missing_tiality_config_file_is_an_error(layout: Layout) -> None:
    layout.system.unlink()
    proc = layout.run("config")
    assert proc.returncode == 2
    assert one_line(proc) == f"tiality: TIALITY_CONFIG={layout.system}: no such file"


def test_help_names_the_variables_and_version_and_completion_work(layout: Layout) -> None:
    send_help = layout.run("send", "--help").stdout
    for variable in ("TIALITY_TARGET", "TIALITY_INPUT", "TIALITY_FRAME_MS", "TIALITY_TLS_SERVER_NAME"):
        assert f"env var: {variable}" in send_help
    assert "env var: TIALITY_OUTPUT" in layout.run("recv", "--help").stdout
    proc = layout.run("--version")
    assert (proc.returncode, proc.stdout) == (0, f"tiality {version('tiality')}\n")
    script = shutil.which("tiality", path=os.path.dirname(sys.executable))
    assert script is not None
    env = layout.env(COMP_WORDS="tiality send --frame", COMP_CWORD="2", _TIALITY_COMPLETE="complete_bash")
    done = subprocess.run([script], capture_output=True, text=True, env=env, timeout=30)
    assert done.stdout.split() == ["--frame-ms"]
    # typer detects the shell from the process tree (--show-completion takes no value): run it from a
    # bash that stays its parent (no exec), as a user would, not from whatever started pytest.
    shown = subprocess.run(
        ["bash", "-c", f'"{script}" --show-completion; exit $?'],
        capture_output=True,
        text=True,
        env=layout.env(),
    )
    assert "_TIALITY_COMPLETE=complete_bash" in shown.stdout


def test_config_with_a_command_line_shows_the_typed_options_as_cli(layout: Layout) -> None:
    layout.user.write_text("[send]\nframe-ms = 10\nbitrate = 48\n")
    proc = layout.run("config", "send", "gui:50052", "--frame-ms", "5", "--json", TIALITY_BITRATE="96")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc) == {"files", "send"}
    assert entry(doc, "send", "frame-ms") == (5.0, "cli")
    assert entry(doc, "send", "target") == ("gui:50052", "cli")
    assert entry(doc, "send", "bitrate") == (96.0, "env")
    proc = layout.run("config", "demo")
    assert proc.returncode == 2 and one_line(proc) == "tiality: 'demo': tiality config shows send or recv"


def test_a_token_from_the_environment_beats_a_token_file_from_a_config_file(layout: Layout) -> None:
    from tiality_cli.config import ServerSecurity
    from tiality_cli.io.files import NullSink
    from tiality_cli.receiver import Receiver, ReceiverConfig

    stale = layout.home / "stale-token"
    stale.write_text("old-token\n")
    layout.user.write_text(f'[send]\ntoken-file = "{stale}"\n')
    rx = Receiver(NullSink(), ReceiverConfig(port=0, bind="127.0.0.1", security=ServerSecurity(token="new")))
    port = rx.start()
    try:
        target = f"127.0.0.1:{port}"
        verdicts = {}
        for label, variables in (("file", {}), ("env", {"TIALITY_TOKEN": "new"})):
            proc = layout.run("doctor", target, "--no-input", "--no-output", "--json", **variables)
            checks = json.loads(proc.stdout)["checks"]
            (token,) = [c for c in checks if c["name"] == "token"]
            verdicts[label] = (proc.returncode, token["status"], token["detail"])
            if label == "env":
                # Everything else passes, except that the clock check (not this test's subject) warns,
                # with exit code 1, when the loopback round trip varies beyond its limit.
                status = {c["name"]: c["status"] for c in checks}
                clock = status.pop("clock")
                assert set(status.values()) <= {"pass", "skip"}, checks
                assert (clock, proc.returncode) in (("pass", 0), ("warn", 1)), checks
        # --token-file typed on the command line beats TIALITY_TOKEN
        typed = layout.run(
            "doctor", target, "--no-input", "--no-output", "--token-file", str(stale), TIALITY_TOKEN="new"
        )
    finally:
        rx.stop()
    assert verdicts["file"] == (2, "fail", f"{target} refused: wrong token")
    assert verdicts["env"][1:] == ("pass", "accepted")
    assert typed.returncode == 2
