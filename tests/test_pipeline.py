"""send -> gRPC -> recv through real Opus and a real loopback connection, compared with what went in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers.pipeline import stream_file
from tests.helpers.signals import (
    SPEECH_WAV,
    align,
    chunked_snr_db,
    find_dropouts,
    follow_warp,
    load_speech,
    segmental_snr_db,
    trim_aligned,
)
from tiality_cli.config import AudioFormat, CodecConfig
from tiality_cli.io.files import convert_audio
from tiality_cli.playout import PlayoutConfig
from tiality_cli.wavfile import write_wav


def test_speech_at_default_settings_comes_back_whole_and_clean(tmp_path: Path) -> None:
    trip = stream_file(f"file:{SPEECH_WAV}", tmp_path / "heard.wav")
    ref = load_speech()  # 48 kHz mono; the stream is 48 kHz stereo (mono duplicated)
    frame = 960
    n_frames = -(-len(ref) // frame)
    assert trip.info.sample_rate == 48_000 and trip.info.channels == 2
    # Every frame sent was played, none concealed, and the file's length is the stream's duration.
    assert trip.sent.packets_sent == n_frames
    assert trip.snap.packets == n_frames and trip.snap.frames_played == n_frames
    # Loopback on a shared 2-core machine still has scheduling hiccups; the adaptive buffer may
    # conceal an occasional frame while it learns them, but never a block of them.
    assert trip.snap.lost == 0 and trip.snap.concealed <= 3
    assert abs(len(trip.out) - len(ref)) <= frame
    lag = align(ref, trip.out[:, :1], max_lag_samples=2400)
    assert -48 <= lag <= 480  # the codec's lookahead (2.5 ms), give or take the resampler's few samples
    a, b = trim_aligned(ref, trip.out[:, :1], lag)
    # Drift compensation may slide the timeline by a few samples (inaudible): compare content.
    assert segmental_snr_db(a, follow_warp(a, b, 48_000), 48_000) >= 15.0
    # No dropped blocks: the output has no run of digital silence that the input does not have.
    assert len(find_dropouts(b, 48_000, min_ms=5)) <= len(find_dropouts(a, 48_000, min_ms=5))


@pytest.mark.parametrize("frame_ms", [2.5, 10, 20, 60])
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("rate", [16_000, 24_000, 48_000])
def test_frame_sizes_layouts_and_rates_round_trip(
    tmp_path: Path, frame_ms: float, channels: int, rate: int
) -> None:
    speech = load_speech()[48_000 : 48_000 + 38_400]  # 0.8 s of voiced speech
    clip = tmp_path / "clip.wav"
    write_wav(clip, convert_audio(speech, 48_000, AudioFormat(48_000, 1, 20_000)), 48_000)
    fmt = AudioFormat(rate, channels, round(frame_ms * 1000))
    # 128 kbit/s: at 2.5 ms, stereo Opus needs it (64 kbit/s leaves 20 bytes a frame: ~1 dB seg. SNR).
    # A fixed 60 ms buffer: this test is about formats, and an adaptive buffer learning the jitter of
    # a loaded machine within a 0.8 s clip would make it about scheduling (covered elsewhere).
    trip = stream_file(
        f"file:{clip}",
        tmp_path / "out.wav",
        fmt,
        CodecConfig(bitrate=128_000, application="restricted-lowdelay"),
        playout=PlayoutConfig(latency_ms=60),
    )
    frames = -(-round(0.8 * rate) // fmt.frame_samples)
    assert (trip.info.sample_rate, trip.info.channels) == (rate, channels)
    s = trip.snap
    assert s.lost == 0 and s.packets == frames
    assert s.frames_played == frames  # every frame once (latency steps are 2.5 ms slices, not frames)
    assert abs(len(trip.out) - round(0.8 * rate)) <= fmt.frame_samples * (1 + s.inserted + s.skipped)
    ref = convert_audio(speech, 48_000, fmt).astype(np.float32) / 32768
    lag = align(ref[:, :1], trip.out[:, :1], max_lag_samples=rate // 10)
    a, b = trim_aligned(ref, trip.out, lag)
    if s.skipped + s.inserted == 0:
        # Only drift compensation may have slid the timeline, by a few samples: follow it.
        assert segmental_snr_db(a, follow_warp(a, b, rate, max_shift_ms=10.0), rate) >= 15.0, (s.late, lag)
    else:
        # On a loaded machine the buffer skipped or inserted a frame to steer its latency, which moves
        # the timeline by a whole frame: judge the audio in chunks, each aligned on its own.
        assert chunked_snr_db(a, b, rate) >= 12.0, (s.skipped, s.inserted, s.late, lag)
