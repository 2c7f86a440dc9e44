"""Opus through libopus: every frame size, rate and channel count round-trips; PLC and FEC fill gaps."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from tiality_cli.codec import OpusDecoder, OpusEncoder
from tiality_cli.config import OPUS_FRAME_US, AudioFormat, CodecConfig
from tiality_cli.errors import ConfigError, CorruptPacketError


def _signal(rate: int, channels: int, seconds: float) -> npt.NDArray[np.int16]:
    t = np.arange(int(rate * seconds)) / rate
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1234 * t)
    chans = [x * (1.0 - 0.3 * c) for c in range(channels)]
    return (np.stack(chans, axis=1) * 32767).astype(np.int16)


def _roundtrip(
    fmt: AudioFormat, cfg: CodecConfig, x: npt.NDArray[np.int16]
) -> tuple[npt.NDArray[np.int16], int, list[int]]:
    enc = OpusEncoder(fmt, cfg)
    dec = OpusDecoder(fmt.sample_rate, fmt.channels, fmt.frame_samples)
    n = fmt.frame_samples
    out, sizes = [], []
    for i in range(len(x) // n):
        enc.input[:] = x[i * n : (i + 1) * n]
        p = enc.encode()
        sizes.append(len(p))
        got = dec.decode(p)
        assert got == n
        out.append(dec.output[:got].copy())
    return np.concatenate(out), enc.lookahead, sizes


def _snr(ref: npt.NDArray[np.int16], out: npt.NDArray[np.int16], delay: int) -> float:
    a = ref[: len(out) - delay].astype(np.float64)
    b = out[delay:].astype(np.float64)
    a, b = a[len(a) // 5 :], b[len(b) // 5 :]  # skip the encoder's start-up
    return float(10 * np.log10(np.sum(a**2) / np.sum((a - b) ** 2)))


@pytest.mark.parametrize("frame_us", OPUS_FRAME_US)
@pytest.mark.parametrize("rate", [16_000, 24_000, 48_000])
@pytest.mark.parametrize("channels", [1, 2])
def test_roundtrip_every_frame_size_rate_and_layout(frame_us: int, rate: int, channels: int) -> None:
    fmt = AudioFormat(rate, channels, frame_us)
    x = _signal(rate, channels, 1.2)
    y, delay, sizes = _roundtrip(fmt, CodecConfig(bitrate=96_000, application="restricted-lowdelay"), x)
    assert len(y) == len(x) // fmt.frame_samples * fmt.frame_samples
    assert _snr(x, y, delay) > 15.0
    assert max(sizes) < 1275


def test_bitrate_setting_shapes_the_packet_size() -> None:
    fmt = AudioFormat()
    x = _signal(48_000, 2, 2.0)
    _, _, low = _roundtrip(fmt, CodecConfig(bitrate=32_000, application="restricted-lowdelay"), x)
    _, _, high = _roundtrip(fmt, CodecConfig(bitrate=128_000, application="restricted-lowdelay"), x)
    kbps_low = np.mean(low) * 8 / 0.02 / 1000
    kbps_high = np.mean(high) * 8 / 0.02 / 1000
    assert 24 < kbps_low < 40
    assert 100 < kbps_high < 150


def test_restricted_lowdelay_has_the_smallest_lookahead() -> None:
    fmt = AudioFormat()
    delays = {
        a: OpusEncoder(fmt, CodecConfig(application=a)).lookahead
        for a in ("voip", "audio", "restricted-lowdelay")
    }
    assert delays["restricted-lowdelay"] == 120  # 2.5 ms at 48 kHz
    assert delays["voip"] == delays["audio"] == 312  # 6.5 ms


def test_plc_and_fec_rebuild_a_lost_frame() -> None:
    fmt = AudioFormat(48_000, 1, 20_000)
    cfg = CodecConfig(bitrate=32_000, application="voip", inband_fec=True, packet_loss_perc=20)
    enc = OpusEncoder(fmt, cfg)
    t = np.arange(48_000) / 48_000
    speechlike = (0.4 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) * 16000).astype(
        np.int16
    )
    packets = []
    for i in range(50):
        enc.input[:, 0] = speechlike[i * 960 : (i + 1) * 960]
        packets.append(enc.encode())
    dec = OpusDecoder(48_000, 1, 960)
    for p in packets[:30]:
        dec.decode(p)
    assert dec.conceal(960) == 960
    concealed_energy = float(np.mean(dec.output[:960].astype(np.float64) ** 2))
    assert concealed_energy > 0  # PLC continues the signal rather than leaving silence
    assert dec.decode_fec(packets[32], 960) == 960


def test_garbage_payload_raises_a_clear_error() -> None:
    dec = OpusDecoder(48_000, 2, 960)
    with pytest.raises(CorruptPacketError, match="undecodable Opus packet"):
        dec.decode(b"\xff\xff\xff")


def test_invalid_formats_are_refused_with_the_allowed_values() -> None:
    with pytest.raises(ConfigError, match=r"--frame-ms 30: Opus frames are 2.5, 5, 10, 20, 40, 60 ms"):
        AudioFormat(48_000, 2, 30_000).validate_opus()
    with pytest.raises(ConfigError, match="--rate 44100"):
        OpusEncoder(AudioFormat(44_100, 2, 20_000))
    with pytest.raises(ConfigError, match="6 to 510 kbit/s"):
        CodecConfig(bitrate=1000).validate()
