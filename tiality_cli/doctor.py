"""``tiality doctor``'s checks as plain functions: will audio work, and how much delay to expect?

    check_input(uri, fmt, capture, seconds) -> InputReport      opens at the format; silent / clipped?
    check_output(uri, fmt, seconds) -> OutputReport             opens, plays silence; its delay
    check_network(endpoint, security, timeout_s, probes) -> NetworkReport
                    name resolves, port open, gRPC health SERVING, TLS verifies, token accepted, clock
    latency_stages(fmt, codec, capture_ms, rtt_ms, output_ms, playout) -> [Stage]
    run(options, progress) -> Report                            all of them; ``Report.exit_code``

Each check is a ``Check`` (name, status pass/warn/fail/skip, detail, fix): the fix is what the operator
should do, in the words of the command line. A check that cannot run because an earlier one failed is
``skip`` (its detail says which). No typer or rich: ``cli/doctor.py`` presents the report; grpc only
through ``net/client.py``, imported when a network check runs.
"""

from __future__ import annotations

import math
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from tiality_cli.clock import SYSTEM_CLOCK, Clock
from tiality_cli.clocksync import ClockFilter, ClockSample
from tiality_cli.config import AudioFormat, ClientSecurity, CodecConfig, Endpoint
from tiality_cli.errors import AuthError, ConnectError, RejectedError, TialityError
from tiality_cli.io.base import CaptureOptions
from tiality_cli.levelcheck import ChannelLevel, assess_levels, channel_levels
from tiality_cli.playout import PlayoutConfig

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
SLOW_RTT_MS = 50.0  # a LAN or a good Wi-Fi answers in a few ms; more costs latency (RTT/2 each way)
JITTERY_RTT_MS = 20.0  # spread of the probes' round trips: the jitter buffer grows to cover it
CLOCK_OFFSET_WARN_MS = 1000.0  # tiality compensates, but logs and recordings on both sides disagree
Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: str  # PASS, WARN, FAIL or SKIP (not run: an earlier check failed)
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


@dataclass(frozen=True, slots=True)
class Stage:
    """One stage of the expected mouth-to-ear delay."""

    name: str
    ms: float | None  # None: not known here (e.g. the network without HOST:PORT)
    basis: str  # "measured", "reported" (by the device), "configured" or "not measured"
    detail: str

    def as_dict(self) -> dict[str, Any]:
        ms = None if self.ms is None else round(self.ms, 2)
        return {"name": self.name, "ms": ms, "basis": self.basis, "detail": self.detail}


def skipped(name: str, because: str) -> Check:
    return Check(name, SKIP, f"not run: {because}")


# ---------------------------------------------------------------------------------------------------------
# input
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class InputReport:
    checks: list[Check]
    capture_ms: float | None  # the device's input delay beyond the frame (None: it did not open)
    capture_basis: str = "reported"
    capture_detail: str = ""
    levels: tuple[ChannelLevel, ...] = ()


