"""The receiver as a GUI embeds it, on a simulated clock: an app-owned output pulled by the test.

Real Opus packets go into a real Receiver; only the clock is simulated (tests/helpers/appout.py), so each
output sample has an exact pull time and two runs that differ in one control can be compared sample by
sample. What is checked is in the samples: levels by Goertzel, gain curves by dividing a run by its
twin without the change, click times against play_time_ns.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from tests.helpers.appout import AppOutput, encode
from tests.helpers.signals import (
    align,
    click_train,
    detect_clicks,
    follow_warp,
    load_speech,
    segmental_snr_db,
    tone,
    trim_aligned,
)
from tiality_cli.config import AudioFormat
from tiality_cli.errors import ConfigError
from tiality_cli.io.base import to_int16
from tiality_cli.playout import PlayoutConfig
from tiality_cli.receiver import LIMIT_KNEE, ReceiverConfig, soft_limit
from tiality_cli.wavfile import read_wav

F32 = npt.NDArray[np.float32]
RATE = 48_000
FMT = AudioFormat()  # 48 kHz stereo, 20 ms
# The engine hands out exact samples, and holds a fixed target: runs compare 1:1. (With --latency auto
# the target falls once the jitter proves small, and the engine follows it with a 2.5 ms cut, which
# moves the timeline: tests/test_playout.py covers that; here the block size is under test.)
EXACT = PlayoutConfig(drift_compensation=False, latency_ms=20.0)
STEADY = PlayoutConfig(latency_ms=20.0)  # drift compensation on, as shipped


def level_db(x: npt.NDArray[np.float32], freq: float, rate: int = RATE) -> float:
    """The amplitude of ``freq`` in ``x`` (first channel), in dB re full scale (Goertzel / one DFT bin)."""
    v = x[:, 0] if x.ndim == 2 else x
    n = len(v)
    w = np.exp(-2j * np.pi * freq * np.arange(n) / rate)
    amp = 2 * abs(np.dot(v.astype(np.float64), w)) / n
    return 20 * math.log10(max(amp, 1e-9))


def stereo(x: F32) -> F32:
    return np.repeat(x[:, :1], 2, axis=1)


def tone_packets(freq: float, seconds: float, level: float = -12.0) -> list[bytes]:
    # Whole cycles in a window of 0.1 s: the Goertzel bins below are exact.
    return encode(stereo(tone(freq, seconds, RATE, level_dbfs=level)), FMT)


def run(
    streams: list[list[bytes]],
    seconds: float,
    *,
    block: int = 240,
    config: ReceiverConfig | None = None,
    before_pull: Callable[[AppOutput, int], None] | None = None,
) -> tuple[F32, AppOutput]:
    app = AppOutput(config or ReceiverConfig(listen=False, playout=EXACT))
    for i, packets in enumerate(streams):
        app.add(packets, FMT, name=f"s{i}")
    try:
        hook = None if before_pull is None else (lambda i: before_pull(app, i))
        out = app.run(seconds, block, hook)
    finally:
        app.close()
    return out, app


# ---- application-owned output -----------------------------------------------------------------------


def speech_packets() -> list[bytes]:
    return encode(stereo(load_speech()[: 2 * RATE]), FMT)


@pytest.mark.parametrize("block", [1, 7, 128, 441, 4096])
def test_any_block_size_plays_exactly_what_device_sized_pulls_play(block: int) -> None:
    packets = speech_packets()
    ref, ref_app = run([packets], 2.3)  # 5 ms pulls, as the device sinks make
    out, app = run([packets], 2.3, block=block)
    for a in (ref_app, app):
        snap = a.rx.snapshot()
        assert (snap.frames_played, snap.concealed, snap.skipped, snap.inserted) == (100, 0, 0, 0)
    lag = align(ref[:, :1], out[:, :1], max_lag_samples=block + 960)
    x, y = trim_aligned(ref, out, lag)
    assert len(x) >= 2 * RATE - 480
    assert np.array_equal(x, y)  # sample for sample, once shifted by when the first block came


@pytest.mark.parametrize("block", [1, 7, 128, 441, 4096])
def test_any_block_size_as_shipped_plays_the_same_audio(block: int) -> None:
    """With drift compensation on (the default) the timeline may be steered by a few samples."""
    packets = speech_packets()
    cfg = ReceiverConfig(listen=False, playout=STEADY)
    ref, _ = run([packets], 2.3, config=cfg)
    out, app = run([packets], 2.3, block=block, config=cfg)
    snap = app.rx.snapshot()
    assert (snap.frames_played, snap.concealed, snap.skipped, snap.inserted) == (100, 0, 0, 0)
    lag = align(ref[:, :1], out[:, :1], max_lag_samples=block + 960)
    a, b = trim_aligned(ref[:, :1], out[:, :1], lag)
    assert segmental_snr_db(a, follow_warp(a, b, RATE), RATE) >= 20.0


def test_float_output_is_the_int16_output_unquantised() -> None:
    packets = tone_packets(1000, 1.0)
    ints, _ = run([packets], 1.0)
    app = AppOutput(ReceiverConfig(listen=False, playout=EXACT))
    app.add(packets, FMT)
    floats = app.run(1.0, 240, dtype=np.float32)
    app.close()
    assert np.abs(floats).max() > 0.2
    assert np.abs(floats - ints).max() <= 1 / 32768  # the same mix, less the int16 rounding


# ---- volume, gain, mute and solo ----------------------------------------------------------------------

CHANGE_AT = RATE // 2 + 37  # an odd sample: the change lands inside a pull, not on its edge


def gain_curve(changed: F32, ref: F32) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """(sample index, changed/ref) where the reference is loud enough for the ratio to mean something."""
    x, r = changed[:, 0].astype(np.float64), ref[:, 0].astype(np.float64)
    idx = np.flatnonzero(np.abs(r) > 0.05)
    return idx, x[idx] / r[idx]


@pytest.mark.parametrize(
    ("what", "db"), [("volume", -6.0), ("volume", -20.0), ("gain", -10.0), ("gain", 4.0)]
)
def test_volume_and_gain_changes_land_within_half_a_db_and_ramp_without_a_step(what: str, db: float) -> None:
    packets = tone_packets(1000, 1.5)

    def change(app: AppOutput, i: int) -> None:
        if i <= CHANGE_AT < i + 240:
            if what == "volume":
                app.rx.volume_db = db
            else:
                app.rx.sessions()[0].gain_db = db

    ref, _ = run([packets], 1.5)
    out, app = run([packets], 1.5, before_pull=change)
    start = CHANGE_AT // 240 * 240  # the pull the change was made before
    ramp = round(app.rx.config.ramp_ms * RATE / 1000)
    idx, g = gain_curve(out, ref)
    want = 10 ** (db / 20)
    before, during, after = idx < start, (idx >= start) & (idx < start + ramp), idx >= start + ramp
    assert np.abs(g[before] - 1).max() < 0.002
    settled = g[after & (idx < len(ref) - RATE // 10)]
    assert abs(20 * math.log10(float(np.median(settled))) - db) < 0.5
    assert np.abs(20 * np.log10(np.abs(settled)) - db).max() < 0.5
    # No step: the gain moves monotonically over the whole ramp, by at most ~1/ramp of the change a sample.
    ramp_g = g[during]
    assert len(ramp_g) > ramp // 3  # the ramp was seen (the tone is loud most of the time)
    steps = np.diff(g[(idx >= start - 1) & (idx <= start + ramp)]) / np.diff(
        idx[(idx >= start - 1) & (idx <= start + ramp)]
    )
    assert np.abs(steps).max() <= 1.2 * abs(want - 1) / ramp + 0.002
    assert np.all(np.sign(steps[np.abs(steps) > 0.002]) == np.sign(want - 1))
    # The envelope is half way at mid-ramp, not at the start or the end.
    mid = np.abs(idx - (start + ramp // 2)) < ramp // 8
    assert np.median(np.abs(g[mid] - 1)) == pytest.approx(abs(want - 1) / 2, rel=0.3)


def test_mute_ramps_to_exact_silence_and_back() -> None:
    packets = tone_packets(1000, 1.5)

    def change(app: AppOutput, i: int) -> None:
        if i == 24000:
            app.rx.muted = True
        if i == 48000:
            app.rx.muted = False

    out, app = run([packets], 1.5, before_pull=change)
    ramp = round(app.rx.config.ramp_ms * RATE / 1000)
    assert not out[24000 + ramp : 48000].any()  # exact digital silence once the ramp is done
    assert np.abs(out[24000 : 24000 + ramp // 4]).max() > 0.05  # ... and not before it
    assert np.abs(out[48000 + ramp : 48000 + 2 * ramp]).max() > 0.2  # back to full level
    # No step: sample to sample, the output moves no faster than the -12 dBFS 1 kHz tone itself does.
    tone_slope = 10 ** (-12 / 20) * 2 * math.pi * 1000 / RATE
    assert np.abs(np.diff(out[23990 : 24000 + ramp, 0])).max() <= tone_slope * 1.02


def test_solo_mute_and_gain_act_on_the_right_sender() -> None:
    a, b = tone_packets(500, 3.0), tone_packets(1500, 3.0)
    steps = {
        0: lambda rx: None,
        1: lambda rx: setattr(rx.sessions()[0], "gain_db", -10.0),
        2: lambda rx: setattr(rx.sessions()[1], "solo", True),
        3: lambda rx: setattr(rx.sessions()[1], "muted", True),
        4: lambda rx: setattr(rx.sessions()[1], "solo", False),
        5: lambda rx: setattr(rx.sessions()[0], "muted", True),
    }
    second = RATE // 2  # a step every half second, from 0.5 s

    def change(app: AppOutput, i: int) -> None:
        if i % second == 0 and i // second - 1 in steps:
            steps[i // second - 1](app.rx)

    out, _ = run([a, b], 3.5, before_pull=change)
    levels = []
    for k in range(6):
        w = out[(k + 1) * second + 2400 : (k + 2) * second - 2400]  # past the ramp and its pull
        levels.append((level_db(w, 500), level_db(w, 1500)))
    base_a, base_b = levels[0]
    assert base_a == pytest.approx(-12, abs=0.5) and base_b == pytest.approx(-12, abs=0.5)
    assert levels[1][0] - base_a == pytest.approx(-10, abs=0.5)  # gain on sender 0 only
    assert levels[1][1] - base_b == pytest.approx(0, abs=0.5)
    assert levels[2][0] < -80 and levels[2][1] - base_b == pytest.approx(0, abs=0.5)  # solo 1
    assert levels[3][0] < -80 and levels[3][1] < -80  # 1 soloed but muted: nothing
    assert levels[4][0] - base_a == pytest.approx(-10, abs=0.5) and levels[4][1] < -80  # no solo, 1 muted
    assert levels[5][0] < -80 and levels[5][1] < -80


def test_gain_bounds_are_checked() -> None:
    _, app = run([tone_packets(1000, 0.2)], 0.1)
    with pytest.raises(ConfigError, match=r"volume 30 dB: must be at most 24 dB"):
        app.rx.volume_db = 30
    app.rx.volume_db = -math.inf  # silence
    assert app.rx.volume_db == -math.inf


# ---- the limiter ----------------------------------------------------------------------------------------


def test_soft_limiter_passes_below_the_knee_and_rounds_off_above_it() -> None:
    x = np.linspace(-3.0, 3.0, 60001, dtype=np.float32).reshape(-1, 1)
    y = x.copy()
    soft_limit(y, np.empty_like(y), np.empty_like(y))
    below = np.abs(x) <= LIMIT_KNEE
    assert np.array_equal(y[below], x[below])
    assert np.abs(y).max() <= 1.0  # never past full scale, however loud
    assert np.abs(y[np.abs(x) <= 1.3]).max() < 32767 / 32768  # 2.3 dB over full scale still has room
    assert np.all(np.diff(y[:, 0]) >= -1e-6)  # monotonic, no fold-back (to float32's rounding, 1/30 LSB)
    inner = np.abs(x[:, 0]) <= 1.3
    assert np.all(np.diff(y[inner, 0]) > 0)
    # Smooth: on a 1e-3 grid the slope changes by under 0.02 a step (a hard clip's corner: 1 in one step).
    u = np.linspace(-1.3, 1.3, 2601, dtype=np.float32).reshape(-1, 1)
    v = u.copy()
    soft_limit(v, np.empty_like(v), np.empty_like(v))
    slope = np.diff(v[:, 0].astype(np.float64)) / np.diff(u[:, 0].astype(np.float64))
    assert slope.max() <= 1.0 + 1e-3 and slope.min() > 0
    assert np.abs(np.diff(slope)).max() < 0.02
    assert y[np.argmin(np.abs(x - 1.0))] == pytest.approx(
        LIMIT_KNEE + (1 - LIMIT_KNEE) * math.tanh((1.0 - LIMIT_KNEE) / (1 - LIMIT_KNEE)), abs=1e-4
    )


def test_the_limiters_peak_is_the_blocks_and_spares_the_int16_clip_only_where_nothing_clips() -> None:
    """soft_limit returns the peak after limiting (the meter's figure, and what lets the int16 conversion
    skip its clip); the conversion with that peak is sample-exact with the full one, at every level from
    quiet to far over full scale, including the blocks whose peak sits within an LSB of it."""
    rng = np.random.default_rng(7)
    top = 32767 / 32768
    levels = [
        0.01,
        0.5,
        LIMIT_KNEE * 0.999,
        LIMIT_KNEE * 1.001,
        0.95,
        top - 1e-6,
        top,
        top + 1e-6,
        1.0,
        1.5,
        4.0,
    ]
    for level in levels:
        for _ in range(20):
            x = (rng.uniform(-1.0, 1.0, (240, 2)) * level).astype(np.float32)
            x[rng.integers(240), rng.integers(2)] = level * rng.choice([-1.0, 1.0])  # the peak, either sign
            y = x.copy()
            peak = soft_limit(y, np.empty_like(y), np.empty_like(y))
            assert peak == pytest.approx(float(np.abs(y).max()), abs=1e-6), level
            for gain in (1.0, 0.5, -1.0):
                full, fast = np.empty((240, 2), np.int16), np.empty((240, 2), np.int16)
                to_int16(y.copy(), full, gain)
                to_int16(y.copy(), fast, gain, peak=peak)
                assert np.array_equal(full, fast), (level, gain)


def test_two_loud_senders_are_limited_not_clipped() -> None:
    a = encode(stereo(tone(500, 1.0, RATE, level_dbfs=-2.0)), FMT)
    b = encode(stereo(tone(1500, 1.0, RATE, level_dbfs=-2.0)), FMT)
    out, _ = run([a, b], 1.0)
    body = out[RATE // 4 : 3 * RATE // 4, 0]
    assert np.abs(body).max() > 0.95  # the sum (up to +4 dBFS) is limited close to full scale
    assert not np.any(np.abs(np.rint(body * 32768)) >= 32767)  # never a clipped (flat) sample
    # Below the knee nothing changes: the quieter half of the sum is each tone's sum, unchanged.
    assert level_db(out[RATE // 4 : 3 * RATE // 4], 500) == pytest.approx(-2.0, abs=1.0)


MIXING = """
import tracemalloc
import numpy as np
from tiality_cli.receiver import _Fader, soft_limit
x = (np.random.default_rng(1).standard_normal((4096, 2)) * 0.8).astype(np.float32)
s1, s2 = np.empty_like(x), np.empty_like(x)
g, idx = np.empty(4096, np.float32), np.arange(1, 4097, dtype=np.float32)
fader = _Fader(480)
soft_limit(x, s1, s2)
tracemalloc.start()
for k in range(200):
    soft_limit(x, s1, s2)
    fader.apply(x, 0.5 if k % 2 else 1.0, g, idx)
