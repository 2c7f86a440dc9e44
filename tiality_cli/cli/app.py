"""The ``tiality`` command line: parses options, runs library objects, presents their figures.

Heavy modules (grpc, numpy, sounddevice, alsaaudio, opuslib) are imported inside the commands so that
``tiality --help`` stays fast; tests/test_cli.py checks they are absent after it.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from typing import TYPE_CHECKING, Annotated

import typer
import typer.main
from typer import _click as click
from typer.core import TyperGroup

from tiality_cli.cli.common import (
    TlsCaOption,
    TlsCertOption,
    TlsKeyOption,
    TlsOption,
    TlsServerNameOption,
    TokenFileOption,
    TokenOption,
    _is_loopback,
    _kbps,
    _parse_channel_map,
    _parse_latency,
    _read_pem,
    _resolve_token,
    _stderr,
    _stronger,
    _typed,
    guarded,
    stop_on_signals,
)
from tiality_cli.cli.settings import ConfiguredCommand, RecvCommand, SendCommand, convert_plainly
from tiality_cli.config import DEFAULT_APPLICATION, DEFAULT_PORT
from tiality_cli.errors import ConfigError

if TYPE_CHECKING:
    from typer.models import CommandInfo

# gRPC's C core logs its own copy of errors we already report in one line; keep stderr to that line.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

FILE_LATENCY_MS = 60.0  # recv -o file: with --latency auto: a buffer no loopback or LAN jitter exceeds


class _RootGroup(TyperGroup):
    """``tiality --help`` in Click's plain layout: the Rich one imports ``typer.rich_utils`` (Rich's
    Markdown, Syntax, Columns...: about 50 ms, a quarter of the command's start-up) for a list of seven
    commands. Each command's own ``--help``, and every error, keep the Rich layout."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # --version, --help and the completion options (Typer adds them after __init__): no pydantic to
        # convert their values (settings.convert_plainly).
        for param in self.get_params(ctx):
            convert_plainly(param)
        rest: list[str] = super().parse_args(ctx, args)
        return rest

    def configured_commands(self) -> dict[str, click.Command]:
        """The commands that read a config section (send, recv), built. main() builds only the command it
        runs; the config files are checked against the options of all of these, so they are built here
        when a file exists (once: they join this group's commands)."""
        infos = [c for c in _ALL if _reads_config(c.cls)]
        missing = [c for c in infos if _command_name(c) not in self.commands]
        if missing:
            registered, app.registered_commands = app.registered_commands, missing
            try:
                built = typer.main.get_command(app)
            finally:
                app.registered_commands = registered
            self.commands.update(getattr(built, "commands", {}))
        return {name: self.commands[name] for name in map(_command_name, infos)}

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # As wide as the terminal (up to 120 columns, as Rich would be), so the commands' summaries fit.
        formatter.width = max(min(shutil.get_terminal_size().columns, 120) - 2, 50)
        mode, self.rich_markup_mode = self.rich_markup_mode, None
        try:
            super().format_help(ctx, formatter)
        finally:
            self.rich_markup_mode = mode


app = typer.Typer(
    cls=_RootGroup,
    name="tiality",
    help="Live audio from a robot's Raspberry Pi to its operator: capture, Opus, gRPC, adaptive playout.",
    epilog=(
        "Every option of send and recv can also be set by a TIALITY_<OPTION> variable or in "
        "~/.config/tiality/tiality.toml or /etc/tiality/tiality.toml ([send], [recv]); "
        "`tiality config` shows what is in effect."
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        print(f"tiality {version('tiality')}")
    except PackageNotFoundError:
        print("tiality (version unknown: the package is not installed)")
    raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True),
    ] = False,
) -> None:
    """Live audio from a robot's Raspberry Pi to its operator: capture, Opus, gRPC, adaptive playout."""