def check_input(
    uri: str, fmt: AudioFormat, capture: CaptureOptions, seconds: float = 2.0, clock: Clock = SYSTEM_CLOCK
) -> InputReport:
    """Opens the input as ``send`` would and listens for ``seconds``: does it open, is it silent or clipped?

    A device is opened with every channel that send would open, each measured on its own, so that a
    silent channel can be named and a live one suggested for ``--channel-map``.
    """
    from tiality_cli.io.routing import resolve_capture
    from tiality_cli.io.sources import open_source

    device = uri.startswith(("alsa://", "sd://"))
    router = resolve_capture(fmt, capture)  # a bad --channel-map is a usage error: raised, not a check
    if device:
        raw_fmt = AudioFormat(fmt.sample_rate, router.device_channels, fmt.frame_us)
        used = list(range(router.device_channels)) if router.downmix else list(router.channel_map)
        source_capture = CaptureOptions(router.device_channels)
    else:
        raw_fmt, used, source_capture = fmt, list(range(fmt.channels)), capture
    try:
        source = open_source(uri, raw_fmt, source_capture, clock=clock)
    except TialityError as exc:
        fix = "`tiality devices` lists the inputs; choose one with -i (or TIALITY_INPUT)"
        if "busy" in str(exc):
            fix = "stop the program that uses it (a `tiality send` service?), or use a dsnoop/pulse device"
        return InputReport(
            [Check("input device", FAIL, str(exc), fix), skipped("input level", "no input")], None
        )
    name = _device_name(source, uri)
    frames = max(1, math.ceil(seconds * 1e6 / raw_fmt.frame_us))
    n = raw_fmt.frame_samples
    pcm = np.zeros((frames * n, raw_fmt.channels), dtype=np.int16)
    got = 0
    try:
        source.open()
        for k in range(frames):
            if source.read(pcm[k * n : (k + 1) * n]) is None:
                break
            got = k + 1
    except TialityError as exc:
        return InputReport(
            [
                Check(
                    "input device",
                    FAIL,
                    f"{name}: opened, then {exc}",
                    "check the device (`tiality devices`)",
                )
            ],
            None,
        )
    finally:
        source.close()
    capture_ms, detail = _capture_delay(source, raw_fmt)
    opened = Check(
        "input device",
        PASS,
        f"{name}: {raw_fmt.sample_rate} Hz, {raw_fmt.channels} channel(s), {raw_fmt.frame_ms:g} ms frames",
    )
    if got == 0:
        return InputReport(
            [
                opened,
                Check("input level", FAIL, f"{uri}: no audio arrived", "check the input (`tiality devices`)"),
            ],
            capture_ms,
            capture_detail=detail,
        )
    levels = channel_levels(pcm[: got * n])
    verdict = assess_levels(levels, used, fmt.channels, downmix=router.downmix and device)
    seconds_heard = got * n / raw_fmt.sample_rate
    level = Check("input level", verdict.status, f"over {seconds_heard:.1f} s: {verdict.detail}", verdict.fix)
    return InputReport([opened, level], capture_ms, capture_detail=detail, levels=tuple(levels))


def _device_name(obj: Any, uri: str) -> str:
    """The URI, with PortAudio's own name of the device it selected (``sd://1 (USB Audio)``)."""
    device = getattr(obj, "device", None)
    return str(device) if uri.startswith("sd://") and device else uri


def _capture_delay(source: Any, fmt: AudioFormat) -> tuple[float, str]:
    """The input's delay beyond the frame itself, as the device reports it."""
    latency_s = getattr(source, "latency_s", None)
    if latency_s is not None:  # PortAudio: ADC to callback
        return float(latency_s) * 1000, f"PortAudio input latency {float(latency_s) * 1000:.1f} ms"
    period = getattr(source, "period", None)
    if period is not None:  # ALSA: one period per frame is read as soon as it is complete
        period_ms = int(period) * 1000 / fmt.sample_rate
        extra = max(0.0, period_ms - fmt.frame_ms)
        return extra, f"ALSA period {int(period)} samples = {period_ms:.1f} ms, read once per frame"
    return 0.0, "no device: a synthetic or file input"


# ---------------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OutputReport:
    check: Check
    delay_ms: float | None  # the device's output delay (None: it did not open)
    basis: str = "measured"
    detail: str = ""


