"""Real sound devices through the virtual sound card: capture, playback, listing and error messages.

Each capture test plays a known stereo signal into the ``mic`` sink and reads it back from alsa://tmic
or sd://tmic; each playback test has ``fill`` produce a known signal into alsa://tspk or sd://tspk and
records spk.monitor. The two are aligned by cross-correlation and compared sample for sample (the
card is lossless), so a lost, repeated or swapped block fails the test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
import typer
from typer.testing import CliRunner

from tests.helpers.signals import align, correlation, find_dropouts, snr_db, trim_aligned, white_noise
from tests.helpers.soundcard import RATE, VirtualSoundCard, wait_until
from tiality_cli.cli.devices import register
from tiality_cli.clock import SYSTEM_CLOCK
from tiality_cli.config import AudioFormat
from tiality_cli.errors import ConfigError, DeviceError
from tiality_cli.io.base import CaptureOptions, split_uri
from tiality_cli.io.listing import list_devices, parse_proc_asound_pcm
from tiality_cli.io.routing import ChannelRouter, resolve_capture
from tiality_cli.io.sinks import open_playback, open_sink
from tiality_cli.io.sources import open_capture, open_source

FMT = AudioFormat(RATE, 2, 20_000)
I16 = npt.NDArray[np.int16]


def stereo_noise(seconds: float, level_dbfs: float = -12.0) -> I16:
    """Different noise in each channel, so a swapped or mixed channel shows."""
    n = round(seconds * RATE)
    left = white_noise(n, level_dbfs, seed=1)[:, 0]
    right = white_noise(n, level_dbfs, seed=2)[:, 0]
    return np.round(np.stack([left, right], axis=1) * 32767).astype(np.int16)


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text
    return text


# ----------------------------------------------------------------------------------------------------
# channel routing (no sound card)


def test_router_maps_and_downmixes_without_changing_samples() -> None:
    src = np.arange(12, dtype=np.int16).reshape(3, 4) * 1000  # 3 samples x 4 device channels
    out = np.zeros((3, 2), dtype=np.int16)
    resolve_capture(FMT, CaptureOptions(capture_channels=4, channel_map=(2, 0))).route(src, out)
    assert out.tolist() == [[2000, 0], [6000, 4000], [10000, 8000]]
    resolve_capture(FMT, CaptureOptions(capture_channels=4, downmix=True)).route(src, out)
    assert out.tolist() == [[1500, 1500], [5500, 5500], [9500, 9500]]
    router = resolve_capture(FMT, CaptureOptions())
    assert router.identity and router.device_channels == 2
    assert resolve_capture(FMT, CaptureOptions(channel_map=(3, 1))).device_channels == 4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (CaptureOptions(channel_map=(0,)), r"--channel-map 0: needs 2 device channel\(s\)"),
        (CaptureOptions(capture_channels=2, channel_map=(0, 2)), "channel 2 does not exist in 2 captured"),
        (CaptureOptions(channel_map=(0, 1), downmix=True), "--downmix and --channel-map exclude each other"),
        (CaptureOptions(capture_channels=1), "--capture-channels 1: fewer than the 2 stream channels; add"),
    ],
)
def test_bad_capture_options_name_the_option(options: CaptureOptions, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_capture(FMT, options)


def test_router_downmix_keeps_full_scale_in_range() -> None:
    src = np.full((4, 4), -32768, dtype=np.int16)
    out = np.zeros((4, 1), dtype=np.int16)
    ChannelRouter(4, (0,), True, 4).route(src, out)
    assert (out == -32768).all()


def test_card_devices_are_read_like_arecord_l() -> None:
    text = (
        "00-00: ALC3246 Analog : ALC3246 Analog : playback 1 : capture 1\n"
        "00-03: HDMI 0 : HDMI 0 : playback 1\n"
        "01-00: USB Audio : USB Audio : capture 1\n"
    )
    devices = parse_proc_asound_pcm(text)
    assert [(d.card, d.device, d.name, d.capture, d.playback) for d in devices] == [
        (0, 0, "ALC3246 Analog", True, True),
        (0, 3, "HDMI 0", False, True),
        (1, 0, "USB Audio", True, False),
    ]
    assert devices[2].uris == ("alsa://hw:1,0", "alsa://plughw:1,0")


# ----------------------------------------------------------------------------------------------------
# capture


def expected_swap(x: I16) -> I16:
    return x[:, ::-1]


def expected_mix(x: I16) -> I16:
    mono = np.floor_divide(x.astype(np.int32).sum(axis=1), 2).astype(np.int16)
    return np.stack([mono, mono], axis=1)


@pytest.mark.parametrize(
    ("uri", "options", "expected"),
    [
        ("alsa://tmic", CaptureOptions(), None),
        ("sd://tmic", CaptureOptions(), None),
        ("alsa://tmic", CaptureOptions(channel_map=(1, 0)), expected_swap),
        ("sd://tmic", CaptureOptions(downmix=True), expected_mix),
    ],
)
def test_capture_returns_what_the_mic_played(
    sound_card: VirtualSoundCard, uri: str, options: CaptureOptions, expected: Callable[[I16], I16] | None
) -> None:
    signal = stereo_noise(1.0)
    want = signal if expected is None else expected(signal)
    source = open_source(uri, FMT, options)
    frames: list[I16] = []
    stamps: list[int] = []
    frame = np.zeros((FMT.frame_samples, 2), dtype=np.int16)
    source.open()
    player: subprocess.Popen[bytes] | None = None
    tail = 0
    try:
        while tail < 15 and len(frames) < 250:  # until 300 ms after the player has finished (5 s cap)
            t = source.read(frame)
            assert t is not None
            frames.append(frame.copy())
            stamps.append(t)
            if player is None:
                player = sound_card.play_into_mic(signal)
            elif player.poll() is not None:
                tail += 1
    finally:
        source.close()
        if player is not None:
            player.wait(10)
    got = np.concatenate(frames)
    lag = align(want, got, len(got))
    ref, rec = trim_aligned(want, got, lag)
    assert len(ref) == len(want), "part of the signal was not captured"
    assert snr_db(ref, rec, match_gain=False) > 60  # the virtual card is lossless: a copy
    for ch in range(2):
        assert correlation(ref[:, ch], rec[:, ch]) > 0.999
    assert find_dropouts(rec, RATE, min_ms=1.0) == []
    assert source.overruns == 0
    steps_ms = np.diff(stamps) / 1e6
    assert np.median(steps_ms) == pytest.approx(20.0, abs=0.5)
    assert (
        abs(stamps[-1] - stamps[0] - (len(stamps) - 1) * FMT.frame_ns) < 20_000_000
    )  # no drift beyond a frame


def test_close_from_another_thread_ends_a_blocked_read(sound_card: VirtualSoundCard) -> None:
    source = open_source("alsa://tmic", FMT)
    source.open()
    frame = np.zeros((FMT.frame_samples, 2), dtype=np.int16)
    results: list[int | None] = []

    def reader() -> None:
        while True:
            t = source.read(frame)
            results.append(t)
            if t is None:
                return

    thread = threading.Thread(target=reader)
    thread.start()
    wait_until(lambda: len(results) >= 3, 5.0, "three frames")
    source.close()
    thread.join(2.0)
    assert not thread.is_alive()
    assert results[-1] is None and all(t is not None for t in results[:-1])


# ----------------------------------------------------------------------------------------------------
# playback


@pytest.mark.parametrize("uri", ["sd://tspk", "alsa://tspk"])
def test_playback_plays_exactly_what_fill_produced(sound_card: VirtualSoundCard, uri: str) -> None:
    signal = stereo_noise(1.0)
    rec = sound_card.recorder().wait_started()
    sink = open_sink(uri, FMT)
    assert sink.format == FMT
    pos = 0
    finished = threading.Event()
    sizes: set[int] = set()

    def fill(buf: I16) -> bool:
        nonlocal pos
        sizes.add(len(buf))
        take = min(len(buf), len(signal) - pos)
        buf[:take] = signal[pos : pos + take]
        buf[take:] = 0
        pos += take
        if take == 0:
            finished.set()
        return take > 0

    start = rec.frames
    sink.start(fill)
    try:
        assert finished.wait(5.0)
        rec.wait_frames(start + len(signal) + RATE // 5)  # everything, and 200 ms after it
    finally:
        sink.stop()
        sink.close()
    got = rec.stop()[start:]
    lag = align(signal, got, len(got) - len(signal))
    ref, out = trim_aligned(signal, got, lag)
    assert len(ref) == len(signal)
    assert snr_db(ref, out, match_gain=False) > 60
    for ch in range(2):
        assert correlation(ref[:, ch], out[:, ch]) > 0.999
    assert find_dropouts(out, RATE, min_ms=1.0) == []
    assert sink.frames_written == len(signal)
    assert sink.underruns == 0
    period = FMT.frame_samples // 4  # both sinks pull 5 ms blocks
    assert sizes == {period}


def test_sink_reopens_at_another_format(sound_card: VirtualSoundCard) -> None:
    sink = open_playback("sd://", "tspk", FMT, SYSTEM_CLOCK)
    try:
        sink.open(FMT.with_(channels=1, sample_rate=16_000))
        assert sink.format == AudioFormat(16_000, 1, 20_000)
    finally:
        sink.close()


# ----------------------------------------------------------------------------------------------------
# listing


def test_list_devices_shows_the_virtual_card_with_uris_that_open(sound_card: VirtualSoundCard) -> None:
    listing = list_devices()
    assert listing.alsa.available and listing.portaudio.available
    pcms = {p.name: p for p in listing.pcms}
    assert pcms["tmic"].description == "virtual mic" and pcms["tmic"].uri == "alsa://tmic"
    assert pcms["tspk"].description == "virtual speaker" and pcms["tspk"].playback
    sd = {d.name: d for d in listing.sd_devices}
    assert {"tmic", "tspk"} <= sd.keys()
    assert sd["tmic"].input_uris == (f"sd://{sd['tmic'].index}", "sd://tmic")
    assert sd["tspk"].output_uris == (f"sd://{sd['tspk'].index}", "sd://tspk")
    assert sum(d.default_input for d in listing.sd_devices) == 1
    inputs, outputs = listing.input_uris(), listing.output_uris()
    assert {"alsa://tmic", "sd://tmic", *sd["tmic"].input_uris} <= set(inputs)
    assert {"alsa://tspk", "sd://tspk", *sd["tspk"].output_uris} <= set(outputs)
    for uri in ["alsa://tmic", *sd["tmic"].input_uris]:
        source = open_source(uri, FMT)
        source.open()
        assert source.read(np.zeros((FMT.frame_samples, 2), dtype=np.int16)) is not None
        source.close()
    for uri in ["alsa://tspk", *sd["tspk"].output_uris]:
        open_sink(uri, FMT).close()
    data = json.loads(json.dumps(listing.as_dict()))
    assert data["input_uris"] == inputs and data["portaudio"]["available"] is True


def test_devices_command_prints_tables_and_json(sound_card: VirtualSoundCard) -> None:
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})
    result = runner.invoke(app, ["devices"])
    assert result.exit_code == 0, result.output
    assert "alsa://tmic" in result.stdout and "virtual mic" in result.stdout and "sd://tspk" in result.stdout
    result = runner.invoke(app, ["devices", "--json"])
    assert result.exit_code == 0
    assert "alsa://tspk" in json.loads(result.stdout)["output_uris"]


# ----------------------------------------------------------------------------------------------------
# errors: one line, naming the device, listing what would work


def open_uri(uri: str, capture: CaptureOptions | None = None) -> None:
    scheme, rest = split_uri(uri)
    if capture is not None:
        open_capture(scheme, rest, FMT, capture, SYSTEM_CLOCK).close()
    else:
        open_playback(scheme, rest, FMT, SYSTEM_CLOCK).close()


@pytest.mark.parametrize(
    ("uri", "capture", "reason"),
    [
        ("alsa://nosuch", True, "alsa://nosuch: no such ALSA device; capture devices: "),
        ("alsa://hw:7,0", False, "alsa://hw:7,0: no such ALSA device; playback devices: "),
        ("sd://nosuch", True, "sd://nosuch: no PortAudio input device matches 'nosuch'; capture devices: "),
        ("sd://99", False, "sd://99: no PortAudio output device number 99; playback devices: "),
    ],
)
def test_missing_device_lists_working_ones(
    sound_card: VirtualSoundCard, uri: str, capture: bool, reason: str
) -> None:
    with pytest.raises(DeviceError) as info:
        open_uri(uri, CaptureOptions() if capture else None)
    text = one_line(info.value)
    assert text.startswith(reason)
    assert "alsa://tmic" in text and "alsa://tspk" in text and "sd://" in text
    assert "alsa://lavrate" not in text  # helper plugins are not offered as devices
    first = text.split(": ", 2)[2].split(", ")[0]
    assert first.startswith(uri[: uri.index("//") + 2])  # the same backend's devices come first
    assert info.value.exit_code == 3


@pytest.mark.parametrize("uri", ["alsa://tmic", "sd://tmic"])
def test_unsupported_channel_count_says_what_the_device_offers(
    sound_card: VirtualSoundCard, uri: str
) -> None:
    with pytest.raises(DeviceError) as info:
        open_uri(uri, CaptureOptions(capture_channels=64))
    text = one_line(info.value)
    offered = "(the device offers 1-32)" if uri.startswith("alsa") else "(max 32)"
    assert text.startswith(f"{uri}: cannot capture 64 channel(s) {offered}; capture devices: ")


def test_ambiguous_name_lists_the_matches(sound_card: VirtualSoundCard) -> None:
    with pytest.raises(DeviceError) as info:
        open_uri("sd://t", CaptureOptions())
    text = one_line(info.value)
    assert text.startswith("sd://t: ")
    assert "input devices match 't': " in text and "(tmic)" in text and "(tspk)" in text
    assert text.endswith("name one exactly or by number")


def test_busy_devices_say_so(sound_card: VirtualSoundCard, monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy hw device cannot be made on a virtual card: the backends' own errors are injected."""
    import alsaaudio
    import sounddevice

    def busy_pcm(*args: object, **kwargs: object) -> None:
        raise alsaaudio.ALSAAudioError("Device or resource busy [hw:1,0]")

    monkeypatch.setattr(alsaaudio, "PCM", busy_pcm)
    with pytest.raises(DeviceError) as info:
        open_uri("alsa://hw:1,0", CaptureOptions())
    assert one_line(info.value).startswith("alsa://hw:1,0: busy: another program is using it")
    assert "sd://" in str(info.value)

    def busy_stream(*args: object, **kwargs: object) -> None:
        raise sounddevice.PortAudioError("Error opening OutputStream: Device unavailable", -9985)

    monkeypatch.setattr(sounddevice, "OutputStream", busy_stream)
    with pytest.raises(DeviceError) as info:
        open_uri("sd://tspk")
    assert one_line(info.value).startswith("sd://tspk: busy or unavailable")


