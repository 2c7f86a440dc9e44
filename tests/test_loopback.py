"""The microphone self-test: record through Opus and play back, and the live mode's latency.

With the virtual sound card: speech (over a quiet noise bed, so the audio is never digitally silent)
is played into the mic, ``run_loopback`` records 5 s from alsa://tmic and plays the decoded audio to
sd://tspk, and spk.monitor must hold exactly 5 s of it. The live test loops alsa://tmic back into the
mic itself (alsa://tfeed / sd://tfeed), so one click echoes every L ms in mic.monitor: L is the real
capture-to-playback latency, which the live mode's own estimate must match.
"""

from __future__ import annotations

import json
import math
import threading
import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import typer
from typer.testing import CliRunner

from helpers.signals import (
    align,
    click_train,
    correlation,
    detect_clicks,
    load_speech,
    snr_db,
    trim_aligned,
    white_noise,
)
from helpers.soundcard import RATE, VirtualSoundCard
from tiality_cli.cli.devices import register
from tiality_cli.config import AudioFormat, CodecConfig
from tiality_cli.io.sinks import open_sink
from tiality_cli.io.sources import open_source
from tiality_cli.loopback import LoopbackResult, run_live, run_loopback, transcode

FMT = AudioFormat(RATE, 2, 20_000)
I16 = npt.NDArray[np.int16]


def to_int16(x: npt.NDArray[np.float32]) -> I16:
    return np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)


def speech_over_noise(seconds: float) -> I16:
    """Speech in both channels over independent -50 dBFS noise, ``seconds`` long (stereo int16)."""
    n = round(seconds * RATE)
    speech = np.zeros(n, dtype=np.float32)
    s = load_speech()[:n, 0]
    speech[: len(s)] = s
    bed = np.concatenate([white_noise(n, -50.0, seed=3), white_noise(n, -50.0, seed=4)], axis=1)
    return to_int16(speech[:, None] + bed)


# ----------------------------------------------------------------------------------------------------
# pure parts


def test_transcode_reports_the_codec_figures() -> None:
    pcm = speech_over_noise(2.0)
    coded = transcode(pcm, FMT, CodecConfig(bitrate=64_000))
    c = coded.codec
    assert coded.pcm.shape == pcm.shape
    assert c.frames == 100
    assert 40 < c.bitrate_kbps < 80  # VBR around the 64 kbit/s asked for
    assert c.packet_bytes_min <= c.packet_bytes_mean <= c.packet_bytes_max <= 1275
    assert c.bitrate_kbps == pytest.approx(c.packet_bytes_mean * 8 / FMT.frame_ms, rel=1e-9)
    assert 0 < c.encode_us_median <= c.encode_us_p95 < FMT.frame_us  # faster than real time
    assert 0 < c.decode_us_median <= c.decode_us_p95 < FMT.frame_us
    assert coded.lookahead == 120  # restricted-lowdelay: 2.5 ms at 48 kHz
    lag = align(pcm, coded.pcm, 2000)
    assert lag == coded.lookahead
    assert snr_db(*trim_aligned(pcm, coded.pcm, lag)) > 10
    low = transcode(pcm, FMT, CodecConfig(bitrate=16_000)).codec
    assert low.bitrate_kbps < c.bitrate_kbps / 2


# ----------------------------------------------------------------------------------------------------
# record, transcode, play back (virtual sound card)