def check_output(uri: str, fmt: AudioFormat | None = None, seconds: float = 0.5) -> OutputReport:
    """Opens the output as ``recv`` would and plays ``seconds`` of silence; measures the device's delay."""
    from tiality_cli.io.sinks import open_sink

    device = uri.startswith(("alsa://", "sd://"))
    fix = "`tiality devices` lists the outputs; choose one with -o (or TIALITY_OUTPUT)"
    try:
        sink = open_sink(uri, (fmt or AudioFormat()) if device else None)
    except TialityError as exc:
        if "busy" in str(exc):
            fix = "stop the program that plays to it (a `tiality recv` service?), or use a dmix/pulse device"
        return OutputReport(Check("output device", FAIL, str(exc), fix), None)
    if not device:
        sink.close()
        return OutputReport(
            Check("output device", PASS, f"{uri}: no sound device"), 0.0, "configured", "no device"
        )
    name = _device_name(sink, uri)
    calls = [0]

    def fill(buf: Any) -> bool:
        buf.fill(0)
        calls[0] += 1
        return False

    try:
        sink.start(fill)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and getattr(sink, "error", None) is None:
            time.sleep(0.05)
        error = getattr(sink, "error", None)
    finally:
        sink.stop()
        sink.close()
    if error is not None:
        return OutputReport(Check("output device", FAIL, f"{name}: opened, then failed: {error}", fix), None)
    if calls[0] == 0:
        return OutputReport(
            Check("output device", FAIL, f"{name}: opened, but took no audio in {seconds:g} s", fix), None
        )
    delay_ns = int(getattr(sink, "delay_ns", 0) or 0)
    latency_s = getattr(sink, "latency_s", None)
    if delay_ns > 0:
        delay_ms, basis, how = delay_ns / 1e6, "measured", "queued in the device while playing"
    elif latency_s is not None:
        delay_ms, basis, how = float(latency_s) * 1000, "reported", "PortAudio output latency"
    else:
        buffer_frames = int(getattr(sink, "buffer_frames", 0) or 0)
        rate = (fmt or AudioFormat()).sample_rate
        delay_ms, basis, how = buffer_frames * 1000 / rate, "reported", "the device's buffer"
    f = fmt or AudioFormat()
    detail = f"{name}: {f.sample_rate} Hz, {f.channels} channel(s), output delay {delay_ms:.1f} ms"
    return OutputReport(Check("output device", PASS, detail), delay_ms, basis, how)


# ---------------------------------------------------------------------------------------------------------
# network
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class NetworkReport:
    checks: list[Check]
    rtt_ms: float | None = None  # the best probe's round trip
    offset_ms: float | None = None  # receiver clock - this clock
    rtt_spread_ms: float | None = None  # max - min of the probes' round trips
    samples: list[ClockSample] = field(default_factory=list)
    connect_ms: float | None = None  # the TCP handshake: one round trip, when no probe got through


NETWORK_CHECKS = ("host name", "port", "receiver", "TLS", "token", "clock")


def check_network(
    endpoint: Endpoint,
    security: ClientSecurity,
    timeout_s: float = 3.0,
    probes: int = 8,
    clock: Clock = SYSTEM_CLOCK,
) -> NetworkReport:
    """From this machine to the receiver: each layer in turn, the first failure skips the rest."""
    checks: list[Check] = []

    def rest(after: str, because: str) -> list[Check]:
        names = NETWORK_CHECKS[NETWORK_CHECKS.index(after) + 1 :]
        return [skipped(n, because) for n in names]

    host, port, target = endpoint.host, endpoint.port, endpoint.target
    t0 = time.monotonic()
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        reason = "host name not found" if isinstance(exc, socket.gaierror) else str(exc)
        checks.append(
            Check(
                "host name",
                FAIL,
                f"{host}: {reason}",
                "check the name (a typo?), this machine's DNS or /etc/hosts, or use the receiver's IP",
            )
        )
        return NetworkReport(checks + rest("host name", "the name does not resolve"))
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    checks.append(
        Check(
            "host name",
            PASS,
            f"{host} -> {', '.join(addresses[:3])} ({(time.monotonic() - t0) * 1000:.0f} ms)",
        )
    )

    port_fix = (
        f"start `tiality recv --port {port}` on {host}, or give the port it listens on; "
        f"check the firewall there (e.g. `sudo ufw allow {port}/tcp`)"
    )
    t0 = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except ConnectionRefusedError:
        checks.append(Check("port", FAIL, f"{target}: connection refused (nothing listens there)", port_fix))
        return NetworkReport(checks + rest("port", "the port is closed"))
    except TimeoutError:
        checks.append(
            Check(
                "port",
                FAIL,
                f"{target}: no answer within {timeout_s:g} s",
                f"a firewall drops the packets, or {host} is down or unreachable (`ping {host}`)",
            )
        )
        return NetworkReport(checks + rest("port", "the port does not answer"))
    except OSError as exc:
        checks.append(Check("port", FAIL, f"{target}: {exc.strerror or exc}", port_fix))
        return NetworkReport(checks + rest("port", "the port cannot be reached"))
    connect_ms = (time.monotonic() - t0) * 1000
    checks.append(Check("port", PASS, f"{target}: open (TCP connect {connect_ms:.1f} ms)"))

    from tiality_cli.net.client import GrpcLink

    link = GrpcLink(endpoint, security)
    try:
        report = _grpc_checks(link, endpoint, security, timeout_s, probes, clock, checks, rest)
    finally:
        link.close()
    return replace(report, connect_ms=connect_ms)