# ----------------------------------------------------------------------------------------------------
# missing backends, lazy imports (subprocesses: they must not see this process's modules)


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_listing_survives_missing_backends() -> None:
    out = run_python(
        "import sys, json\n"
        "sys.modules['sounddevice'] = None\n"  # import fails as when PortAudio/sounddevice is missing
        "sys.modules['alsaaudio'] = None\n"
        "from tiality_cli.io.listing import list_devices\n"
        "from tiality_cli.io.sinks import open_playback\n"
        "from tiality_cli.config import AudioFormat\n"
        "from tiality_cli.clock import SYSTEM_CLOCK\n"
        "from tiality_cli.errors import DeviceError\n"
        "d = list_devices()\n"
        "print(json.dumps([d.alsa.available, d.alsa.detail, d.portaudio.available, d.portaudio.detail]))\n"
        "try:\n"
        "    open_playback('sd://', 'x', AudioFormat(), SYSTEM_CLOCK)\n"
        "except DeviceError as exc:\n"
        "    print(exc)\n"
    )
    first, error = out.splitlines()
    alsa_ok, alsa_why, pa_ok, pa_why = json.loads(first)
    assert not alsa_ok and alsa_why.startswith("ALSA unavailable: ")
    assert not pa_ok and pa_why.startswith("PortAudio unavailable: ") and "libportaudio2" in pa_why
    assert error.startswith("PortAudio unavailable: ")


def test_help_and_registration_load_no_audio_backend() -> None:
    out = run_python(
        "import sys, typer\n"
        "from tiality_cli.cli.devices import register\n"
        "app = typer.Typer()\n"
        "app.callback()(lambda: None)\n"
        "register(app)\n"
        "for args in (['--help'], ['devices', '--help'], ['loopback', '--help']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('HEAVY', [m for m in ('numpy', 'sounddevice', 'alsaaudio', 'opuslib') if m in sys.modules])\n"
    )
    assert "HEAVY []" in out
    assert "tiality loopback --live --seconds 0" in out and "tiality devices --json" in out
