"""`tiality doctor` against real receivers, real ports and the virtual sound card.

A healthy receiver (in this process, with a token), the wrong token, a closed port, a TLS receiver with the
right and a wrong CA, and a microphone that is silent on every channel or on one: exit codes, the table's
lines and the JSON document.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers.soundcard import VirtualSoundCard
from tests.test_security import pki  # noqa: F401  (the CA and certificates, made with openssl)
from tiality_cli.config import ServerSecurity
from tiality_cli.io.files import NullSink
from tiality_cli.receiver import Receiver, ReceiverConfig

TIALITY = [sys.executable, "-m", "tiality_cli"]
TOKEN = "mission-token"
NETWORK = ["host name", "port", "receiver", "TLS", "token", "clock"]
STAGES = ["capture device", "frame", "Opus look-ahead", "network", "jitter buffer", "output device"]


ISOLATED: dict[str, str] = {}  # HOME and TIALITY_CONFIG: no config file of this machine takes part


@pytest.fixture(autouse=True, scope="module")
def _no_config_files(tmp_path_factory: pytest.TempPathFactory) -> None:
    d = tmp_path_factory.mktemp("doctor-config")
    (d / "system.toml").write_text("")
    ISOLATED.update(HOME=str(d), TIALITY_CONFIG=str(d / "system.toml"))


def environ(extra: dict[str, str] | None = None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TIALITY_") and k != "XDG_CONFIG_HOME"}
    return {**base, "COLUMNS": "220", "NO_COLOR": "1", **ISOLATED, **(extra or {})}


def doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TIALITY, "doctor", *args], capture_output=True, text=True, timeout=90, env=environ(env)
    )


def report(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    proc = doctor(*args, "--json", env=env)
    assert "Traceback" not in proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    assert doc["exit_code"] == proc.returncode
    return proc.returncode, doc


def checks(doc: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["name"]: c for c in doc["checks"]}


def stage(doc: dict[str, Any], name: str) -> dict[str, Any]:
    (s,) = [s for s in doc["latency"]["stages"] if s["name"] == name]
    found: dict[str, Any] = s
    return found


def row(table: str, name: str) -> str:
    """The table line of check ``name`` (its first line, when the cells wrap)."""
    (line,) = [ln for ln in table.splitlines() if re.match(rf"│ [✓!✗-] \w+\s+│ {re.escape(name)}\s+│", ln)]
    return line


@pytest.fixture
def receiver() -> Iterator[int]:
    """A healthy receiver with a token, in this process; yields its port."""
    rx = Receiver(NullSink(), ReceiverConfig(port=0, bind="127.0.0.1", security=ServerSecurity(token=TOKEN)))
    port = rx.start()
    try:
        yield port
    finally:
        rx.stop()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed as the socket closes: nothing listens there


def test_a_healthy_receiver_passes_every_check_and_the_delay_adds_up(receiver: int, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    target = f"127.0.0.1:{receiver}"
    args = [target, "-i", "tone://440", "-o", "null://", "--token-file", str(token_file)]
    code, doc = report(*args)
    assert code == 0, doc
    assert [c["name"] for c in doc["checks"]] == ["input device", "input level", "output device", *NETWORK]
    assert {c["status"] for c in doc["checks"]} == {"pass"}
    assert all(c["fix"] == "" for c in doc["checks"])
    by = checks(doc)
    assert by["receiver"]["detail"] == f"{target}: gRPC health SERVING"
    assert by["token"]["detail"] == "accepted"
    assert re.match(
        r"over 2\.0 s: ch 0: peak -12\.0 / RMS -15\.0 dBFS; ch 1: peak -12\.0", by["input level"]["detail"]
    )
    offset, rtt = re.match(
        r"offset ([-+]\d+\.\d) ms .* round trip (\d+\.\d+) ms best", by["clock"]["detail"]
    ).groups()  # type: ignore[union-attr]
    assert abs(float(offset)) < 5 and 0 < float(rtt) < 50  # the same machine's clock, over loopback
    assert [s["name"] for s in doc["latency"]["stages"]] == STAGES
    assert (
        stage(doc, "frame")["ms"] == 20.0 and stage(doc, "Opus look-ahead")["ms"] == 6.5
    )  # voip, as send's default
    assert stage(doc, "jitter buffer")["ms"] == 13.0  # auto: 10 ms start + 3 ms margin
    assert stage(doc, "network")["basis"] == "measured" and 0 < stage(doc, "network")["ms"] < 25
    assert doc["latency"]["not_measured"] == []
    total = sum(s["ms"] for s in doc["latency"]["stages"])
    assert doc["latency"]["total_ms"] == pytest.approx(total, abs=0.02)

    table = doctor(*args, "--frame-ms", "10").stdout
    assert table.startswith("tiality doctor")
    assert re.search(r"│ ✓ pass │ token\s+│ accepted\s+│", row(table, "token"))
    assert re.search(
        rf"│ ✓ pass │ receiver\s+│ {re.escape(target)}: gRPC health SERVING", row(table, "receiver")
    )
    assert re.search(r"│ frame\s+│\s+10\.0 │ configured │ --frame-ms 10", table)
    assert re.search(
        r"^tiality doctor: ready: 9 passed, 0 warning\(s\), 0 failure\(s\); expected delay \d+ ms$",
        table,
        re.M,
    )


def test_a_wrong_token_fails_with_its_fix(receiver: int) -> None:
    target = f"127.0.0.1:{receiver}"
    code, doc = report(
        target, "-i", "tone://440", "-o", "null://", "--listen", "0.5", env={"TIALITY_TOKEN": "guess"}
    )
    assert code == 2
    by = checks(doc)
    assert [by[n]["status"] for n in NETWORK] == ["pass", "pass", "pass", "pass", "fail", "skip"]
    assert by["token"]["detail"] == f"{target} refused: wrong token"
    assert "TIALITY_TOKEN" in by["token"]["fix"] and "--token-file" in by["token"]["fix"]
    assert by["clock"]["detail"] == "not run: the token was refused"
    network = stage(doc, "network")
    assert network["basis"] == "measured" and "TCP handshake" in network["detail"]
    code, doc = report(target, "--no-input", "--no-output")
    assert (
        code == 2
        and checks(doc)["token"]["detail"]
        == f"{target} refused: a token is required (--token / TIALITY_TOKEN) (no token was given)"
    )
    table = doctor(target, "--no-input", "--no-output", env={"TIALITY_TOKEN": "guess"})
    assert table.returncode == 2
    assert re.search(
        rf"│ ✗ fail │ token\s+│ {re.escape(target)} refused: wrong token\s+│ use the receiver's token",
        row(table.stdout, "token"),
    )
    assert re.search(r"│ - skip │ clock\s+│ not run: the token was refused", row(table.stdout, "clock"))


def test_a_closed_port_fails_and_names_the_command_to_start(tmp_path: Path) -> None:
    port = closed_port()
    code, doc = report(f"127.0.0.1:{port}", "--no-input", "--no-output")
    assert code == 2
    by = checks(doc)
    assert by["host name"]["status"] == "pass"
    assert by["port"] == {
        "name": "port",
        "status": "fail",
        "detail": f"127.0.0.1:{port}: connection refused (nothing listens there)",
        "fix": f"start `tiality recv --port {port}` on 127.0.0.1, or give the port it listens on; "
        f"check the firewall there (e.g. `sudo ufw allow {port}/tcp`)",
    }
    assert [by[n]["status"] for n in NETWORK[2:]] == ["skip"] * 4
    assert stage(doc, "network")["ms"] is None and doc["latency"]["not_measured"] == [
        "capture device",
        "network",
        "output device",
    ]
    # the target can come from the environment, as send's does
    code, doc = report("--no-input", "--no-output", env={"TIALITY_TARGET": f"127.0.0.1:{port}"})
    assert code == 2 and checks(doc)["port"]["status"] == "fail"


def test_an_unknown_host_fails_at_the_name() -> None:
    code, doc = report("nosuchhost.invalid:50052", "--no-input", "--no-output")
    assert code == 2
    assert checks(doc)["host name"]["detail"] == "nosuchhost.invalid: host name not found"


def test_tls_verifies_with_the_right_ca_and_fails_with_another(pki: dict[str, Path]) -> None:  # noqa: F811
    tls_args = ["--tls-cert", str(pki["server.pem"]), "--tls-key", str(pki["server.key"])]
    rx = subprocess.Popen(
        [*TIALITY, "recv", "--port", "0", "--bind", "127.0.0.1", "-o", "null://", *tls_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=environ(),
    )
    try:
        assert rx.stderr is not None
        port = int(re.findall(r"listening on port (\d+)", rx.stderr.readline())[0])
        target = f"127.0.0.1:{port}"
        code, good = report(target, "--no-input", "--no-output", "--tls-ca", str(pki["ca.pem"]))
        _, other = report(target, "--no-input", "--no-output", "--tls-ca", str(pki["other.pem"]))
        _, plain = report(target, "--no-input", "--no-output", "--timeout", "2")
    finally:
        rx.terminate()
        rx.communicate(timeout=20)
    assert code == 0, good
    assert checks(good)["TLS"]["detail"] == "certificate of 127.0.0.1 verified by the given CA"
    tls = checks(other)["TLS"]
    assert tls["status"] == "fail" and "TLS handshake failed" in tls["detail"] and "--tls-ca" in tls["fix"]
    assert checks(other)["receiver"]["status"] == "skip"
    receiver = checks(plain)["receiver"]
    assert receiver["status"] == "fail" and "add --tls-ca" in receiver["fix"]


def mic_env(card: VirtualSoundCard) -> dict[str, str]:
    return {k: v for k, v in card.process_env().items() if k in card.env}


@pytest.mark.soundcard
def test_a_silent_microphone_fails_and_the_speaker_reports_its_delay(sound_card: VirtualSoundCard) -> None:
    code, doc = report("-i", "alsa://tmic", "-o", "alsa://tspk", env=mic_env(sound_card))
    assert code == 2
    by = checks(doc)
    assert by["input device"]["status"] == "pass"
    assert by["input level"]["status"] == "fail"
    assert by["input level"]["detail"] == "over 2.0 s: silent: no sound on channels 0, 1 (peak -120.0 dBFS)"
    assert "--capture-channels" in by["input level"]["fix"] and "--channel-map" in by["input level"]["fix"]
    assert by["output device"]["status"] == "pass"
    out = stage(doc, "output device")
    assert out["basis"] == "measured" and 5.0 <= out["ms"] <= 25.0  # 4 periods of 5 ms, less what played
    assert stage(doc, "capture device")["ms"] == 0.0  # ALSA: one 20 ms period is one frame


@pytest.mark.soundcard
def test_a_silent_channel_is_named_with_the_channel_map_that_fixes_it(sound_card: VirtualSoundCard) -> None:
    t = np.arange(12 * 48_000) / 48_000
    left = np.round(8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    player = sound_card.play_into_mic(np.stack([left, np.zeros_like(left)], axis=1))
    try:
        code, doc = report("-i", "alsa://tmic", "--no-output", env=mic_env(sound_card))
        mapped_code, mapped = report(
            "-i", "alsa://tmic", "--no-output", "--channel-map", "1,1", env=mic_env(sound_card)
        )
        table = doctor("-i", "alsa://tmic", "--no-output", "--listen", "1", env=mic_env(sound_card)).stdout
    finally:
        player.kill()
        player.wait()
    level = checks(doc)["input level"]
    assert code == 1 and level["status"] == "warn"
    assert level["detail"].startswith(
        "over 2.0 s: channel 1 silent: part of the stream is mute (ch 0: peak -12.2"
    )
    assert level["fix"] == "use --channel-map 0,0"
    level = checks(mapped)["input level"]
    assert mapped_code == 2 and level["status"] == "fail"
    assert level["detail"].startswith("over 2.0 s: silent: channel 1 (the encoded ones); sound on channel 0.")
    assert level["fix"] == "use --channel-map 0,0"
    assert re.search(
        r"│ ! warn │ input level\s+│ over 1\.0 s: channel 1 silent: .*│ use --channel-map 0,0\s+│",
        row(table, "input level"),
    )


def test_help_documents_the_exit_codes_and_bad_options_are_one_line() -> None:
    text = doctor("--help").stdout
    assert "Exit status: 0 every check passed, 1 a warning, 2 a failure" in text
    assert "tiality doctor gui-host:50052" in text and "env var: TIALITY_TARGET" in text
    proc = doctor("--no-input", "--no-output", "--frame-ms", "30")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "tiality: --frame-ms 30: Opus frames are 2.5, 5, 10, 20, 40, 60 ms"
    proc = doctor("-i", "tone://440", "--no-output", "--channel-map", "0,5", "--capture-channels", "2")
    assert proc.returncode == 2 and proc.stderr.startswith(
        "tiality: --channel-map 0,5: channel 5 does not exist"
    )
    code, doc = report("--no-input", "--no-output")
    assert (code, doc["checks"]) == (0, [])
    assert doc["latency"]["not_measured"] == ["capture device", "network", "output device"]
