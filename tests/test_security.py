"""Tokens, TLS, mutual TLS, sender limits and reconnection, with real processes and real sockets."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers.waiting import wait_until
from tiality_cli.config import AudioFormat, Endpoint
from tiality_cli.errors import RejectedError
from tiality_cli.io.files import NullSink
from tiality_cli.io.sources import open_source
from tiality_cli.receiver import Receiver, ReceiverConfig
from tiality_cli.sender import Sender, SenderConfig

TIALITY = [sys.executable, "-m", "tiality_cli"]
ENV = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
SECRET = "s3cret-robot-token"


def start_recv(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [*TIALITY, "recv", "--port", "0", "--bind", "127.0.0.1", "-o", "null://", "--json", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or ENV,
    )
    assert proc.stderr is not None
    for _ in range(5):  # warnings may come first
        line = proc.stderr.readline()
        m = re.search(r"listening on port (\d+)", line)
        if m:
            return proc, int(m.group(1))
    proc.kill()
    raise AssertionError("the receiver never said which port it listens on")


def send(port: int, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TIALITY, "send", f"127.0.0.1:{port}", "-i", "tone://440", "--seconds", "0.5", "--json", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env or ENV,
    )


def stderr_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    return lines[0]


def test_token_is_required_compared_and_never_printed() -> None:
    recv, port = start_recv(env={**ENV, "TIALITY_TOKEN": SECRET})
    try:
        missing = send(port)
        wrong = send(port, env={**ENV, "TIALITY_TOKEN": "guess"})
        right = send(port, env={**ENV, "TIALITY_TOKEN": SECRET})
    finally:
        recv.terminate()
        out, err = recv.communicate(timeout=20)
    # A refused token is final: one line, exit 6, and no retrying (the call returns at once).
    assert missing.returncode == 6 and "a token is required" in stderr_line(missing)
    assert wrong.returncode == 6 and "wrong token" in stderr_line(wrong)
    assert right.returncode == 0, right.stderr
    assert '"receiver_packets":25' in right.stdout.splitlines()[-1]
    for text in (out, err, missing.stderr, wrong.stderr, right.stdout, right.stderr):
        assert SECRET not in text


def test_token_from_a_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "token"
    secret_file.write_text(SECRET + "\n")
    recv, port = start_recv("--token-file", str(secret_file))
    try:
        ok = send(port, "--token-file", str(secret_file))
        bad = send(port, "--token", "nope")
    finally:
        recv.terminate()
        recv.communicate(timeout=20)
    assert ok.returncode == 0, ok.stderr
    assert bad.returncode == 6
    assert "--token is visible to other users" in bad.stderr  # the command-line token is warned about


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a receiver certificate for 127.0.0.1/localhost, and a client certificate (openssl)."""
    d = tmp_path_factory.mktemp("pki")

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=tiality test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        ssl(
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
        )
        ssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            f"{name}.pem",
            "-extfile",
            _ext(d, name, ext),
        )
    ssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=some other CA",
        "-keyout",
        "other.key",
        "-out",
        "other.pem",
    )
    return {p.stem + p.suffix: p for p in d.iterdir()}


def _ext(d: Path, name: str, ext: str) -> str:
    path = d / f"{name}.ext"
    path.write_text(ext + "\n")
    return str(path)


def test_tls_stream_and_refusals(pki: dict[str, Path]) -> None:
    recv, port = start_recv("--tls-cert", str(pki["server.pem"]), "--tls-key", str(pki["server.key"]))
    try:
        ok = send(port, "--tls-ca", str(pki["ca.pem"]))
        plain = send(port, "--once")
        wrong_ca = send(port, "--tls-ca", str(pki["other.pem"]), "--once")
    finally:
        recv.terminate()
        recv.communicate(timeout=20)
    assert ok.returncode == 0, ok.stderr
    assert '"receiver_packets":25' in ok.stdout.splitlines()[-1]
    assert plain.returncode == 4 and "cannot reach" in stderr_line(plain)
    assert wrong_ca.returncode == 4 and "cannot reach" in stderr_line(wrong_ca)


