"""On a clean link the pipeline keeps the codec's quality: file -> send -> gRPC -> recv -> file.

Measured as a user would: the real commands (`tiality recv -o file:OUT.wav`, `tiality send -i file:IN.wav`)
over loopback, at the defaults and at 10 ms / 32 kbit/s, two links at once on this 2-core machine. The
output must hold every frame (no late, concealed, skipped or inserted frame; no silent block the input
does not have), last exactly as long as the input, and score within 0.05 PESQ-WB of libopus alone at the
same settings (tiality_cli.loopback.transcode: the same encoder and decoder, no network, no playout).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pesq  # a development dependency (pyproject.toml [dev])
import pytest
import samplerate

from tests.helpers.signals import align, find_dropouts, load_speech, trim_aligned
from tiality_cli.config import AudioFormat, CodecConfig
from tiality_cli.loopback import transcode
from tiality_cli.wavfile import read_wav, write_wav

TIALITY = [sys.executable, "-m", "tiality_cli"]
ENV = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
RATE = 48_000
F64 = npt.NDArray[np.float64]

# (frame ms, kbit/s, extra send options)
SETTINGS = {"defaults": (20.0, 64, []), "10ms-32k": (10.0, 32, ["--frame-ms", "10", "--bitrate", "32"])}


def pesq_wb(reference: F64, degraded: F64) -> float:
    """PESQ-WB (ITU-T P.862.2) of two aligned 48 kHz mono signals, scored at 16 kHz."""
    ref16 = np.asarray(samplerate.resample(reference, 16_000 / RATE, "sinc_best"), dtype=np.float64)
    deg16 = np.asarray(samplerate.resample(degraded, 16_000 / RATE, "sinc_best"), dtype=np.float64)
    n = min(len(ref16), len(deg16))
    return float(pesq.pesq(16_000, ref16[:n], deg16[:n], "wb"))


def start_link(inp: Path, out: Path, extra: list[str]) -> tuple[subprocess.Popen[str], subprocess.Popen[str]]:
    recv = subprocess.Popen(
        [*TIALITY, "recv", "--port", "0", "--bind", "127.0.0.1", "-o", f"file:{out}", "--once", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert recv.stderr is not None
    m = re.search(r"listening on port (\d+)", recv.stderr.readline())
    assert m, "recv did not say where it listens"
    port = int(m.group(1))
    send = subprocess.Popen(
        [*TIALITY, "send", f"127.0.0.1:{port}", "-i", f"file:{inp}", "--json", "-q", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    return recv, send


def summary(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    found = [d for d in lines if d.get("event") == "summary"]
    assert found, out
    last: dict[str, object] = found[-1]
    return last


@pytest.mark.slow
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_two_clean_links_keep_the_codecs_quality(tmp_path: Path, setting: str) -> None:
    frame_ms, kbps, extra = SETTINGS[setting]
    speech = load_speech()[:, 0]
    pcm = np.round(np.concatenate([speech, speech]) * 32767).astype(np.int16)  # 12 s
    inp = tmp_path / "in.wav"
    write_wav(inp, pcm[:, None], RATE)
    fmt = AudioFormat(RATE, 2, round(frame_ms * 1000))
    frames = -(-len(pcm) // fmt.frame_samples)
    # libopus alone, at the same settings (stereo stream of the mono file, as send makes it)
    codec = CodecConfig(bitrate=kbps * 1000)
    stereo = np.zeros((frames * fmt.frame_samples, 2), dtype=np.int16)
    stereo[: len(pcm)] = pcm[:, None]
    alone = transcode(stereo, fmt, codec)
    ref = stereo[:, 0].astype(np.float64) / 32768
    coded = alone.pcm[:, 0].astype(np.float64) / 32768
    a, b = trim_aligned(ref, coded, alone.lookahead)
    codec_pesq = pesq_wb(a, b)

    links = [start_link(inp, tmp_path / f"out{i}.wav", extra) for i in range(2)]
    results = [(summary(send), summary(recv)) for recv, send in links]
    for i, (sent, got) in enumerate(results):
        assert sent["packets_sent"] == frames
        counts = {k: got[k] for k in ("late", "lost", "concealed", "skipped", "inserted")}
        assert counts == dict.fromkeys(counts, 0), f"link {i}: {counts}"
        assert got["frames_played"] == frames
        out, _ = read_wav(tmp_path / f"out{i}.wav")
        assert len(out) == frames * fmt.frame_samples, "the exact duration"
        heard = out[:, 0].astype(np.float64)
        lag = align(ref, heard, max_lag_samples=RATE // 50)
        r, h = trim_aligned(ref, heard, lag)
        assert len(find_dropouts(h, RATE, min_ms=5)) <= len(find_dropouts(r, RATE, min_ms=5))
        link_pesq = pesq_wb(r, h)
        print(f"{setting} link {i}: PESQ-WB {link_pesq:.3f}, libopus alone {codec_pesq:.3f}, lag {lag}")
        assert link_pesq >= codec_pesq - 0.05