def _grpc_checks(
    link: Any,
    endpoint: Endpoint,
    security: ClientSecurity,
    timeout_s: float,
    probes: int,
    clock: Clock,
    checks: list[Check],
    rest: Callable[[str, str], list[Check]],
) -> NetworkReport:
    target = endpoint.target
    tls_fix = (
        "--tls-ca must be the CA that signed the receiver's certificate; --tls-server-name if the "
        "certificate names another host; without TLS on the receiver, leave out --tls/--tls-ca"
    )
    try:
        link.wait_ready(timeout_s)
        status = link.check(timeout_s)
    except ConnectError as exc:
        text = str(exc)
        if security.tls and "TLS" in text:
            checks.append(skipped("receiver", "the TLS handshake failed"))
            checks.append(Check("TLS", FAIL, text, tls_fix))
            return NetworkReport(checks + rest("TLS", "no TLS connection"))
        hint = (
            "the port answers, but not as a tiality receiver: is it `tiality recv`? "
            "If the receiver uses TLS, add --tls-ca (or --tls)"
        )
        checks.append(Check("receiver", FAIL, text, hint))
        return NetworkReport(checks + rest("receiver", "no gRPC connection"))
    except RejectedError as exc:  # UNIMPLEMENTED: no health service
        checks.append(Check("receiver", WARN, f"{target}: no health service ({exc})", "update tiality there"))
        status = ""
    if status == "SERVING":
        checks.append(Check("receiver", PASS, f"{target}: gRPC health SERVING"))
    elif status:
        checks.append(
            Check(
                "receiver",
                FAIL if status == "NOT_SERVING" else WARN,
                f"{target}: gRPC health {status}: its audio output is not working",
                "look at the receiver: its output device failed or is gone (`tiality doctor` there)",
            )
        )
    if security.tls:
        name = security.server_name or endpoint.host
        ca = "the given CA" if security.ca_pem is not None else "the system's CAs"
        mutual = ", with this sender's certificate (mutual TLS)" if security.cert_pem is not None else ""
        checks.append(Check("TLS", PASS, f"certificate of {name} verified by {ca}{mutual}"))
    else:
        checks.append(Check("TLS", PASS, "not used: plaintext (see docs/security.md)"))

    samples: list[ClockSample] = []
    try:
        samples.append(link.probe_clock_checked(clock.wall_ns, timeout_s))
    except AuthError as exc:
        checks.append(
            Check(
                "token",
                FAIL,
                f"{exc}" + ("" if security.token else " (no token was given)"),
                "use the receiver's token: --token-file PATH or TIALITY_TOKEN (the one `tiality recv` uses)",
            )
        )
        return NetworkReport(checks + rest("token", "the token was refused"))
    except RejectedError as exc:
        checks.append(Check("token", WARN, f"not checked: {exc}", "update tiality on the receiver"))
        return NetworkReport(checks + rest("token", "the receiver has no clock service"))
    except ConnectError as exc:
        checks.append(Check("token", FAIL, f"not checked: {exc}", "run the check again; the link is flaky"))
        return NetworkReport(checks + rest("token", "the link broke"))
    checks.append(
        Check("token", PASS, "accepted" if security.token else "none given, none required by the receiver")
    )

    for _ in range(max(0, probes - 1)):
        try:
            samples.append(link.probe_clock_checked(clock.wall_ns, timeout_s))
        except TialityError:
            break
    filt = ClockFilter(window=max(1, len(samples)))
    for s in samples:
        filt.add(s)
    best = filt.best()
    assert best is not None
    rtts = [s.round_trip_ns / 1e6 for s in samples]
    rtt, offset, spread = best.round_trip_ns / 1e6, best.offset_ns / 1e6, max(rtts) - min(rtts)
    detail = (
        f"offset {offset:+.1f} ms (receiver - this machine), round trip {rtt:.2f} ms best, "
        f"{statistics.median(rtts):.2f} ms median, {max(rtts):.2f} ms worst of {len(samples)}"
    )
    status, fix = PASS, ""
    if rtt > SLOW_RTT_MS:
        status = WARN
        fix = "a slow link: on a Pi's Wi-Fi turn power saving off (`sudo iw dev wlan0 set power_save off`)"
    elif spread > JITTERY_RTT_MS:
        status = WARN
        fix = "the round trip varies: the receiver's buffer will grow to cover it (Wi-Fi power saving? load?)"
    elif abs(offset) > CLOCK_OFFSET_WARN_MS:
        status = WARN
        fix = "the clocks disagree (tiality compensates): enable NTP on both (`timedatectl set-ntp true`)"
    checks.append(Check("clock", status, detail, fix))
    return NetworkReport(checks, rtt, offset, spread, samples)