# ---------------------------------------------------------------------------------------------------------
# send
# ---------------------------------------------------------------------------------------------------------
@app.command(
    cls=SendCommand,
    epilog=(
        "Examples:\n\n"
        "  tiality send gui-host:50052                      # default mic, 48 kHz stereo, 20 ms Opus\n\n"
        "  tiality send 127.0.0.1:50052 -i file:speech.wav\n\n"
        "  tiality send 127.0.0.1:50052 -i tone://440 --seconds 5 --frame-ms 10 --bitrate 32\n\n"
        "  tiality send gui-host -i alsa://hw:1,0 --capture-channels 4 --channel-map 0,1\n\n"
        "  TIALITY_TARGET=gui-host:50052 TIALITY_FRAME_MS=10 tiality send   # or \\[send] in tiality.toml"
    ),
)
def send(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="Receiver as HOST:PORT (port defaults to 50052).")],
    input_: Annotated[
        str | None,
        typer.Option(
            "--input",
            "-i",
            help="tone://HZ, file:PATH.wav, alsa://DEVICE or sd://DEVICE.",
            show_default=False,
        ),
    ] = None,
    seconds: Annotated[
        float | None,
        typer.Option(
            help="Stop after this much audio, counted from the first connection: a receiver that is "
            "down at the start is waited for (--once gives up instead)."
        ),
    ] = None,
    frame_ms: Annotated[float, typer.Option(help="Packet duration: 2.5, 5, 10, 20, 40 or 60 ms.")] = 20.0,
    bitrate: Annotated[float, typer.Option(help="Opus bitrate in kbit/s (6-510).")] = 64.0,
    rate: Annotated[
        int, typer.Option(help="Stream sample rate: 8000, 12000, 16000, 24000 or 48000.")
    ] = 48_000,
    channels: Annotated[int, typer.Option(help="Encoded channels: 1 or 2.")] = 2,
    complexity: Annotated[
        int,
        typer.Option(
            help="Opus complexity 0-10. Lower saves CPU with --application audio or restricted-lowdelay, "
            "not with voip (the default): there 8-10 cost the same and 1-7 more."
        ),
    ] = 10,
    application: Annotated[
        str,
        typer.Option(
            help="voip (best speech quality at every bitrate), audio, or restricted-lowdelay "
            "(4 ms less delay, much worse speech below 64 kbit/s per channel)."
        ),
    ] = DEFAULT_APPLICATION,
    fec: Annotated[
        bool, typer.Option("--fec/--no-fec", help="Opus in-band FEC (needs --expected-loss > 0).")
    ] = False,
    expected_loss: Annotated[int, typer.Option(help="Expected packet loss %, steers FEC.")] = 0,
    dtx: Annotated[
        bool, typer.Option("--dtx/--no-dtx", help="Discontinuous transmission in silence.")
    ] = False,
    max_backlog: Annotated[
        float, typer.Option(help="Drop the oldest audio beyond this backlog (ms).")
    ] = 200.0,
    capture_channels: Annotated[
        int | None, typer.Option(help="Channels to open on the device (Pi mic array: 4).")
    ] = None,
    channel_map: Annotated[str | None, typer.Option(help="Device channels to encode, e.g. 0,1.")] = None,
    downmix: Annotated[bool, typer.Option(help="Average all captured channels instead of mapping.")] = False,
    json_: Annotated[
        bool, typer.Option("--json", help="JSON lines of figures, one a second, then a summary.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No live view; errors and the summary only.")
    ] = False,
    once: Annotated[bool, typer.Option(help="Give up on the first failure instead of reconnecting.")] = False,
    token: TokenOption = None,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    tls_server_name: TlsServerNameOption = None,
) -> None:
    """Capture audio, encode it as Opus and stream it to a receiver over gRPC.

    The sender reconnects by itself (capped backoff) when the receiver is down or the link breaks;
    capture carries on meanwhile and stale audio is dropped. A wrong token is final.
    """

    def body() -> None:
        from tiality_cli.cli.live import run_sender
        from tiality_cli.config import (
            AudioFormat,
            ClientSecurity,
            CodecConfig,
            frame_us_from_ms,
            parse_endpoint,
        )
        from tiality_cli.io.base import CaptureOptions
        from tiality_cli.io.sources import open_source
        from tiality_cli.sender import Sender, SenderConfig

        endpoint = parse_endpoint(target)
        fmt = AudioFormat(rate, channels, frame_us_from_ms(frame_ms)).validate_opus()
        codec = CodecConfig(
            bitrate=_kbps(bitrate),
            complexity=complexity,
            application=application,
            inband_fec=fec,
            dtx=dtx,
            packet_loss_perc=expected_loss or (10 if fec else 0),
        ).validate()
        if max_backlog <= 0:
            raise ConfigError(f"--max-backlog {max_backlog:g}: must be positive")
        uri = input_ or _default_input()
        capture = CaptureOptions(capture_channels, _parse_channel_map(channel_map), downmix)
        source = open_source(uri, fmt, capture)
        security = ClientSecurity(
            token=_resolve_token(
                token,
                token_file,
                typed=_typed(ctx, "token"),
                token_first=_stronger(ctx, "token", "token_file"),
            ),
            tls=tls or any((tls_ca, tls_cert, tls_key)),
            ca_pem=_read_pem(tls_ca, "--tls-ca"),
            cert_pem=_read_pem(tls_cert, "--tls-cert"),
            key_pem=_read_pem(tls_key, "--tls-key"),
            server_name=tls_server_name,
        )
        if (tls_cert is None) != (tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together (mutual TLS needs both)")
        config = SenderConfig(endpoint, codec, max_backlog, seconds, reconnect=not once, security=security)
        sender = Sender(source, config)
        wake = threading.Event()
        with stop_on_signals(wake) as stop:
            run_sender(sender, stop, json_=json_, quiet=quiet, wake=wake)

    guarded(body)


def _default_input() -> str:
    from tiality_cli.io import listing as devices

    return devices.default_input_uri()


def _default_output() -> str:
    from tiality_cli.io import listing as devices

    return devices.default_output_uri()


# ---------------------------------------------------------------------------------------------------------
# recv
# ---------------------------------------------------------------------------------------------------------
@app.command(
    cls=RecvCommand,
    epilog=(
        "Examples:\n\n"
        "  tiality recv                                     # port 50052, default speakers\n\n"
        "  tiality recv --port 50052 -o file:heard.wav --seconds 10\n\n"
        "  tiality recv -o null:// --json                   # figures only, JSON lines\n\n"
        "  tiality recv --once -o file:one-stream.wav       # exit when the first stream ends\n\n"
        "  tiality recv --record session.opus               # keep the received packets (Ogg Opus)\n\n"
        "  tiality recv --max-senders 64 --max-load 70      # many robots; mix within 70 % of real time\n\n"
        "  TIALITY_PORT=50060 tiality recv                  # or \\[recv] port = 50060 in tiality.toml"
    ),
)
def recv(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = DEFAULT_PORT,
    bind: Annotated[str, typer.Option(help="Local address to listen on (:: = all, IPv4 and IPv6).")] = "::",
    output: Annotated[
        str | None,
        typer.Option(
            "--output", "-o", help="sd://DEVICE, alsa://DEVICE, file:PATH.wav or null://.", show_default=False
        ),
    ] = None,
    seconds: Annotated[float | None, typer.Option(help="Exit after this much audio has been played.")] = None,
    once: Annotated[bool, typer.Option(help="Exit when the first stream ends.")] = False,
    latency: Annotated[
        str,
        typer.Option(
            help="Target buffer: 'auto' (follows jitter) or milliseconds. A file: output records every "
            f"sample exactly: 'auto' is then a fixed {FILE_LATENCY_MS:g} ms, with no resampling."
        ),
    ] = "auto",
    max_latency: Annotated[float, typer.Option(help="Ceiling for the buffer target (ms).")] = 200.0,
    resampler: Annotated[
        str,
        typer.Option(
            help="Drift compensation's converter (libsamplerate): sinc_fastest (exact to about 90 dB) or "
            "linear (about 7 x cheaper: many senders on one core; it dulls the top octaves by up to "
            "3 dB at 12 kHz, in a slow swing, and costs no PESQ after Opus). Also sinc_medium, sinc_best."
        ),
    ] = "sinc_fastest",
    rate: Annotated[
        int | None, typer.Option(help="Output rate (devices: 48000; files: the stream's).")
    ] = None,
    channels: Annotated[
        int | None, typer.Option(help="Output channels (devices: 2; files: the stream's).")
    ] = None,
    json_: Annotated[
        bool, typer.Option("--json", help="JSON lines of figures, one a second, then a summary.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No live view; errors and the summary only.")
    ] = False,
    record: Annotated[
        str | None,
        typer.Option(help="Also record: PATH.wav (what was played) or PATH.opus (the packets, as received)."),
    ] = None,
    max_senders: Annotated[int, typer.Option(help="Senders played at once (mixed); more are refused.")] = 8,
    exclusive: Annotated[bool, typer.Option(help="One sender at a time (--max-senders 1).")] = False,
    max_load: Annotated[
        float,
        typer.Option(
            help="Share of real time (%) mixing may take: beyond it recv warns, and refuses new senders "
            "once it carries as many as it can.",
            metavar="PCT",
        ),
    ] = 80.0,
    shed: Annotated[
        bool,
        typer.Option(
            help="Overloaded for 2-3 s by senders that joined since it last kept up (a burst before the "
            "load was known): end the newest of them (RESOURCE_EXHAUSTED) until it carries what it can. "
            "--no-shed keeps them all, every stream degraded.",
        ),
    ] = True,
    economy: Annotated[
        bool,
        typer.Option(
            help="Overloaded: first stop resampling for clock drift (correct it in 2.5 ms steps at quiet "
            "points instead), about a quarter off each stream's CPU; resample again once it fits. "
            "--no-economy always resamples.",
        ),
    ] = True,
    token: TokenOption = None,
    token_file: TokenFileOption = None,
    tls_cert: Annotated[str | None, typer.Option(help="Certificate (PEM) to serve TLS with.")] = None,
    tls_key: Annotated[str | None, typer.Option(help="Private key (PEM) of --tls-cert.")] = None,
    tls_client_ca: Annotated[
        str | None, typer.Option(help="Require client certificates signed by this CA (mutual TLS).")
    ] = None,
) -> None:
    """Receive streams, decode and play them through an adaptive jitter buffer, with live figures."""

    def body() -> None:
        from tiality_cli.cli.live import run_receiver
        from tiality_cli.config import AudioFormat, ServerSecurity, parse_port
        from tiality_cli.io.sinks import open_sink
        from tiality_cli.playout import PlayoutConfig
        from tiality_cli.receiver import Receiver, ReceiverConfig

        parse_port(str(port), "--port")
        uri = output or _default_output()
        if uri.startswith("app://"):
            raise ConfigError("-o app://: for programs that pull the audio themselves (Receiver.fill)")
        target = _parse_latency(latency)
        playout = PlayoutConfig(latency_ms=target, max_latency_ms=max_latency, resampler=resampler)
        if uri.startswith("file:"):
            # Nobody listens to a file while it is written, but every sample of it counts: a fixed buffer
            # (no target changes, so no latency steps) and no resampling keep the decoded audio intact.
            fixed = min(FILE_LATENCY_MS, max_latency) if target is None else target
            playout = PlayoutConfig(latency_ms=fixed, max_latency_ms=max_latency, drift_compensation=False)
        playout.validate()
        if seconds is not None and seconds <= 0:
            raise ConfigError(f"--seconds {seconds:g}: must be positive")
        fmt = None
        if rate is not None or channels is not None or uri.startswith(("sd://", "alsa://")):
            fmt = AudioFormat(rate or 48_000, channels or 2).validate_opus()
        sink = open_sink(uri, fmt)
        if (tls_cert is None) != (tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        if tls_client_ca and not tls_cert:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        if max_senders < 1:
            raise ConfigError(f"--max-senders {max_senders}: must be at least 1")
        security = ServerSecurity(
            token=_resolve_token(
                token,
                token_file,
                typed=_typed(ctx, "token"),
                token_first=_stronger(ctx, "token", "token_file"),
            ),
            cert_pem=_read_pem(tls_cert, "--tls-cert"),
            key_pem=_read_pem(tls_key, "--tls-key"),
            client_ca_pem=_read_pem(tls_client_ca, "--tls-client-ca"),
        )
        if not security.token and not security.tls and not _is_loopback(bind):
            _stderr().print(
                f"tiality: warning: listening on {bind} with neither --token nor TLS: anyone who can reach "
                "this port can play audio here (see docs/security.md)",
                markup=False,
                highlight=False,
                soft_wrap=True,  # one line, whatever the width: scripts and logs read it whole
            )
        config = ReceiverConfig(
            port=port,
            bind=bind,
            playout=playout,
            max_senders=1 if exclusive else max_senders,
            security=security,
            record=record,
            max_load_pct=max_load,
            shed=shed,
            economy=economy,
        )
        receiver = Receiver(sink, config)
        with stop_on_signals() as stop:
            run_receiver(receiver, stop, seconds=seconds, once=once, json_=json_, quiet=quiet)

    guarded(body)


# ---------------------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------------------
@app.command(
    epilog="Examples:\n\n  tiality demo\n\n  tiality demo --seconds 10 -o /tmp/demo.wav --json",
)
def demo(
    seconds: Annotated[float, typer.Option(help="How long to stream.")] = 5.0,
    output: Annotated[
        str, typer.Option("--output", "-o", help="WAV file for the received audio.")
    ] = "demo.wav",
    input_: Annotated[
        str, typer.Option("--input", "-i", help="The built-in signal, or any input URI.")
    ] = "tone://440",
    json_: Annotated[bool, typer.Option("--json", help="JSON lines instead of the live view.")] = False,
) -> None:
    """Stream a built-in signal through a sender and a receiver over loopback gRPC; write what arrives.

    Needs no sound hardware: the whole pipeline (Opus, gRPC, jitter buffer, playout) runs in one
    process and the received audio goes to a WAV file.
    """

    def body() -> None:
        from tiality_cli.cli.live import present
        from tiality_cli.cli.view import json_line, receiver_table
        from tiality_cli.config import AudioFormat, CodecConfig, Endpoint
        from tiality_cli.io.sinks import open_sink
        from tiality_cli.io.sources import open_source
        from tiality_cli.receiver import Receiver, ReceiverConfig
        from tiality_cli.sender import Sender, SenderConfig

        if seconds <= 0:
            raise ConfigError(f"--seconds {seconds:g}: must be positive")
        path = output.removeprefix("file:")
        sink = open_sink(f"file:{path}")
        receiver = Receiver(sink, ReceiverConfig(port=0, bind="127.0.0.1"))
        port = receiver.start()
        try:
            source = open_source(input_, AudioFormat())
            sender = Sender(source, SenderConfig(Endpoint("127.0.0.1", port), CodecConfig(), seconds=seconds))
            if not json_:
                _stderr().print(
                    f"tiality demo: {source.name} -> Opus -> gRPC 127.0.0.1:{port} -> playout -> {path}",
                    markup=False,
                    highlight=False,
                )
            with stop_on_signals() as stop:
                sender.start()
                present(
                    lambda: not sender.running,
                    stop,
                    on_stop=lambda: sender.stop(wait=False),
                    table=lambda: receiver_table(receiver.snapshot(), title="tiality demo"),
                    line=lambda: json_line(receiver.snapshot().as_dict()) if json_ else None,
                    json_=json_,
                    quiet=False,
                )
            sender.wait()  # re-raises what stopped it
            receiver.wait_for(streams_ended=1, timeout=5.0)
        finally:
            receiver.stop()
        snap = receiver.snapshot()
        played = sink.frames_written / (sink.format.sample_rate if sink.format else 48_000)
        if json_:
            print(
                json_line(snap.as_dict(), event="summary", output=path, played_s=round(played, 3)), flush=True
            )
            return
        from tiality_cli.cli.common import out_console

        console = out_console()
        console.print(receiver_table(snap, title="tiality demo: summary"))
        console.print(f"wrote {path}: {played:.2f} s of received audio", markup=False, highlight=False)

    guarded(body)


def _register_device_commands() -> None:
    from tiality_cli.cli import devices as cli_devices
    from tiality_cli.cli import doctor as cli_doctor
    from tiality_cli.cli import settings as cli_settings

    cli_devices.register(app)
    cli_doctor.register(app)
    cli_settings.register(app)


_register_device_commands()


# Every command, as registered at import (main() registers fewer while it runs).
_ALL: tuple[CommandInfo, ...] = tuple(app.registered_commands)


def _reads_config(cls: object) -> bool:
    return isinstance(cls, type) and issubclass(cls, ConfiguredCommand) and cls.section is not None


def _command_name(info: CommandInfo) -> str:
    assert info.callback is not None
    return info.name or typer.main.get_command_name(info.callback.__name__)


def main() -> None:
    """The console entry: builds only the command being run. Typer builds every registered command
    before it parses (it reads each function's signature and type hints: about 23 ms of the sender's
    start-up CPU here for the six it does not run). Anything else in first place (``--help``,
    ``--version``, a mistyped name, shell completion) gets them all, so lists and suggestions are whole."""
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    registered = app.registered_commands
    app.registered_commands = [c for c in _ALL if _command_name(c) == name] or list(_ALL)
    try:
        app()
    finally:
        app.registered_commands = registered
