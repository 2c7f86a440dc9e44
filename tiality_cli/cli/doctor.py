"""``tiality doctor [HOST:PORT]``: a pre-mission check of the whole audio path, with a fix per line.

The checks are ``tiality_cli/doctor.py``'s; this module maps the options (the same names, variables and
config-file keys as send's and recv's) and prints the report: a table of checks, a table of latency
stages, or with ``--json`` one JSON document. Exit status: 0 all passed, 1 a warning, 2 a failure.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from tiality_cli.cli.common import (
    TlsCaOption,
    TlsCertOption,
    TlsKeyOption,
    TlsOption,
    TlsServerNameOption,
    TokenFileOption,
    TokenOption,
)
from tiality_cli.cli.settings import ConfiguredCommand
from tiality_cli.config import DEFAULT_APPLICATION

if TYPE_CHECKING:
    from rich.table import Table

    from tiality_cli.doctor import Report

SHARED_WITH_SEND = frozenset(
    {
        "target", "input", "capture_channels", "channel_map", "downmix", "rate", "channels", "frame_ms",
        "application", "fec", "token", "token_file", "tls", "tls_ca", "tls_cert", "tls_key",
        "tls_server_name",
    }
)  # fmt: skip
SHARED_WITH_RECV = frozenset({"output"})
MARKS = {
    "pass": ("✓ pass", "green"),
    "warn": ("! warn", "yellow"),
    "fail": ("✗ fail", "bold red"),
    "skip": ("- skip", "dim"),
}

DOCTOR_EPILOG = (
    "Checks, each with a fix: the input opens and is neither silent nor clipped over 2 s (naming the "
    "channel), the output opens and plays; with HOST:PORT the name resolves, the port is open, the "
    "receiver answers gRPC health SERVING, TLS verifies, the token is accepted, and the clock offset and "
    "round trip. Then the expected delay, stage by stage.\n\n"
    "Exit status: 0 every check passed, 1 a warning, 2 a failure (or a bad option).\n\n"
    "Examples:\n\n"
    "  tiality doctor gui-host:50052                   # on the robot: mic, speaker, network, token\n\n"
    "  tiality doctor gui-host:50052 --no-output -i alsa://hw:1,0 --capture-channels 4 --channel-map 0,1\n\n"
    "  tiality doctor --no-input                       # on the operator's computer: the speakers\n\n"
    "  tiality doctor gui-host:50052 --json | jq '.checks[] | select(.status != \"pass\")'"
)


class DoctorCommand(ConfiguredCommand):
    """Takes send's and recv's variables and config values for the options it shares with them."""

    borrow = (("send", SHARED_WITH_SEND), ("recv", SHARED_WITH_RECV))
    env_keys = SHARED_WITH_SEND | SHARED_WITH_RECV


def register(app: typer.Typer) -> None:
    """Adds ``doctor`` to the tiality app."""
    app.command("doctor", cls=DoctorCommand, epilog=DOCTOR_EPILOG)(doctor)


def doctor(
    ctx: typer.Context,
    target: Annotated[
        str | None,
        typer.Argument(help="The receiver as HOST:PORT, to check the network, TLS and the token too."),
    ] = None,
    input_: Annotated[
        str | None,
        typer.Option("--input", "-i", help="Input as send uses it (default: send's).", show_default=False),
    ] = None,
    capture_channels: Annotated[
        int | None, typer.Option(help="Channels to open on the device (Pi mic array: 4).")
    ] = None,
    channel_map: Annotated[str | None, typer.Option(help="Device channels to encode, e.g. 0,1.")] = None,
    downmix: Annotated[bool, typer.Option(help="Average all captured channels instead of mapping.")] = False,
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="Output as recv uses it (default: recv's).", show_default=False),
    ] = None,
    no_input: Annotated[
        bool, typer.Option("--no-input", help="Skip the input (the operator's side).")
    ] = False,
    no_output: Annotated[
        bool, typer.Option("--no-output", help="Skip the output (a robot without a speaker).")
    ] = False,
    rate: Annotated[int, typer.Option(help="Stream sample rate, as send's --rate.")] = 48_000,
    channels: Annotated[int, typer.Option(help="Encoded channels, as send's --channels.")] = 2,
    frame_ms: Annotated[float, typer.Option(help="Packet duration, as send's --frame-ms.")] = 20.0,
    application: Annotated[str, typer.Option(help="Opus application, as send's.")] = DEFAULT_APPLICATION,
    fec: Annotated[bool, typer.Option("--fec/--no-fec", help="Opus in-band FEC, as send's.")] = False,
    listen: Annotated[float, typer.Option(help="Seconds to listen to the input.")] = 2.0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the receiver.")] = 3.0,
    token: TokenOption = None,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    tls_server_name: TlsServerNameOption = None,
    json_: Annotated[bool, typer.Option("--json", help="One JSON document: every check and stage.")] = False,
) -> None:
    """Check the whole audio path before a mission: will audio work, and how much delay to expect?"""
    from tiality_cli.cli.common import (
        _parse_channel_map,
        _read_pem,
        _resolve_token,
        _stderr,
        _stronger,
        guarded,
    )

    def body() -> Report:
        from tiality_cli.config import (
            AudioFormat,
            ClientSecurity,
            CodecConfig,
            frame_us_from_ms,
            parse_endpoint,
        )
        from tiality_cli.doctor import DoctorOptions, run
        from tiality_cli.errors import ConfigError
        from tiality_cli.io import listing
        from tiality_cli.io.base import CaptureOptions
        from tiality_cli.io.routing import resolve_capture

        fmt = AudioFormat(rate, channels, frame_us_from_ms(frame_ms)).validate_opus()
        codec = CodecConfig(
            application=application, inband_fec=fec, packet_loss_perc=10 if fec else 0
        ).validate()
        capture = CaptureOptions(capture_channels, _parse_channel_map(channel_map), downmix)
        resolve_capture(fmt, capture)  # a bad --channel-map is a usage error, before anything runs
        if not listen > 0:
            raise ConfigError(f"--listen {listen:g}: must be positive")
        if not timeout > 0:
            raise ConfigError(f"--timeout {timeout:g}: must be positive")
        if (tls_cert is None) != (tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together (mutual TLS needs both)")
        endpoint = parse_endpoint(target) if target else None
        security = ClientSecurity(
            token=_resolve_token(
                token, token_file, typed=False, token_first=_stronger(ctx, "token", "token_file")
            ),
            tls=tls or any((tls_ca, tls_cert, tls_key)),
            ca_pem=_read_pem(tls_ca, "--tls-ca"),
            cert_pem=_read_pem(tls_cert, "--tls-cert"),
            key_pem=_read_pem(tls_key, "--tls-key"),
            server_name=tls_server_name,
        ).validate()
        options = DoctorOptions(
            fmt=fmt,
            codec=codec,
            input_uri=None if no_input else (input_ or listing.default_input_uri()),
            capture=capture,
            output_uri=None if no_output else (output or listing.default_output_uri()),
            endpoint=endpoint,
            security=security,
            listen_s=listen,
            timeout_s=timeout,
        )
        err = _stderr()
        show = not json_ and err.is_terminal

        def progress(text: str) -> None:
            if show:
                err.print(f"tiality doctor: {text}...", markup=False, highlight=False)

        return run(options, progress)

    report = guarded(body)
    if json_:
        import json

        print(json.dumps(report.as_dict(), indent=2), flush=True)
    else:
        from tiality_cli.cli.common import out_console

        console = out_console()
        console.print(checks_table(report))
        console.print(latency_table(report))
        console.print(summary_line(report), markup=False, highlight=False)
    sys.stdout.flush()
    raise typer.Exit(report.exit_code)


def checks_table(report: Report) -> Table:
    from rich.table import Table
    from rich.text import Text

    t = Table(title="tiality doctor", title_justify="left")
    t.add_column("", no_wrap=True)
    t.add_column("Check", no_wrap=True, style="bold")
    t.add_column("Result")
    t.add_column("Fix")
    for c in report.checks:
        mark, style = MARKS.get(c.status, (c.status, ""))
        t.add_row(
            Text(mark, style=style), c.name, Text(c.detail), Text(c.fix, style="yellow" if c.fix else "")
        )
    return t


def latency_table(report: Report) -> Table:
    from rich.table import Table
    from rich.text import Text

    t = Table(title="expected delay, microphone to speaker", title_justify="left")
    t.add_column("Stage", no_wrap=True)
    t.add_column("ms", justify="right", no_wrap=True)
    t.add_column("Basis", no_wrap=True)
    t.add_column("Detail")
    for s in report.stages:
        ms = "?" if s.ms is None else f"{s.ms:.1f}"
        t.add_row(s.name, ms, s.basis, Text(s.detail, style="dim"))
    unknown = report.unknown_stages
    total = f"{report.total_ms:.1f}"
    t.add_row(
        Text("total", style="bold"),
        Text(total, style="bold"),
        "",
        f"+ {', '.join(unknown)}: not measured" if unknown else "",
    )
    return t


def summary_line(report: Report) -> str:
    n = report.counts()
    verdict = {0: "ready", 1: "ready, with warnings", 2: "NOT ready"}[report.exit_code]
    return (
        f"tiality doctor: {verdict}: {n['pass']} passed, {n['warn']} warning(s), {n['fail']} failure(s)"
        + (f", {n['skip']} skipped" if n["skip"] else "")
        + f"; expected delay {report.total_ms:.0f} ms"
        + (f" + {', '.join(report.unknown_stages)}" if report.unknown_stages else "")
    )