# ---------------------------------------------------------------------------------------------------------
# latency
# ---------------------------------------------------------------------------------------------------------
def opus_lookahead_ms(fmt: AudioFormat, codec: CodecConfig) -> float:
    from tiality_cli.codec import OpusEncoder

    enc = OpusEncoder(fmt, codec)
    try:
        return enc.lookahead * 1000 / fmt.sample_rate
    finally:
        enc.close()


def latency_stages(
    fmt: AudioFormat,
    codec: CodecConfig,
    capture_ms: float | None,
    rtt_ms: float | None,
    output_ms: float | None,
    playout: PlayoutConfig | None = None,
    capture_detail: str = "",
    output_detail: str = "",
    output_basis: str = "measured",
    network_detail: str = "",
) -> list[Stage]:
    """Where the milliseconds go, microphone to speaker, at these settings."""
    pc = playout or PlayoutConfig()
    fec_ms = fmt.frame_ms if codec.inband_fec and pc.fec else 0.0
    buffer_ms = (pc.latency_ms if pc.latency_ms is not None else pc.start_latency_ms + pc.margin_ms) + fec_ms
    buffer_detail = (
        f"--latency {pc.latency_ms:g} ms"
        if pc.latency_ms is not None
        else f"auto: starts at {pc.start_latency_ms:g} ms + {pc.margin_ms:g} ms margin, then follows jitter"
    )
    if fec_ms:
        buffer_detail += f", + one frame for FEC ({fec_ms:g} ms)"
    return [
        Stage(
            "capture device",
            capture_ms,
            "reported" if capture_ms is not None else "not measured",
            capture_detail or "the input did not open",
        ),
        Stage(
            "frame",
            fmt.frame_ms,
            "configured",
            f"--frame-ms {fmt.frame_ms:g}: a packet's audio, captured whole",
        ),
        Stage(
            "Opus look-ahead",
            opus_lookahead_ms(fmt, codec),
            "configured",
            f"--application {codec.application}",
        ),
        Stage(
            "network",
            None if rtt_ms is None else rtt_ms / 2,
            "measured" if rtt_ms is not None else "not measured",
            network_detail or "RTT/2: give HOST:PORT to measure it",
        ),
        Stage("jitter buffer", buffer_ms, "configured", buffer_detail),
        Stage(
            "output device",
            output_ms,
            output_basis if output_ms is not None else "not measured",
            output_detail or "the output did not open",
        ),
    ]