print(tracemalloc.get_traced_memory()[1])
"""


def test_mixing_allocates_nothing_per_block() -> None:
    """In a fresh interpreter: tracemalloc counts every thread's allocations, and a test session has others
    (the sound card's readers, gRPC) that would be charged to the mixer."""
    done = subprocess.run([sys.executable, "-c", MIXING], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    peak = int(done.stdout.strip())
    assert peak < 8192  # numpy's small per-call structures only: a block-sized temporary is 16-32 kB


# ---- A/V sync ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drift", [False, True])
@pytest.mark.parametrize("block", [240, 441, 4096])
def test_play_time_ns_is_when_a_click_is_pulled(block: int, drift: bool) -> None:
    clicks = click_train(RATE, 0.25, 8, start_s=0.2, level_dbfs=-6.0)
    packets = encode(stereo(clicks.signal), FMT)
    # Without drift compensation the engine can only move its latency in 2.5 ms steps, which no earlier
    # prediction can foresee: exact mode is run as recv -o file: runs it, on a fixed target.
    playout = PlayoutConfig() if drift else EXACT
    app = AppOutput(ReceiverConfig(listen=False, playout=playout))
    s = app.add(packets, FMT, offset_ns=-3_700_000_123, delay_ms=7.0)  # the Pi's clock is 3.7 s ahead
    predictions: dict[int, list[tuple[int, int]]] = {}

    def ask(i: int) -> None:
        if s.session is None:
            return
        for k, onset in enumerate(clicks.onsets):
            t = app.rx.play_time_ns(s.session.id, s.capture0_ns + int(onset) * 1_000_000_000 // RATE)
            if t is not None:
                predictions.setdefault(k, []).append((i, t))

    out = app.run(2.3, block, ask)
    app.close()
    heard = detect_clicks(out, RATE, 0.1)
    assert len(heard) == len(clicks.onsets)
    for k, index in enumerate(heard.tolist()):
        actual = app.pull_time_ns(index)
        asked = [t for i, t in predictions[k] if i <= index]
        # Asked just before it was pulled, and asked as early as the stream played (up to 2 s before).
        assert abs(asked[-1] - actual) < 2_000_000, (k, (asked[-1] - actual) / 1e6)
        assert abs(asked[0] - actual) < 2_000_000, (k, (asked[0] - actual) / 1e6)


def test_play_time_includes_the_output_delay_the_app_reports() -> None:
    clicks = click_train(RATE, 0.25, 4, start_s=0.2)
    app = AppOutput(ReceiverConfig(listen=False, playout=EXACT))
    s = app.add(encode(stereo(clicks.signal), FMT), FMT)
    app.run(0.5, 240)
    assert s.session is not None
    t = s.capture0_ns + int(clicks.onsets[1]) * 1_000_000_000 // RATE
    before = app.rx.play_time_ns(s.session.id, t)
    app.rx.fill(np.zeros((0, 2), np.int16), delay_ns=12_000_000)  # an engine reports its delay
    after = app.rx.play_time_ns(s.session.id, t)
    assert before is not None and after is not None
    assert after - before == 12_000_000
    assert app.rx.play_time_ns(999, t) is None  # no such sender
    app.close()


def test_the_output_delay_the_app_reports_is_in_every_streams_latency() -> None:
    """latency_ms runs to the DAC: the delay an engine gives fill() counts in it, as in play_time_ns."""
    p50 = []
    for delay_ns in (None, 12_000_000):
        app = AppOutput(ReceiverConfig(listen=False, playout=EXACT))
        app.add(tone_packets(1000, 1.0), FMT)
        app.rx.fill(np.zeros((0, 2), np.int16), delay_ns=delay_ns)  # kept for the fills that follow
        app.run(1.0, 240)
        p50.append(app.rx.snapshot().latency_ms_p50)
        app.close()
    assert p50[1] - p50[0] == pytest.approx(12.0, abs=0.001)


# ---- runtime controls -------------------------------------------------------------------------------------


def test_latency_target_and_ceiling_change_while_playing() -> None:
    packets = tone_packets(1000, 3.0)
    targets: dict[int, float] = {}

    def change(app: AppOutput, i: int) -> None:
        if i == RATE // 2:
            app.rx.set_latency(80)
        if i == RATE * 2:
            with pytest.raises(ConfigError, match=r"--latency 80: must be 0 to --max-latency \(40 ms\)"):
                app.rx.max_latency_ms = 40  # the fixed 80 ms could no longer be: refused
            app.rx.set_latency(None)
            app.rx.max_latency_ms = 40
        if i % (RATE // 4) == 0:
            targets[i] = app.rx.snapshot().target_ms

    out, app = run([packets], 3.0, before_pull=change)
    assert app.rx.latency_ms is None and app.rx.max_latency_ms == 40
    assert app.rx.snapshot().concealed == 0
    assert 0 < targets[RATE // 4] < 30  # auto, on a quiet simulated link
    assert targets[RATE * 3 // 4] == pytest.approx(80, abs=0.01)  # fixed, from the next pull on
    assert targets[RATE * 7 // 4] == pytest.approx(80, abs=0.01)
    assert 0 < targets[RATE * 11 // 4] <= 40  # auto again, under the new ceiling
    assert np.abs(out[RATE * 11 // 4 - 4800 : RATE * 11 // 4]).max() > 0.2  # still playing


def test_recording_starts_and_stops_while_playing(tmp_path: Path) -> None:
    packets = tone_packets(1000, 2.0)
    wav = tmp_path / "mid.wav"
    kept: list[int] = []

    def change(app: AppOutput, i: int) -> None:
        if i == RATE // 2:
            app.rx.start_recording(str(wav))
            kept.append(i)
        if i == RATE:
            assert app.rx.stop_recording() == str(wav)
            kept.append(i)

    out, app = run([packets], 1.5, before_pull=change)
    rec, info = read_wav(wav)
    assert (info.sample_rate, info.channels) == (RATE, 2)
    assert np.array_equal(rec, out[kept[0] : kept[1]])  # exactly what was played meanwhile
    assert app.rx.recording is None


def test_snapshot_rates_do_not_depend_on_who_else_reads() -> None:
    packets = tone_packets(1000, 4.0)
    fast: list[float] = []
    slow: list[float] = []

    def read(app: AppOutput, i: int) -> None:
        fast.append(app.rx.snapshot().bitrate_kbps)  # a GUI refreshing every 5 ms
        if i % RATE == 0:
            slow.append(app.rx.snapshot().bitrate_kbps)  # a logger once a second

    run([packets], 4.0, before_pull=read)
    true_kbps = sum(len(p) for p in packets) * 8 / 1000 / 4.0
    assert slow[-1] == pytest.approx(true_kbps, rel=0.05)
    assert slow[-1] == pytest.approx(fast[-1], rel=0.01)
    assert slow[-2] == pytest.approx(true_kbps, rel=0.05)


def test_an_opus_recording_starts_and_stops_mid_stream(tmp_path: Path) -> None:
    packets = tone_packets(1000, 2.0)
    path = tmp_path / "mid.opus"

    def change(app: AppOutput, i: int) -> None:
        if i == RATE // 2:
            app.rx.start_recording(str(path))
        if i == RATE:
            app.rx.stop_recording()

    run([packets], 1.5, before_pull=change)
    wav = tmp_path / "mid.wav"
    subprocess.run(["opusdec", "--quiet", "--rate", "48000", str(path), str(wav)], check=True, timeout=30)
    audio, info = read_wav(wav)
    # The packets that arrived while recording: half a second's worth, give or take a frame at each end.
    assert abs(info.frames - RATE // 2) <= 2 * 960
    assert level_db(audio[960:-960], 1000) == pytest.approx(-12.0, abs=0.5)
