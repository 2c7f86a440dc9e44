"""Runs a real sender and receiver in this process, over a real loopback gRPC connection."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from tiality_cli.config import AudioFormat, CodecConfig, Endpoint
from tiality_cli.io.sinks import open_sink
from tiality_cli.io.sources import open_source
from tiality_cli.playout import PlayoutConfig
from tiality_cli.receiver import Receiver, ReceiverConfig
from tiality_cli.sender import Sender, SenderConfig, SendResult
from tiality_cli.stats import StatsSnapshot
from tiality_cli.wavfile import WavInfo, read_wav

# Tests that compare the waveform (SNR) use the one Opus mode that keeps it: 'voip', the default, high-passes
# the signal (a phase shift no listener hears, but SNR does) and is judged by PESQ in tests/test_fidelity.py.
WAVEFORM = CodecConfig(application="restricted-lowdelay")


@dataclass
class Trip:
    out: npt.NDArray[np.float32]
    info: WavInfo
    sent: SendResult
    snap: StatsSnapshot


def stream_file(
    src: str,
    out_path: Path,
    fmt: AudioFormat | None = None,
    codec: CodecConfig | None = None,
    seconds: float | None = None,
    playout: PlayoutConfig | None = None,
) -> Trip:
    """Streams ``src`` (an input URI) through Opus and gRPC into a WAV file; returns what was written."""
    fmt = fmt or AudioFormat()
    config = ReceiverConfig(port=0, bind="127.0.0.1", playout=playout or PlayoutConfig())
    rx = Receiver(open_sink(f"file:{out_path}"), config)
    port = rx.start()
    try:
        source = open_source(src, fmt)
        sent = Sender(
            source, SenderConfig(Endpoint("127.0.0.1", port), codec or WAVEFORM, seconds=seconds)
        ).run()
        assert rx.wait_for(streams_ended=1, timeout=10.0), "the receiver never finished the stream"
        snap = rx.snapshot()
    finally:
        rx.stop()
    out, info = read_wav(out_path)
    return Trip(out, info, sent, snap)