def test_loopback_plays_back_exactly_what_it_recorded(sound_card: VirtualSoundCard) -> None:
    signal = speech_over_noise(6.5)
    mic = sound_card.recorder("mic.monitor").wait_started()
    player = sound_card.play_into_mic(signal)
    try:
        mic.wait_sound(1000)  # the speech has reached the mic: record from now
        mic.stop()
        spk = sound_card.recorder().wait_started()
        start = spk.frames
        source = open_source("alsa://tmic", FMT)
        sink = open_sink("sd://tspk", FMT)
        recorded: list[float] = []
        played: list[float] = []
        try:
            result = run_loopback(
                source,
                sink,
                5.0,
                CodecConfig(bitrate=64_000),
                lambda done_s, peak, rms: recorded.append(done_s),
                lambda done_s, peak, rms: played.append(done_s),
            )
        finally:
            sink.close()
        spk.wait_frames(spk.frames + RATE // 5)  # what the device played, and 200 ms after it
        heard = spk.stop()[start:]
    finally:
        player.wait(15)
    assert isinstance(result, LoopbackResult)
    assert result.recording is not None and result.decoded is not None
    rec, dec = result.recording, result.decoded

    # Durations: 250 whole frames recorded, the same played.
    assert result.recorded_s == 5.0 and result.played_s == 5.0
    assert rec.shape == dec.shape == (5 * RATE, 2)
    loud = np.flatnonzero(np.any(heard != 0, axis=1))
    assert abs((loud[-1] - loud[0] + 1) - 5 * RATE) <= FMT.frame_samples  # within one frame
    # The recording is the mic's audio, bit for bit and without gaps.
    ref, got = trim_aligned(signal, rec, align(signal, rec, len(signal)))
    assert len(ref) == len(rec) and snr_db(ref, got, match_gain=False) > 60
    # The decoded audio is the recording through Opus (2.5 ms later), and is what the speaker played.
    lag = align(rec, dec, 2000)
    assert lag == 120
    assert snr_db(*trim_aligned(rec, dec, lag)) > 10
    ref, got = trim_aligned(dec, heard, align(dec, heard, len(heard) - len(dec)))
    assert len(ref) == len(dec) and correlation(ref, got) > 0.999

    c = result.codec
    assert c.frames == 250 and 40 < c.bitrate_kbps < 80
    assert c.packet_bytes_min <= c.packet_bytes_mean <= c.packet_bytes_max
    assert 0 < c.encode_us_median <= c.encode_us_p95 and 0 < c.decode_us_median <= c.decode_us_p95
    peak = 20 * math.log10(np.abs(rec.astype(np.int32)).max() / 32768)
    assert result.input_peak_dbfs == pytest.approx(peak, abs=1e-9)
    assert -40 < result.input_rms_dbfs < result.input_peak_dbfs <= -3.0 + 0.01
    assert result.overruns == 0 and result.underruns == 0
    assert result.latency is None
    assert len(recorded) == 250 and recorded[-1] == 5.0 and played[-1] == 5.0 and len(played) > 10
    assert json.loads(json.dumps(result.as_dict()))["codec"]["frames"] == 250


@pytest.mark.parametrize("output", ["sd://tfeed", "alsa://tfeed"])
def test_live_latency_estimate_matches_the_echo(sound_card: VirtualSoundCard, output: str) -> None:
    mic = sound_card.recorder("mic.monitor", channels=1).wait_started()
    source = open_source("alsa://tmic", FMT)
    sink = open_sink(output, FMT)
    running = threading.Event()
    outcome: dict[str, LoopbackResult] = {}

    def progress(done_s: float, peak: float, rms: float) -> None:
        if done_s >= 0.2:
            running.set()

    def live() -> None:
        outcome["result"] = run_live(source, sink, 1.5, CodecConfig(), progress)

    thread = threading.Thread(target=live)
    thread.start()
    try:
        assert running.wait(5.0)
        click = click_train(RATE, period_s=0.2, n=1, start_s=0.0, level_dbfs=-6.0)
        start = mic.frames
        sound_card.play_into_mic(to_int16(click.signal)).wait(10)
    finally:
        thread.join(10)
        sink.close()
    heard = mic.stop()[start:]
    result = outcome["result"]
    onsets = detect_clicks(heard, RATE, threshold=0.15, min_gap_s=0.03)
    assert len(onsets) >= 4, onsets  # the click, then its echoes round the loop
    measured_ms = float(np.median(np.diff(onsets[:4]))) / RATE * 1000
    lat = result.latency
    assert lat is not None and lat.frames >= 70
    assert 20 < measured_ms < 200
    # The estimate trusts the device's reported output delay; through the pulse plugin with a 20 ms
    # PortAudio buffer that overstates by about 12 ms (9 ms buffer: 2 ms; ALSA: 4 ms).
    assert lat.median_ms == pytest.approx(measured_ms, abs=20.0)
    assert lat.min_ms <= lat.median_ms <= lat.p95_ms <= lat.max_ms
    assert result.recorded_s == 1.5 and result.played_s == pytest.approx(1.5, abs=FMT.frame_ms / 1000)
    assert result.starved_frames == 0 and result.dropped_frames == 0 and result.overruns == 0
    print(f"{output}: echo {measured_ms:.1f} ms, estimate {lat.median_ms:.1f} ms (p95 {lat.p95_ms:.1f})")


# ----------------------------------------------------------------------------------------------------
# the command


def app() -> typer.Typer:
    cli = typer.Typer()
    cli.callback()(lambda: None)
    register(cli)
    return cli


def test_loopback_command_writes_the_round_trip_and_prints_figures(tmp_path: Path) -> None:
    out = tmp_path / "round-trip.wav"
    runner = CliRunner(env={"COLUMNS": "120", "NO_COLOR": "1"})
    result = runner.invoke(
        app(),
        ["loopback", "-i", "tone://440", "-o", f"file:{out}", "--seconds", "1", "--frame-ms", "10", "--json"],
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert figures["recorded_s"] == 1.0 and figures["played_s"] == 1.0
    assert figures["codec"]["frames"] == 100 and figures["format"]["frame_ms"] == 10.0
    assert figures["input_peak_dbfs"] == pytest.approx(-12.0, abs=0.01)  # tone:// plays at -12 dBFS
    with wave.open(str(out), "rb") as w:
        assert w.getnframes() == RATE  # exactly the second recorded
    result = runner.invoke(app(), ["loopback", "-i", "tone://440", "-o", "null://", "--seconds", "0.2"])
    assert result.exit_code == 0, result.output
    for row in ("bitrate set / measured", "packet min / mean / max", "encode median / p95", "decode median"):
        assert row in result.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["-i", "alsa://nosuch"], 3, "tiality: alsa://nosuch: no such ALSA device; capture devices: "),
        (["--bitrate", "2"], 2, "tiality: --bitrate 2: Opus takes 6 to 510 kbit/s"),
        (["--seconds", "0"], 2, "tiality: --seconds 0: must be positive (0 only with --live)"),
        (
            ["-i", "tone://440", "-o", "tone://1"],
            2,
            "tiality: 'tone://1': tone:// is an input, not an output",
        ),
    ],
)
def test_loopback_command_errors_are_one_line(args: list[str], code: int, message: str) -> None:
    result = CliRunner(env={"COLUMNS": "80"}).invoke(app(), ["loopback", "-o", "null://", *args])
    assert result.exit_code == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