# ---------------------------------------------------------------------------------------------------------
# all of it
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DoctorOptions:
    fmt: AudioFormat = field(default_factory=AudioFormat)
    codec: CodecConfig = field(default_factory=CodecConfig)
    input_uri: str | None = None  # None: no input check (the operator's side may have none)
    capture: CaptureOptions = field(default_factory=CaptureOptions)
    output_uri: str | None = None  # None: no output check (the robot may have no speaker)
    endpoint: Endpoint | None = None  # None: no network checks
    security: ClientSecurity = field(default_factory=ClientSecurity)
    listen_s: float = 2.0
    timeout_s: float = 3.0
    probes: int = 8
    playout: PlayoutConfig = field(default_factory=PlayoutConfig)


@dataclass(frozen=True, slots=True)
class Report:
    checks: list[Check]
    stages: list[Stage]

    @property
    def total_ms(self) -> float:
        return sum(s.ms for s in self.stages if s.ms is not None)

    @property
    def unknown_stages(self) -> list[str]:
        return [s.name for s in self.stages if s.ms is None]

    @property
    def exit_code(self) -> int:
        """0 when every check passed, 1 when one warned, 2 when one failed."""
        statuses = {c.status for c in self.checks}
        return 2 if FAIL in statuses else 1 if WARN in statuses else 0

    def counts(self) -> dict[str, int]:
        return {s: sum(1 for c in self.checks if c.status == s) for s in (PASS, WARN, FAIL, SKIP)}

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": {0: PASS, 1: WARN, 2: FAIL}[self.exit_code],
            "exit_code": self.exit_code,
            "checks": [c.as_dict() for c in self.checks],
            "latency": {
                "total_ms": round(self.total_ms, 2),
                "not_measured": self.unknown_stages,
                "stages": [s.as_dict() for s in self.stages],
            },
        }


def run(options: DoctorOptions, progress: Progress | None = None, clock: Clock = SYSTEM_CLOCK) -> Report:
    """Every check the options ask for, in the order a stream meets them; then the latency stages."""
    say = progress or (lambda text: None)
    checks: list[Check] = []
    capture_ms: float | None = None
    capture_detail = "no input checked (--no-input)"
    if options.input_uri is not None:
        say(f"listening to {options.input_uri} for {options.listen_s:g} s")
        inp = check_input(options.input_uri, options.fmt, options.capture, options.listen_s, clock)
        checks += inp.checks
        capture_ms, capture_detail = inp.capture_ms, inp.capture_detail or "the input did not open"
    output_ms: float | None = None
    output_detail, output_basis = "no output checked (--no-output)", "not measured"
    if options.output_uri is not None:
        say(f"playing silence to {options.output_uri}")
        out = check_output(options.output_uri)
        checks.append(out.check)
        output_ms, output_detail, output_basis = out.delay_ms, out.detail, out.basis
    rtt_ms: float | None = None
    network_detail = ""
    if options.endpoint is not None:
        say(f"probing {options.endpoint.target}")
        net = check_network(options.endpoint, options.security, options.timeout_s, options.probes, clock)
        checks += net.checks
        if net.rtt_ms is not None:
            rtt_ms, network_detail = net.rtt_ms, "RTT/2: half the best clock probe's round trip"
        elif net.connect_ms is not None:
            rtt_ms, network_detail = (
                net.connect_ms,
                "RTT/2: half the TCP handshake (no clock probe got through)",
            )
    stages = latency_stages(
        options.fmt,
        options.codec,
        capture_ms,
        rtt_ms,
        output_ms,
        options.playout,
        capture_detail=capture_detail,
        output_detail=output_detail,
        output_basis=output_basis,
        network_detail=network_detail,
    )
    return Report(checks, stages)
