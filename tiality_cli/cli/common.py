"""Shared by the commands: one-line failures, signal handling, option parsers.

Kept apart from app.py so that every command module imports it without importing the app (no cycles).
"""

from __future__ import annotations

import gc
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from tiality_cli.errors import ConfigError, TialityError

if TYPE_CHECKING:
    from rich.console import Console


T = TypeVar("T")


PIPE_WIDTH = 200  # a summary or listing written to a pipe or a file: whole lines, not cut at 80 columns


def out_console() -> Console:
    """The console for tables and summaries on stdout. Rich gives a non-terminal 80 columns and cuts each
    wider row with an ellipsis; a pipe or a file gets PIPE_WIDTH instead, unless COLUMNS says."""
    import sys

    from rich.console import Console

    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=PIPE_WIDTH if wide else None)


def _stderr() -> Console:
    """stderr's console: warnings and failures are one line each, never wrapped (logs grep them whole)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Prints one line on stderr and returns the Exit to raise."""
    from rich.markup import escape

    # escaped: messages quote user input, and "[send]" or "[::1]:50052" are not markup
    _stderr().print(f"[bold red]tiality:[/] {escape(message)}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def guarded(fn: Callable[[], T]) -> T:
    """Runs a command body; library errors become one stderr line and their exit code, never a traceback."""
    try:
        return fn()
    except TialityError as exc:
        raise fail(str(exc), exc.exit_code) from None
    except KeyboardInterrupt:
        raise fail("interrupted", 130) from None
    except typer.Exit:
        raise
    except Exception as exc:  # a bug: still one line, with the type to report it by
        raise fail(f"internal error: {type(exc).__name__}: {exc}", 70) from None


def long_work() -> None:
    """The collector back on (``main`` starts without it), after freezing what start-up made: the
    modules' objects live for good, so later collections need not walk them every time."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


@contextmanager
def stop_on_signals(wake: threading.Event | None = None) -> Iterator[threading.Event]:
    """SIGINT and SIGTERM set the event (a clean stop with a summary), instead of raising mid-audio.

    They set ``wake`` too: the presenter's wait, so that it reacts at once without polling.
    """
    long_work()
    stop = threading.Event()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():  # a second Ctrl-C: leave now
            raise KeyboardInterrupt
        stop.set()
        if wake is not None:
            wake.set()

    for s in previous:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _kbps(value: float) -> int:
    return round(value * 1000)


def _parse_latency(text: str) -> float | None:
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text.rstrip("ms").strip())
    except ValueError:
        raise ConfigError(f"--latency {text!r}: expected 'auto' or milliseconds, e.g. 40") from None


TOKEN_HELP = "Shared secret required on every stream (or TIALITY_TOKEN, or --token-file)."

# The options that authenticate a stream, declared once: send and recv take the token, send and doctor
# (which connects as send would) the client side of TLS.
TokenOption = Annotated[str | None, typer.Option(help=TOKEN_HELP, show_default=False)]
TokenFileOption = Annotated[str | None, typer.Option(help="Read the token from this file.")]
TlsOption = Annotated[bool, typer.Option("--tls/--no-tls", help="Connect with TLS (implied by --tls-ca).")]
TlsCaOption = Annotated[str | None, typer.Option(help="CA certificate (PEM) that signed the receiver's.")]
TlsCertOption = Annotated[str | None, typer.Option(help="This sender's certificate, for mutual TLS.")]
TlsKeyOption = Annotated[str | None, typer.Option(help="This sender's private key, for mutual TLS.")]
TlsServerNameOption = Annotated[
    str | None, typer.Option(help="Name expected in the receiver's certificate (default: the host).")
]


def _typed(ctx: typer.Context, name: str) -> bool:
    """Whether the option's value was typed on the command line (not from a variable, a file, a default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


_SOURCE_RANK = {"COMMANDLINE": 4, "ENVIRONMENT": 3, "DEFAULT_MAP": 2, "DEFAULT": 1}


def _stronger(ctx: typer.Context, first: str, second: str) -> bool:
    """Whether option ``first`` comes from a stronger source than ``second`` (cli > env > file > default)."""

    def rank(name: str) -> int:
        source = ctx.get_parameter_source(name)
        return _SOURCE_RANK.get(source.name, 0) if source is not None else 0

    return rank(first) > rank(second)


def _resolve_token(
    token: str | None, token_file: str | None, typed: bool = True, token_first: bool = False
) -> str | None:
    """--token-file, then --token (from the command line, TIALITY_TOKEN or a config file), then
    $TIALITY_TOKEN; ``token_first`` when --token comes from a stronger source than --token-file (e.g.
    TIALITY_TOKEN over a token-file in a config file). A token ``typed`` on the command line is visible
    in the process list, so it earns a warning; the file and the environment do not."""
    if token_first and token is not None:
        token_file = None
    if token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as f:
                value = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"--token-file {token_file}: cannot read ({exc.strerror})") from None
        if not value:
            raise ConfigError(f"--token-file {token_file}: the file is empty")
        return value
    if token is not None:
        if not token:
            raise ConfigError("--token: empty")
        if typed:
            _stderr().print(
                "tiality: warning: --token is visible to other users in the process list; "
                "prefer TIALITY_TOKEN or --token-file",
                markup=False,
                highlight=False,
            )
        return token
    return os.environ.get("TIALITY_TOKEN") or None


def _read_pem(path: str | None, option: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot read ({exc.strerror})") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{option} {path}: not a PEM file")
    return data


def _is_loopback(host: str) -> bool:
    import ipaddress

    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _parse_channel_map(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--channel-map {text!r}: expected device channel numbers, e.g. 0,1") from None
    if any(v < 0 for v in values):
        raise ConfigError(f"--channel-map {text!r}: channel numbers start at 0")
    return values
