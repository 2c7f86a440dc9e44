"""`recv --record`: WAV of what was played (survives SIGTERM and kill -9), Ogg Opus of the packets."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.helpers.signals import SPEECH_WAV, align, chunked_snr_db, correlation, load_speech, trim_aligned
from tiality_cli.wavfile import read_wav

TIALITY = [sys.executable, "-m", "tiality_cli"]
ENV = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}


def start_recv(*args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [*TIALITY, "recv", "--port", "0", "--bind", "127.0.0.1", "-o", "null://", "--json", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert proc.stderr is not None
    m = re.search(r"listening on port (\d+)", proc.stderr.readline())
    assert m
    return proc, int(m.group(1))


def send(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *TIALITY,
            "send",
            f"127.0.0.1:{port}",
            "--json",
            "-q",
            "--application",
            "restricted-lowdelay",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )


def test_wav_record_holds_what_was_played_and_survives_sigterm(tmp_path: Path) -> None:
    rec = tmp_path / "played.wav"
    recv, port = start_recv("--record", str(rec))
    sent = send(port, "-i", f"file:{SPEECH_WAV}", "--channels", "1")
    assert sent.returncode == 0, sent.stderr
    recv.send_signal(signal.SIGTERM)
    out, _ = recv.communicate(timeout=20)
    summary = json.loads(out.splitlines()[-1])
    audio, info = read_wav(rec)
    assert (info.sample_rate, info.channels) == (48_000, 1)
    # Every played block and nothing else: frames_played counts whole frames, and the latency steps
    # (slices inserted while a late packet was awaited, or dropped) come on top; the recording takes
    # 5 ms blocks (drift compensation resamples, so a frame's samples may straddle the last block).
    played = summary["frames_played"] * 960 + round((summary["inserted_ms"] - summary["skipped_ms"]) * 48)
    print(
        f"recording {info.frames} samples; played {played}: {summary['frames_played']} frames, "
        f"{summary['inserted_ms']:.1f} ms inserted, {summary['skipped_ms']:.1f} ms skipped"
    )
    assert abs(info.frames - played) <= 2 * 240, summary
    assert summary["inserted_ms"] + summary["skipped_ms"] <= 60.0, summary  # 1 % of the 6 s at most
    ref = load_speech()
    lag = align(ref, audio, 2400)
    a, b = trim_aligned(ref, audio, lag)
    assert chunked_snr_db(a, b, 48_000) > 12.0  # the recording is the speech (chunks aligned on their own)


def test_wav_record_after_kill_9_misses_at_most_the_last_second(tmp_path: Path) -> None:
    rec = tmp_path / "cut.wav"
    recv, port = start_recv("--record", str(rec))
    sender = subprocess.Popen(
        [*TIALITY, "send", f"127.0.0.1:{port}", "-i", "tone://440", "--seconds", "30", "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
    )
    assert recv.stdout is not None
    played = 0
    for line in recv.stdout:  # JSON stats, one a second
        played = json.loads(line)["frames_played"]
        if played >= 150:  # 3 s
            break
    recv.send_signal(signal.SIGKILL)
    recv.wait(timeout=10)
    sender.terminate()
    sender.wait(timeout=10)
    probe = subprocess.run(["sox", "--i", "-s", str(rec)], capture_output=True, text=True, check=True)
    samples = int(probe.stdout.strip())
    _, info = read_wav(rec)
    assert info.frames == samples
    assert samples >= (played - 50) * 960  # at most the last second (50 frames) is missing


def test_opus_record_keeps_the_packets_and_plays_in_standard_tools(tmp_path: Path) -> None:
    rec = tmp_path / "session.opus"
    recv, port = start_recv("--record", str(rec))
    sent = send(port, "-i", f"file:{SPEECH_WAV}")
    assert sent.returncode == 0, sent.stderr
    recv.send_signal(signal.SIGINT)
    recv.communicate(timeout=20)
    info = subprocess.run(["opusinfo", str(rec)], capture_output=True, text=True)
    assert info.returncode == 0, info.stdout + info.stderr
    assert "Channels: 2" in info.stdout
    m = re.search(r"Playback length: (\d+)m:([\d.]+)s", info.stdout)
    assert m
    seconds = int(m.group(1)) * 60 + float(m.group(2))
    speech_s = len(load_speech()) / 48_000
    assert abs(seconds - speech_s) < 0.05
    decoded = tmp_path / "decoded.wav"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(rec), "-ac", "1", str(decoded)], check=True)
    audio, _ = read_wav(decoded)
    ref = load_speech()
    lag = align(ref, audio, 2400)
    assert abs(lag) <= 480
    a, b = trim_aligned(ref, audio, lag)
    assert correlation(a, b) > 0.98
    assert np.isfinite(b).all()


def test_record_needs_a_wav_or_opus_name(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*TIALITY, "recv", "--port", "0", "-o", "null://", "--record", str(tmp_path / "x.mp3")],
        capture_output=True,
        text=True,
        timeout=30,
        env=ENV,
    )
    assert proc.returncode == 2
    assert "--record" in proc.stderr and "name a .wav" in proc.stderr