def test_mutual_tls_requires_a_client_certificate(pki: dict[str, Path]) -> None:
    recv, port = start_recv(
        "--tls-cert",
        str(pki["server.pem"]),
        "--tls-key",
        str(pki["server.key"]),
        "--tls-client-ca",
        str(pki["ca.pem"]),
    )
    try:
        anonymous = send(port, "--tls-ca", str(pki["ca.pem"]), "--once")
        known = send(
            port,
            "--tls-ca",
            str(pki["ca.pem"]),
            "--tls-cert",
            str(pki["client.pem"]),
            "--tls-key",
            str(pki["client.key"]),
        )
    finally:
        recv.terminate()
        recv.communicate(timeout=20)
    assert anonymous.returncode == 4, anonymous.stderr
    assert known.returncode == 0, known.stderr


def test_an_open_port_without_protection_is_warned_about_in_one_line() -> None:
    """One line whatever the width (no COLUMNS: Rich wrapped it at 80, mid-sentence, for a log)."""
    proc = subprocess.Popen(
        [*TIALITY, "recv", "--port", "0", "--bind", "0.0.0.0", "-o", "null://", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in ENV.items() if k != "COLUMNS"},
    )
    assert proc.stderr is not None
    first = proc.stderr.readline()
    proc.terminate()
    proc.communicate(timeout=20)
    assert first == (
        "tiality: warning: listening on 0.0.0.0 with neither --token nor TLS: anyone who can reach this "
        "port can play audio here (see docs/security.md)\n"
    )


def test_exclusive_receiver_refuses_a_second_sender() -> None:
    rx = Receiver(NullSink(), ReceiverConfig(port=0, bind="127.0.0.1", max_senders=1))
    port = rx.start()
    try:
        first = Sender(
            open_source("tone://440", AudioFormat()), SenderConfig(Endpoint("127.0.0.1", port), seconds=3)
        )
        t = threading.Thread(target=first.run, daemon=True)
        t.start()
        wait_until(lambda: len(rx.sessions()) == 1, 10, "the first sender")
        second = Sender(
            open_source("tone://300", AudioFormat()), SenderConfig(Endpoint("127.0.0.1", port), seconds=1)
        )
        with pytest.raises(RejectedError, match=r"receiver busy: it takes 1 sender at a time"):
            second.run()
        first.stop()
        t.join(timeout=10)
    finally:
        rx.stop()


def test_sender_reconnects_within_a_second_of_the_receiver_coming_back() -> None:
    rx = Receiver(NullSink(), ReceiverConfig(port=0, bind="127.0.0.1"))
    port = rx.start()
    sender = Sender(
        open_source("tone://440", AudioFormat()), SenderConfig(Endpoint("127.0.0.1", port), seconds=8)
    )
    t = threading.Thread(target=sender.run, daemon=True)
    t.start()
    try:
        wait_until(lambda: rx.snapshot().packets >= 25, 10, "audio before the outage")
        rx.stop()
        wait_until(lambda: sender.stats.state == "reconnecting", 10, "the sender to notice")
        captured_at_outage = sender.stats.frames_captured
        wait_until(lambda: sender.stats.frames_captured >= captured_at_outage + 25, 10, "capture to go on")
        rx = Receiver(NullSink(), ReceiverConfig(port=port, bind="127.0.0.1"))
        rx.start()
        back = time.monotonic()
        wait_until(lambda: rx.snapshot().packets > 0, 5, "audio after the receiver came back")
        assert time.monotonic() - back < 1.0
        assert sender.stats.reconnects >= 1
        assert sender.stats.dropped > 0  # what was captured during the outage was dropped, counted
        assert sender.source.overruns == 0
    finally:
        sender.stop()
        t.join(timeout=10)
        rx.stop()
