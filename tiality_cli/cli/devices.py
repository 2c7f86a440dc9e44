"""The ``tiality devices`` and ``tiality loopback`` commands; ``register(app)`` adds them to the CLI.

    tiality devices [--json]                 ALSA cards and PCMs, PortAudio devices, and their -i/-o URIs
    tiality loopback [--live] [-i] [-o] ...  microphone self-test through Opus, with the codec's figures

The work is in ``tiality_cli/io/`` and ``loopback.py``; this module only maps options and presents results.
Errors go through ``cli.guarded`` (one stderr line, the error's exit code). numpy, sounddevice and
alsaaudio are imported inside the commands, so ``tiality --help`` loads none of them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from rich.progress import Progress
    from rich.table import Table

    from tiality_cli.io.base import CaptureOptions
    from tiality_cli.io.listing import DeviceList
    from tiality_cli.levelcheck import LevelVerdict
    from tiality_cli.loopback import LoopbackResult, ProgressFn

DEVICES_EPILOG = (
    "Examples:\n\n"
    "  tiality devices                                 # the URI to paste into -i / -o\n\n"
    "  tiality devices --json | jq -r '.input_uris[]'  # every URI that -i accepts"
)
LOOPBACK_EPILOG = (
    "Examples:\n\n"
    "  tiality loopback                        # 5 s from the default mic, then played back\n\n"
    "  tiality loopback -i alsa://plughw:1,0 -o sd://default --bitrate 32 --frame-ms 10\n\n"
    "  tiality loopback -i alsa://hw:1,0 --capture-channels 4 --channel-map 0,1\n\n"
    "  tiality loopback --live --seconds 0     # hear yourself through Opus until Ctrl-C\n\n"
    "  tiality loopback -i tone://440 -o file:round-trip.wav --json"
)
PROGRESS_METER_WIDTH = 24  # the level meter beside the progress bars


def register(app: typer.Typer) -> None:
    """Adds ``devices`` and ``loopback`` to the tiality app."""
    app.command("devices", epilog=DEVICES_EPILOG)(devices)
    app.command("loopback", epilog=LOOPBACK_EPILOG)(loopback)


# ----------------------------------------------------------------------------------------------------
# devices


def devices(
    json_: Annotated[bool, typer.Option("--json", help="Print the listing as JSON (for scripts).")] = False,
) -> None:
    """List sound devices (ALSA cards and PCMs, PortAudio devices) and the URI that selects each."""
    from tiality_cli.cli.common import guarded

    def body() -> None:
        from tiality_cli.io.listing import list_devices

        listing = list_devices()
        if json_:
            import json

            print(json.dumps(listing.as_dict(), indent=2))
            return
        from tiality_cli.cli.common import out_console

        console = out_console()
        for table in device_tables(listing):
            console.print(table)

    guarded(body)


def device_tables(listing: DeviceList) -> list[Table | str]:
    """Rich tables for a device listing: ALSA cards, ALSA PCMs, PortAudio devices (or why not)."""
    from rich.table import Table
    from rich.text import Text

    out: list[Table | str] = []
    if not listing.alsa.available:
        out.append(f"[bold]ALSA[/]: unavailable ({listing.alsa.detail})")
    elif not listing.cards:
        out.append(
            f"[bold]ALSA cards ({listing.alsa.detail})[/]: none (the PCMs below may reach a sound server)"
        )
    else:
        cards = Table(title=f"ALSA cards ({listing.alsa.detail})", title_justify="left")
        for col in ("Card", "Id", "Name", "Device", "In", "Out", "URIs"):
            cards.add_column(col, justify="right" if col in ("Card", "Device") else "left")
        for card in listing.cards:
            if not card.devices:
                cards.add_row(str(card.index), card.id, card.name, "-", "", "", "")
            for d in card.devices:
                cards.add_row(
                    str(card.index), card.id, card.name, f"{d.device}: {d.name}", _mark(d.capture),
                    _mark(d.playback), Text(" ".join(d.uris), style="cyan"),
                )  # fmt: skip
        out.append(cards)
    if listing.alsa.available:
        pcms = Table(title="ALSA PCMs (from the ALSA configuration)", title_justify="left")
        for col in ("URI", "In", "Out", "Description"):
            pcms.add_column(col)
        for p in listing.pcms:
            pcms.add_row(Text(p.uri, style="cyan"), _mark(p.capture), _mark(p.playback), p.description)
        out.append(pcms)
    if not listing.portaudio.available:
        out.append(f"[bold]PortAudio[/]: unavailable ({listing.portaudio.detail})")
    else:
        sd = Table(title=f"PortAudio devices ({listing.portaudio.detail})", title_justify="left")
        for col in ("#", "Name", "Host API", "In ch", "Out ch", "Rate", "Default", "URIs"):
            sd.add_column(col, justify="right" if col in ("#", "In ch", "Out ch", "Rate") else "left")
        for s in listing.sd_devices:
            default = " ".join(w for w, on in (("in", s.default_input), ("out", s.default_output)) if on)
            uris = list(dict.fromkeys([*s.input_uris, *s.output_uris]))
            sd.add_row(
                str(s.index), s.name, s.hostapi, str(s.max_input_channels), str(s.max_output_channels),
                f"{s.default_samplerate:g}", Text(default, style="bold green"),
                Text(" ".join(uris), style="cyan"),
            )  # fmt: skip
        out.append(sd)
    return out


def _mark(flag: bool) -> str:
    return "✓" if flag else ""


# ----------------------------------------------------------------------------------------------------
# loopback


def loopback(
    seconds: Annotated[
        float, typer.Option(help="Audio to record (with --live: to run; 0 = until Ctrl-C).")
    ] = 5.0,
    live: Annotated[
        bool,
        typer.Option("--live", help="Play the input through Opus in real time, and measure the latency."),
    ] = False,
    input_: Annotated[
        str | None,
        typer.Option(
            "--input",
            "-i",
            help="alsa://DEVICE, sd://DEVICE, tone://HZ or file:PATH.wav.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output", "-o", help="sd://DEVICE, alsa://DEVICE, file:PATH.wav or null://.", show_default=False
        ),
    ] = None,
    bitrate: Annotated[float, typer.Option(help="Opus bitrate in kbit/s (6-510).")] = 64.0,
    frame_ms: Annotated[float, typer.Option(help="Packet duration: 2.5, 5, 10, 20, 40 or 60 ms.")] = 20.0,
    rate: Annotated[int, typer.Option(help="Sample rate: 8000, 12000, 16000, 24000 or 48000.")] = 48_000,
    channels: Annotated[int, typer.Option(help="Encoded channels: 1 or 2.")] = 2,
    capture_channels: Annotated[
        int | None, typer.Option(help="Channels to open on the device (Pi mic array: 4).")
    ] = None,
    channel_map: Annotated[str | None, typer.Option(help="Device channels to encode, e.g. 0,1.")] = None,
    downmix: Annotated[bool, typer.Option(help="Average all captured channels instead of mapping.")] = False,
    json_: Annotated[
        bool, typer.Option("--json", help="Print the figures as JSON, without progress.")
    ] = False,
) -> None:
    """Microphone self-test: record, encode and decode with Opus, play back; show the codec's figures.

    Reports the bitrate, packet sizes, encode and decode time per frame, and the input level.

    With --live the input goes through Opus to the output continuously, and the latency is measured.
    """
    from tiality_cli.cli.common import _parse_channel_map, guarded, stop_on_signals

    def body() -> None:
        from tiality_cli.config import AudioFormat, CodecConfig, frame_us_from_ms
        from tiality_cli.errors import ConfigError
        from tiality_cli.io import listing as devices
        from tiality_cli.io.base import CaptureOptions
        from tiality_cli.io.sinks import open_sink
        from tiality_cli.io.sources import open_source
        from tiality_cli.loopback import run_live, run_loopback

        if seconds < 0 or (seconds == 0 and not live) or not math.isfinite(seconds):
            raise ConfigError(f"--seconds {seconds:g}: must be positive (0 only with --live)")
        fmt = AudioFormat(rate, channels, frame_us_from_ms(frame_ms)).validate_opus()
        codec = CodecConfig(bitrate=round(bitrate * 1000)).validate()
        capture = CaptureOptions(capture_channels, _parse_channel_map(channel_map), downmix)
        # Both ends are opened (and checked) before anything is recorded.
        source = open_source(input_ or devices.default_input_uri(), fmt, capture)
        try:
            sink = open_sink(output or devices.default_output_uri(), fmt)
        except BaseException:
            source.close()
            raise
        try:
            with _Display(quiet=json_) as display:
                if live:
                    display.say(
                        f"Live: {source.name} -> Opus {bitrate:g} kbit/s -> {sink.name}. Ctrl-C stops."
                    )
                    with stop_on_signals() as stop:
                        result = run_live(
                            source, sink, seconds or None, codec, display.task("live", seconds), stop=stop
                        )
                else:
                    display.say(f"Recording {seconds:g} s from {source.name} (speak now)")
                    record_cb = display.task("recording", seconds)
                    play_cb = display.task("playing", seconds, start=False)
                    result = run_loopback(source, sink, seconds, codec, record_cb, play_cb)
        finally:
            sink.close()
        verdict = input_verdict(result, source.name, fmt.channels, capture)
        if json_:
            out = result.as_dict()
            out["input_check"] = {"status": verdict.status, "detail": verdict.detail, "fix": verdict.fix}
            import json

            print(json.dumps(out, indent=2))
        else:
            from tiality_cli.cli.common import out_console

            out_console().print(result_table(result))
        if verdict.status != "pass":  # on stderr, also with --json: the figures stay parseable
            from tiality_cli.cli.common import _stderr

            _stderr().print(
                f"tiality loopback: warning: input {verdict.detail}. Fix: {verdict.fix}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )

    guarded(body)


def input_verdict(
    result: LoopbackResult, uri: str, stream_channels: int, capture: CaptureOptions
) -> LevelVerdict:
    """Is the recorded input silent or clipped? Channels are named as ``--channel-map`` numbers them."""
    from dataclasses import replace

    from tiality_cli.io.routing import resolve_capture
    from tiality_cli.levelcheck import assess_levels

    device = uri.startswith(("alsa://", "sd://"))
    router = resolve_capture(result.format, capture) if device else None
    if router is not None and not router.downmix:
        labels = list(router.channel_map)
    else:
        labels = list(range(stream_channels))
    levels = [replace(lv, channel=labels[i]) for i, lv in enumerate(result.channels)]
    if router is not None and router.downmix:
        levels = levels[:1]  # every stream channel is the same average
        labels = labels[:1]
    unique = list({lv.channel: lv for lv in levels}.values())
    return assess_levels(unique, labels, stream_channels, downmix=router is not None and router.downmix)


def result_table(result: LoopbackResult) -> Table:
    """The loopback figures as a two-column Rich table."""
    from rich.table import Table

    c = result.codec
    t = Table(title=f"tiality loopback ({result.mode})", title_justify="left")
    t.add_column("Figure")
    t.add_column("Value", justify="right")
    rows = [
        ("input", result.source),
        ("output", result.sink),
        ("format", result.format.describe()),
        ("recorded / played", f"{result.recorded_s:.3f} s / {result.played_s:.3f} s"),
        ("input level peak / RMS", f"{result.input_peak_dbfs:.1f} / {result.input_rms_dbfs:.1f} dBFS"),
        ("bitrate set / measured", f"{result.config.bitrate / 1000:g} / {c.bitrate_kbps:.1f} kbit/s"),
        (
            "packet min / mean / max",
            f"{c.packet_bytes_min} / {c.packet_bytes_mean:.1f} / {c.packet_bytes_max} B",
        ),
        ("encode median / p95", f"{c.encode_us_median:.0f} / {c.encode_us_p95:.0f} µs per frame"),
        ("decode median / p95", f"{c.decode_us_median:.0f} / {c.decode_us_p95:.0f} µs per frame"),
        ("overruns / underruns", f"{result.overruns} / {result.underruns}"),
    ]
    if result.latency is not None:
        lat = result.latency
        rows.append(
            ("latency median / p95 / max", f"{lat.median_ms:.1f} / {lat.p95_ms:.1f} / {lat.max_ms:.1f} ms")
        )
    if result.mode == "live":
        rows.append(("starved / dropped frames", f"{result.starved_frames} / {result.dropped_frames}"))
        rows.append(("mic clock against speaker", f"{result.drift_ppm:+.0f} ppm"))
    for name, value in rows:
        t.add_row(name, value)
    return t


class _Display:
    """Progress bars with a level meter, on stderr; nothing at all when ``quiet`` (JSON output)."""

    def __init__(self, quiet: bool) -> None:
        self._progress: Progress | None = None
        if not quiet:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            self._progress = Progress(
                TextColumn("{task.description:<10}"),
                BarColumn(),
                TextColumn("{task.completed:5.1f} s"),
                TextColumn("{task.fields[meter]}"),
                console=Console(stderr=True, highlight=False),
            )

    def __enter__(self) -> _Display:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def say(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)

    def task(self, name: str, seconds: float, start: bool = True) -> ProgressFn | None:
        """A progress callback for one phase (it starts the phase's bar on its first call)."""
        progress = self._progress
        if progress is None:
            return None
        from tiality_cli.cli.view import level_meter, markup

        task_id = progress.add_task(name, total=seconds or None, start=start, meter="")

        def update(done_s: float, peak: float, rms: float) -> None:
            if not progress.tasks[task_id].started:
                progress.start_task(task_id)
            meter = markup(level_meter(rms, peak, PROGRESS_METER_WIDTH))
            progress.update(task_id, completed=done_s, meter=meter)

        return update
