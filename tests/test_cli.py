"""The `tiality` command as a user runs it: real processes, real sockets, exit codes and stderr text."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tiality_cli.io.files import NullSink
from tiality_cli.receiver import Receiver, ReceiverConfig
from tiality_cli.settings import SYSTEM_FILE
from tiality_cli.wavfile import read_wav

TIALITY = [sys.executable, "-m", "tiality_cli"]
ENV = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TIALITY, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The whole of stderr, which must be exactly one line (and never a traceback)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def receiver_cli() -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`tiality recv --port 0 --json -o null://` in the background; yields it and its bound port."""
    proc = subprocess.Popen(
        [*TIALITY, "recv", "--port", "0", "--bind", "127.0.0.1", "-o", "null://", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    m = re.search(r"listening on port (\d+)", line)
    assert m, line
    yield proc, int(m.group(1))
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_help_lists_every_command_and_loads_no_heavy_module() -> None:
    code = (
        "import sys\n"
        "from tiality_cli.cli.app import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = ('grpc', 'numpy', 'sounddevice', 'alsaaudio', 'opuslib', 'samplerate')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True
    ).stdout
    assert "HEAVY []" in out
    for command in ("send", "recv", "demo"):
        assert command in out


@pytest.mark.parametrize("command", ["send", "recv", "demo"])
def test_every_command_has_help_with_examples(command: str) -> None:
    proc = run(command, "--help")
    assert proc.returncode == 0
    assert "Examples" in proc.stdout and f"tiality {command}" in proc.stdout


def test_unreachable_receiver_is_one_line_and_exit_4() -> None:
    proc = run("send", f"127.0.0.1:{free_port()}", "-i", "tone://440", "--seconds", "1", "--once")
    assert proc.returncode == 4
    assert re.fullmatch(r"tiality: cannot reach 127\.0\.0\.1:\d+: connection refused.*", one_error_line(proc))


def test_unknown_host_is_one_line_and_exit_4() -> None:
    proc = run("send", "no-such-host.invalid:50052", "-i", "tone://440", "--seconds", "1", "--once")
    assert proc.returncode == 4
    assert "cannot reach no-such-host.invalid:50052: host name not found" in one_error_line(proc)


def test_busy_port_is_one_line_and_exit_5() -> None:
    first = Receiver(NullSink(), ReceiverConfig(port=0, bind="127.0.0.1"))
    port = first.start()
    try:
        proc = run("recv", "--port", str(port), "--bind", "127.0.0.1", "-o", "null://")
    finally:
        first.stop()
    assert proc.returncode == 5
    assert f"port {port} is already in use" in one_error_line(proc)


def test_an_unknown_resampler_is_one_line_and_exit_2() -> None:
    proc = run("recv", "--port", str(free_port()), "--bind", "127.0.0.1", "-o", "null://", "--resampler=zoh")
    assert proc.returncode == 2
    known = "sinc_fastest, linear, sinc_medium, sinc_best"
    assert one_error_line(proc) == f"tiality: --resampler zoh: one of {known}"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["-i", "file:/nonexistent/speech.wav"], 3, "file:/nonexistent/speech.wav: no such file"),
        (["-i", "foo://bar"], 2, "'foo://bar': unknown scheme; use one of tone://FREQ, file:PATH.wav"),
        (
            ["-i", "tone://440", "--frame-ms", "30"],
            2,
            "--frame-ms 30: Opus frames are 2.5, 5, 10, 20, 40, 60 ms",
        ),
        (["-i", "tone://440", "--bitrate", "1"], 2, "--bitrate 1: Opus takes 6 to 510 kbit/s"),
        (["-i", "tone://440", "--rate", "44100"], 2, "--rate 44100: Opus encodes only at"),
        (["-i", "null://"], 2, "null:// is an output, not an input"),
    ],
)
def test_bad_send_options_fail_before_connecting(args: list[str], code: int, message: str) -> None:
    # Nothing listens on this port: each error must come from checking the input, not the network.
    proc = run("send", f"127.0.0.1:{free_port()}", *args)
    assert proc.returncode == code
    assert message in one_error_line(proc)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("null", "'null': unknown scheme; use one of alsa://DEVICE, sd://DEVICE, file:PATH.wav, null://"),
        ("tone://440", "'tone://440': tone:// is an input, not an output"),
    ],
)
def test_a_bad_output_names_the_outputs_there_are(output: str, message: str) -> None:
    """recv's list of schemes is the outputs': not tone:// (an input), and with null://."""
    proc = run("recv", "--port", str(free_port()), "--bind", "127.0.0.1", "-o", output)
    assert proc.returncode == 2
    assert one_error_line(proc) == f"tiality: {message}"


def test_a_file_that_is_not_wav_is_refused(tmp_path: Path) -> None:
    notes = tmp_path / "notes.wav"
    notes.write_text("not audio at all")
    proc = run("send", f"127.0.0.1:{free_port()}", "-i", f"file:{notes}")
    assert proc.returncode == 3
    assert one_error_line(proc) == f"tiality: file:{notes}: not a WAV file (no RIFF/WAVE header)"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("host:notaport", "address 'host:notaport': port 'notaport': not a number"),
        ("host:99999", "port 99999: out of range"),
        ("[::1:50052", "unclosed '['"),
        ("", "empty"),
        ("bad host:1", "bad host name"),
    ],
)
def test_malformed_host_port_is_refused(target: str, message: str) -> None:
    proc = run("send", target, "-i", "tone://440")
    assert proc.returncode == 2
    assert message in one_error_line(proc)


def test_a_summary_written_to_a_pipe_is_not_cut_at_80_columns(
    receiver_cli: tuple[subprocess.Popen[str], int],
) -> None:
    """Rich gives a pipe 80 columns and cut the summary's rows with an ellipsis ("dropped (backlog …");
    without COLUMNS a pipe now gets whole rows."""
    _, port = receiver_cli
    env = {k: v for k, v in ENV.items() if k != "COLUMNS"}
    sent = subprocess.run(
        [*TIALITY, "send", f"127.0.0.1:{port}", "-i", "tone://440", "--seconds", "0.4"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert sent.returncode == 0, sent.stderr
    rows = {ln.strip().split("  ")[0]: ln.strip() for ln in sent.stdout.splitlines() if ln.strip()}
    assert "…" not in sent.stdout, sent.stdout
    assert re.fullmatch(r"dropped \(backlog full\) +0 \(0\.0%\)", rows["dropped (backlog full)"]), sent.stdout
    assert re.fullmatch(r"receiver: concealed +0 \(0\.0% of 20 played\)", rows["receiver: concealed"]), rows


def test_a_quiet_sender_says_on_stderr_that_it_cannot_reach_its_receiver_and_when_it_can() -> None:
    """``send -q`` printed nothing while it retried (a robot's journal showed no reason for the silence):
    one stderr line when the outage starts, one when it streams again; the audio after that is whole."""
    port = free_port()
    proc = subprocess.Popen(
        [*TIALITY, "send", f"127.0.0.1:{port}", "-i", "tone://440", "-q", "--seconds", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    rx = Receiver(NullSink(), ReceiverConfig(port=port, bind="127.0.0.1"))
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # the first failed attempt: no receiver yet
        rx.start()
        second = proc.stderr.readline()
        out, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        rx.stop()
    assert first == (
        f"tiality send: warning: cannot reach 127.0.0.1:{port}: connection refused (is `tiality recv` "
        "running there?); retrying until it answers\n"
    )
    assert re.fullmatch(
        rf"tiality send: streaming to 127\.0\.0\.1:{port} again \(after \d+ failed attempt\(s\)\)\n", second
    )
    assert proc.returncode == 0 and rest == "", rest
    assert re.search(r"packets_sent=50 .*receiver_packets=50 receiver_lost=0 ", out), out


def test_recv_json_lines_and_summary(receiver_cli: tuple[subprocess.Popen[str], int]) -> None:
    recv, port = receiver_cli
    sent = run("send", f"127.0.0.1:{port}", "-i", "tone://440", "--seconds", "2", "--json")
    assert sent.returncode == 0, sent.stderr
    send_summary = json.loads(sent.stdout.splitlines()[-1])
    assert send_summary["event"] == "summary" and send_summary["packets_sent"] == 100
    assert send_summary["receiver_packets"] == 100 and send_summary["receiver_lost"] == 0
    recv.send_signal(signal.SIGINT)
    out, _ = recv.communicate(timeout=20)
    assert recv.returncode == 0
    lines = [json.loads(ln) for ln in out.splitlines()]
    assert lines[-1]["event"] == "summary"
    assert all(ln["event"] == "stats" for ln in lines[:-1]) and len(lines) >= 2
    keys = {
        "packets",
        "bytes",
        "lost",
        "late",
        "concealed",
        "duplicates",
        "jitter_ms",
        "latency_ms_p50",
        "latency_ms_p95",
        "bitrate_kbps",
        "buffer_ms",
    }
    assert all(keys <= ln.keys() for ln in lines)
    summary = lines[-1]
    assert summary["packets"] == 100 and summary["lost"] == 0, summary
    # Every frame is played once (the adaptive buffer's steps are 2.5 ms slices, not frames).
    assert summary["frames_played"] == 100, summary
    assert 0 < summary["latency_ms_p50"] < 200


def test_receiver_serves_one_stream_after_another(tmp_path: Path) -> None:
    out = tmp_path / "two.wav"
    recv = subprocess.Popen(
        [*TIALITY, "recv", "--port", "0", "--bind", "127.0.0.1", "-o", f"file:{out}", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert recv.stderr is not None
        port = int(re.findall(r"port (\d+)", recv.stderr.readline())[0])
        for seconds in ("1", "1.5"):
            sent = run("send", f"127.0.0.1:{port}", "-i", "tone://300", "--seconds", seconds, "--json")
            assert sent.returncode == 0, sent.stderr
            summary = json.loads(sent.stdout.splitlines()[-1])
            assert summary["packets_sent"] == summary["receiver_packets"] == round(float(seconds) * 50)
            assert summary["receiver_lost"] == 0
        recv.send_signal(signal.SIGTERM)
        stdout, _ = recv.communicate(timeout=20)
    finally:
        recv.kill()
    assert recv.returncode == 0
    final = json.loads(stdout.splitlines()[-1])
    assert final["packets"] == 125 and final["streams"] == 0
    assert final["frames_played"] == 125
    _, info = read_wav(out)
    # Both streams back to back, nothing in between; each stream's last 5 ms block is written whole.
    assert abs(info.frames - final["frames_played"] * 960) <= 2 * 240


def test_recv_seconds_writes_exactly_that_much(tmp_path: Path) -> None:
    out = tmp_path / "heard.wav"
    recv = subprocess.Popen(
        [*TIALITY, "recv", "--port", "0", "--bind", "127.0.0.1", "-o", f"file:{out}", "--seconds", "1", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert recv.stderr is not None
    port = int(re.findall(r"port (\d+)", recv.stderr.readline())[0])
    sent = run("send", f"127.0.0.1:{port}", "-i", "tone://440", "--seconds", "3", "-q")
    recv.wait(timeout=20)
    assert recv.returncode == 0
    assert read_wav(out)[1].frames == 48_000
    assert sent.returncode in (0, 4)  # the receiver may leave while the sender is still streaming


def test_send_quiet_imports_neither_pydantic_nor_rich_nor_the_receiver(
    receiver_cli: tuple[subprocess.Popen[str], int],
) -> None:
    """Start-up on a Pi: ``send -q`` converts its options without Typer's pydantic adapter and draws
    nothing with Rich (docs/performance.md, start-up)."""
    _, port = receiver_cli
    code = (
        "import sys\n"
        "from tiality_cli.cli.app import app\n"
        "try:\n"
        f"    app(['send', '127.0.0.1:{port}', '-i', 'tone://440', '--seconds', '0.1', '--frame-ms', '10',\n"
        "         '--rate', '48000', '--once', '-q'])\n"
        "except SystemExit as exc:\n"
        "    print('EXIT', exc.code)\n"
        "mods = ('pydantic', 'rich', 'typer._adapters', 'tiality_cli.receiver', 'tiality_cli.playout')\n"
        "print('LOADED', [m for m in mods if m in sys.modules])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert "EXIT 0" in proc.stdout, proc.stderr
    assert "LOADED []" in proc.stdout
    assert "packets_sent=10 " in proc.stdout  # 0.1 s of 10 ms frames


ALL_COMMANDS = "config,demo,devices,doctor,loopback,recv,send"
UNREACHABLE = ["send", "127.0.0.1:9", "-i", "tone://440", "--once"]


@pytest.mark.parametrize(
    ("args", "config", "built", "code", "said"),
    [
        (["send", "--help"], None, "send", 0, "Usage: tiality send [OPTIONS]"),
        (UNREACHABLE, None, "send", 4, "tiality: cannot reach 127.0.0.1:9: connection refused"),
        (["-h"], None, ALL_COMMANDS, 0, "doctor Check the whole audio path"),
        (["-h", "send"], None, ALL_COMMANDS, 0, "doctor Check the whole audio path"),
        (["sned", "x"], None, ALL_COMMANDS, 2, "No such command 'sned'. Did you mean 'send'?"),
        # A config file is checked against the options of both commands that read one, each built once.
        (UNREACHABLE, "[send]\nbitrate = 32\n[recv]\nport = 50070\n", "recv,send", 4, "connection refused"),
        (["config", "recv"], "[recv]\nport = 50070\n", "config,recv,send", 0, "--port 50070 system file"),
        (UNREACHABLE, "[recv]\nportt = 1\n", "recv,send", 2, "[recv] unknown key 'portt' (did you mean"),
    ],
)  # fmt: skip
def test_the_console_entry_builds_only_the_command_it_runs(
    tmp_path: Path, args: list[str], config: str | None, built: str, code: int, said: str
) -> None:
    """Typer builds every registered command before it parses (each from its signature and type hints,
    about 23 ms of the sender's start-up CPU for the other six): main() registers only the one named
    first on the command line, and all of them for anything else, so lists and suggestions are whole;
    send and recv, which read config files, are built once more only when a file exists. Counted in a
    real process through Typer's own builder (a name built twice would show twice)."""
    if config is None and SYSTEM_FILE.is_file():
        # A deployed machine's /etc/tiality/tiality.toml is read by every run: send and recv are then
        # built for its check, as with any file.
        built = ",".join(sorted({*built.split(","), "recv", "send"}))
    env = {k: v for k, v in ENV.items() if not k.startswith("TIALITY_") and k != "XDG_CONFIG_HOME"}
    env["HOME"] = str(tmp_path)
    if config is not None:
        (tmp_path / "tiality.toml").write_text(config)
        env["TIALITY_CONFIG"] = str(tmp_path / "tiality.toml")
    script = (
        "import sys, typer.main\n"
        "sys.argv[0] = 'tiality'\n"
        "built = []\n"
        "build = typer.main.get_command_from_info\n"
        "def counting(command_info, **kw):\n"
        "    command = build(command_info, **kw)\n"
        "    built.append(command.name)\n"
        "    return command\n"
        "typer.main.get_command_from_info = counting\n"
        "from tiality_cli.cli.app import app, main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    print('EXIT', exc.code)\n"
        "print('BUILT', ','.join(sorted(built)), 'KEPT', len(app.registered_commands))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=60
    )
    assert f"EXIT {code}" in proc.stdout, proc.stderr
    assert f"BUILT {built} KEPT 7" in proc.stdout
    text = " ".join((proc.stdout + proc.stderr).replace("│", " ").split())
    assert said in text, text


def test_the_entry_point_keeps_numpy_to_one_blas_thread() -> None:
    """numpy's OpenBLAS starts a thread per extra core at import, each spinning for work tiality never
    gives it (0.1 s of the sender's start-up CPU here); the entry point asks for one, and an explicit
    setting wins. Threads are counted in /proc right after numpy's import, against numpy's default."""
    blas = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")  # OpenBLAS reads these in turn
    env = {k: v for k, v in os.environ.items() if k not in blas}
    count = "import numpy, os; print(len(os.listdir('/proc/self/task')), os.getenv('OPENBLAS_NUM_THREADS'))"

    def threads(code: str, **extra: str) -> tuple[int, str]:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env | extra, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        n, setting = proc.stdout.split()
        return int(n), setting

    entry = "from tiality_cli.__main__ import prepare_process; prepare_process(); " + count
    default, _ = threads(count)
    assert threads(entry) == (1, "1")
    assert threads(entry, OPENBLAS_NUM_THREADS="2") == (min(2, default), "2")  # the user's choice stands
    # numpy's default here (this machine's cores), so the figure above shows the saving.
    cpus = len(os.sched_getaffinity(0))
    assert default == min(cpus, 64), f"numpy's default started {default} threads on {cpus} CPUs"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--frame-ms", "10", "--rate", "16000", "--bitrate", "32.5"], (10.0, 16000, 32.5)),
        (["--frame-ms", "1e1", "--rate", "016000", "--bitrate", "-0"], (10.0, 16000, -0.0)),  # "1e1": Typer's
        ([], (20.0, 48000, 64.0)),  # the defaults
    ],
)
def test_send_options_convert_as_typer_converts_them(args: list[str], expected: tuple[Any, ...]) -> None:
    import typer.main

    from tiality_cli.cli.app import app

    send = typer.main.get_command(app).commands["send"]  # type: ignore[attr-defined]
    ctx = send.make_context("send", ["host:1", *args])
    got = (ctx.params["frame_ms"], ctx.params["rate"], ctx.params["bitrate"])
    assert got == expected and [type(v) for v in got] == [float, int, float]
    assert ctx.params["target"] == "host:1" and ctx.params["quiet"] is False


def test_long_work_turns_the_collector_back_on_after_the_gc_free_start_up() -> None:
    """main() starts without the collector (faster imports); every long-running command's
    stop_on_signals() turns it back on, with start-up's objects frozen out of later collections."""
    import gc

    from tiality_cli.cli.common import stop_on_signals

    gc.unfreeze()  # conftest froze what earlier tests made: this test's count must be long_work's own
    gc.disable()
    try:
        with stop_on_signals():
            assert gc.isenabled()
            assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
        gc.enable()
