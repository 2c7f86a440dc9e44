"""Opus speech quality per application, bitrate, channel count and frame size; writes docs/codec-quality.md.

    .venv/bin/python -m benchmarks.codec_quality [--no-write]

tests/data/speech.wav (48 kHz, about 6 s of synthetic speech) goes through tiality's own codec wrapper
(``tiality_cli.codec.OpusEncoder`` -> ``OpusDecoder``, no network, no loss) once per combination of

    application  restricted-lowdelay, audio, voip
    bitrate      16, 24, 32, 48, 64, 96, 128 kbit/s (the whole stream, not per channel)
    channels     1, 2 (stereo: the mono speech in both channels)
    frame        10, 20 ms

at 48 kHz, every other encoder setting at ``CodecConfig``'s defaults. The decoded audio is shifted back
by the encoder's lookahead (its whole algorithmic delay), which is checked by cross-correlation, then
scored against the input:

    PESQ-WB  ITU-T P.862.2 MOS-LQO (``pesq`` package) on both signals resampled to 16 kHz with the same
             libsamplerate filter; stereo is scored on the mean of its channels.
    segSNR   mean over 20 ms segments at 48 kHz of the per-segment SNR clamped to [-10, 35] dB, segments
             whose reference is below -50 dBFS (mean square) left out; channel mean as for PESQ.

It also measures, for the default stream (stereo, 20 ms, 64 kbit/s), each application at complexity 0,
3, 5, 8 and 10: the same scores, and the encoder's CPU per frame (``time.process_time`` over the speech's
frames, median of 5 passes), so that a Pi short of CPU can trade complexity for quality by measurement.

From the table it derives the simplest "auto" application rule that stays within 0.1 PESQ of the best
application in every row measured, and writes the whole of docs/codec-quality.md (that file is generated:
edit this script, not it). ``--no-write`` only prints.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import platform
import statistics
import sys
import time
import wave
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import opuslib.api.info as opus_info
import pesq
import samplerate

from tiality_cli.codec import OpusDecoder, OpusEncoder
from tiality_cli.config import AudioFormat, CodecConfig

F64 = npt.NDArray[np.float64]
I16 = npt.NDArray[np.int16]

ROOT = Path(__file__).resolve().parent.parent
SPEECH_WAV = ROOT / "tests" / "data" / "speech.wav"
DOC = ROOT / "docs" / "codec-quality.md"
COMMAND = ".venv/bin/python -m benchmarks.codec_quality"

RATE = 48_000
PESQ_RATE = 16_000
RESAMPLER = "sinc_best"  # the same filter for reference and decoded audio, so it cancels out
APPLICATIONS = ("restricted-lowdelay", "audio", "voip")
SHORT = {"restricted-lowdelay": "lowdelay", "audio": "audio", "voip": "voip"}
BITRATES_KBPS = (16, 24, 32, 48, 64, 96, 128)
CHANNELS = (1, 2)
FRAMES_MS = (10, 20)
TOLERANCE = 0.1  # PESQ points the auto rule may lose against the best application in any row
SEGMENT_MS = 20
SEG_MIN_DB, SEG_MAX_DB = -10.0, 35.0
SILENCE_RMS_DBFS = -50.0
MAX_LAG_CHECK = RATE // 100  # residual misalignment searched within +-10 ms
BITRATE_DEVIATION = 0.15  # report configurations whose actual bitrate is this far off the target
COMPLEXITIES = (0, 3, 5, 8, 10)
DEFAULT_STREAM = (2, 20, 64)  # channels, frame ms, kbit/s: what send uses unless told otherwise
CPU_PASSES = 5


# -- signals -----------------------------------------------------------------------------------------


def load_speech(path: Path) -> I16:
    """The speech file as int16, shape (frames, channels); exits unless it is 48 kHz 16-bit mono/stereo."""
    with wave.open(str(path), "rb") as w:
        rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
        if rate != RATE or channels not in (1, 2) or width != 2:
            sys.exit(
                f"{path}: {rate} Hz, {channels} channel(s), {8 * width}-bit; expected {RATE} Hz 16-bit "
                "mono or stereo (see tests/data/README.md)"
            )
        raw = w.readframes(w.getnframes())
    return np.frombuffer(raw, dtype="<i2").astype(np.int16).reshape(-1, channels)


def with_channels(pcm: I16, channels: int) -> I16:
    """``pcm`` with ``channels`` channels: mono duplicated, stereo kept or averaged."""
    if pcm.shape[1] == channels:
        return pcm
    if channels == 2:
        return np.asarray(np.repeat(pcm, 2, axis=1), dtype=np.int16)
    mean = np.round(pcm.astype(np.float64).mean(axis=1, keepdims=True))
    return np.asarray(mean, dtype=np.int16)


def channel_mean(pcm: I16) -> F64:
    """The mean of the channels as float in [-1, 1]."""
    return np.asarray(pcm.astype(np.float64).mean(axis=1) / 32768.0, dtype=np.float64)


def to_pesq_rate(x: F64) -> F64:
    return np.asarray(samplerate.resample(x, PESQ_RATE / RATE, RESAMPLER), dtype=np.float64)


def residual_lag(reference: F64, degraded: F64, max_lag: int) -> int:
    """The lag L (|L| <= max_lag) at which ``degraded[n + L]`` best matches ``reference[n]`` (FFT xcorr)."""
    ref = reference - reference.mean()
    deg = degraded - degraded.mean()
    nfft = 1 << (ref.size + deg.size - 1).bit_length()
    xcorr = np.fft.irfft(np.fft.rfft(deg, nfft) * np.conj(np.fft.rfft(ref, nfft)), nfft)
    lags = np.arange(-max_lag, max_lag + 1)
    return int(lags[int(np.argmax(xcorr[lags % nfft]))])


def segmental_snr_db(reference: F64, degraded: F64) -> float:
    """Mean of the clamped per-segment SNR over the reference's non-silent 20 ms segments (no gain match)."""
    seg = RATE * SEGMENT_MS // 1000
    n_seg = reference.size // seg
    ref = reference[: n_seg * seg].reshape(n_seg, seg)
    err = degraded[: n_seg * seg].reshape(n_seg, seg) - ref
    signal = np.sum(ref**2, axis=1)
    loud = 10.0 * np.log10(signal / seg + 1e-30) >= SILENCE_RMS_DBFS
    noise = np.sum(err[loud] ** 2, axis=1)
    with np.errstate(divide="ignore"):
        ratio = 10.0 * (np.log10(signal[loud]) - np.log10(noise))  # noise 0 -> +inf -> clamped
    return float(np.mean(np.clip(ratio, SEG_MIN_DB, SEG_MAX_DB)))


def pesq_wb(reference16: F64, degraded16: F64) -> float:
    return float(pesq.pesq(PESQ_RATE, reference16, degraded16, "wb"))


# -- the codec ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Coded:
    decoded: I16  # aligned with the input: decoded[n] is the input's sample n, same shape
    lookahead: int  # samples per channel
    actual_kbps: float
    mode: str  # how Opus coded the packets (from their TOC bytes), e.g. "hybrid" or "CELT 85%, mono"


def _codec_config(application: str, bitrate_kbps: int, complexity: int | None) -> CodecConfig:
    config = replace(CodecConfig(), application=application, bitrate=bitrate_kbps * 1000)
    return config if complexity is None else replace(config, complexity=complexity)


def round_trip(
    pcm: I16, application: str, bitrate_kbps: int, frame_ms: int, complexity: int | None = None
) -> Coded:
    """Encodes and decodes all of ``pcm`` frame by frame; the output is shifted back by the lookahead."""
    channels = pcm.shape[1]
    fmt = AudioFormat(sample_rate=RATE, channels=channels, frame_us=frame_ms * 1000)
    config = _codec_config(application, bitrate_kbps, complexity)
    encoder = OpusEncoder(fmt, config)
    decoder = OpusDecoder(RATE, channels, fmt.frame_samples)
    try:
        lookahead = encoder.lookahead
        fs = fmt.frame_samples
        n = pcm.shape[0]
        n_frames = -(-(n + lookahead) // fs)  # enough zeros after the speech to flush the lookahead
        padded = np.zeros((n_frames * fs, channels), dtype=np.int16)
        padded[:n] = pcm
        out = np.empty_like(padded)
        n_bytes = 0
        modes: Counter[str] = Counter()
        for i in range(n_frames):
            encoder.input[:] = padded[i * fs : (i + 1) * fs]
            packet = encoder.encode()
            n_bytes += len(packet)
            modes[packet_mode(packet[0], channels)] += 1
            got = decoder.decode(packet)
            if got != fs:
                raise RuntimeError(f"decoder returned {got} samples for a {fs}-sample frame")
            out[i * fs : (i + 1) * fs] = decoder.output[:fs]
    finally:
        encoder.close()
        decoder.close()
    kbps = n_bytes * 8 / (n_frames * fs / RATE) / 1000
    ((mode, count),) = modes.most_common(1)
    if count < n_frames:
        mode += f" {100 * count // n_frames}%"
    return Coded(out[lookahead : lookahead + n].copy(), lookahead, kbps, mode)


def encode_cpu_us(pcm: I16, application: str, bitrate_kbps: int, frame_ms: int, complexity: int) -> float:
    """The encoder's CPU per frame over all of ``pcm`` (the frame's copy into its input included), the
    median of CPU_PASSES passes with one encoder, as a sender runs it."""
    fmt = AudioFormat(sample_rate=RATE, channels=pcm.shape[1], frame_us=frame_ms * 1000)
    encoder = OpusEncoder(fmt, _codec_config(application, bitrate_kbps, complexity))
    fs = fmt.frame_samples
    frames = [pcm[i * fs : (i + 1) * fs] for i in range(pcm.shape[0] // fs)]
    passes = []
    try:
        for _ in range(CPU_PASSES):
            t = time.process_time()
            for f in frames:
                encoder.input[:] = f
                encoder.encode()
            passes.append((time.process_time() - t) / len(frames) * 1e6)
    finally:
        encoder.close()
    return statistics.median(passes)


def packet_mode(toc: int, channels: int) -> str:
    """SILK, hybrid or CELT from a packet's TOC byte (RFC 6716 3.1); ", mono" if stereo is coded as mono."""
    config = toc >> 3
    mode = "SILK" if config < 12 else "hybrid" if config < 16 else "CELT"
    return mode + (", mono" if channels == 2 and not toc & 0x04 else "")


# -- measuring ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Score:
    pesq: float
    seg_snr: float
    lag: int  # residual misalignment after the lookahead compensation, samples (0 expected)
    actual_kbps: float
    mode: str


@dataclass(frozen=True, slots=True)
class Row:
    channels: int
    frame_ms: int
    bitrate_kbps: int
    scores: dict[str, Score]

    @property
    def kbps_per_channel(self) -> float:
        return self.bitrate_kbps / self.channels

    @property
    def best_pesq(self) -> float:
        return max(s.pesq for s in self.scores.values())

    @property
    def best(self) -> list[str]:
        """The application(s) with the highest PESQ (ties at the printed precision all listed)."""
        top = round(self.best_pesq, 2)
        return [a for a in APPLICATIONS if round(self.scores[a].pesq, 2) == top]


def score(ref: F64, ref16: F64, coded: Coded) -> Score:
    """``coded`` against the reference (``ref`` at 48 kHz, ``ref16`` at PESQ's 16 kHz)."""
    deg = channel_mean(coded.decoded)
    return Score(
        pesq=pesq_wb(ref16, to_pesq_rate(deg)),
        seg_snr=segmental_snr_db(ref, deg),
        lag=residual_lag(ref, deg, MAX_LAG_CHECK),
        actual_kbps=coded.actual_kbps,
        mode=coded.mode,
    )


def measure(speech: I16) -> tuple[list[Row], dict[str, int], float]:
    """Every combination; also the lookahead per application and the PESQ of the reference against itself."""
    rows: list[Row] = []
    lookaheads: dict[str, int] = {}
    ceiling = math.nan
    total = len(CHANNELS) * len(FRAMES_MS) * len(BITRATES_KBPS) * len(APPLICATIONS)
    done = 0
    t0 = time.monotonic()
    for channels in CHANNELS:
        pcm = with_channels(speech, channels)
        ref = channel_mean(pcm)
        ref16 = to_pesq_rate(ref)
        if channels == CHANNELS[0]:
            ceiling = pesq_wb(ref16, ref16)
        for frame_ms, kbps in itertools.product(FRAMES_MS, BITRATES_KBPS):
            scores: dict[str, Score] = {}
            for app in APPLICATIONS:
                coded = round_trip(pcm, app, kbps, frame_ms)
                if lookaheads.setdefault(app, coded.lookahead) != coded.lookahead:
                    raise RuntimeError(f"{app}: lookahead {coded.lookahead} != {lookaheads[app]} samples")
                scores[app] = score(ref, ref16, coded)
                done += 1
            rows.append(Row(channels, frame_ms, kbps, scores))
            line = "  ".join(f"{SHORT[a]} {s.pesq:.2f}/{s.seg_snr:5.1f} dB" for a, s in scores.items())
            print(
                f"[{done:3d}/{total}] {channels} ch {frame_ms:2d} ms {kbps:3d} kbit/s  {line}"
                f"  ({time.monotonic() - t0:.0f} s)",
                file=sys.stderr,
            )
    return rows, lookaheads, ceiling


@dataclass(frozen=True, slots=True)
class Effort:
    application: str
    complexity: int
    score: Score
    encode_us: float


def measure_complexity(speech: I16) -> list[Effort]:
    """Each application at each of COMPLEXITIES on the default stream: scores and encoder CPU."""
    channels, frame_ms, kbps = DEFAULT_STREAM
    pcm = with_channels(speech, channels)
    ref = channel_mean(pcm)
    ref16 = to_pesq_rate(ref)
    out: list[Effort] = []
    for app, complexity in itertools.product(APPLICATIONS, COMPLEXITIES):
        got = score(ref, ref16, round_trip(pcm, app, kbps, frame_ms, complexity))
        out.append(Effort(app, complexity, got, encode_cpu_us(pcm, app, kbps, frame_ms, complexity)))
        print(
            f"complexity {complexity:2d} {SHORT[app]:8s} PESQ {got.pesq:.2f}, {got.seg_snr:5.1f} dB, "
            f"{out[-1].encode_us:5.0f} us/frame, {got.mode}",
            file=sys.stderr,
        )
    return out


def complexity_table(efforts: Sequence[Effort]) -> str:
    default = CodecConfig()
    base = next(
        e for e in efforts if e.application == default.application and e.complexity == default.complexity
    )
    lines = [
        "| application | complexity | PESQ-WB | segSNR | coded as | encode, µs per frame | "
        "against the default |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for e in efforts:
        mark = " (the default)" if e is base else ""
        lines.append(
            f"| {e.application}{mark} | {e.complexity} | {e.score.pesq:.2f} | {e.score.seg_snr:.1f} dB | "
            f"{e.score.mode} | {e.encode_us:.0f} | {e.encode_us / base.encode_us:.2f} x |"
        )
    return "\n".join(lines)


# -- the auto rule -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """``high`` at and above ``threshold`` kbit/s (per channel or for the stream), ``low`` below it."""

    high: str
    low: str | None = None
    threshold: float | None = None
    per_channel: bool = True

    def pick(self, row: Row) -> str:
        if self.low is None or self.threshold is None:
            return self.high
        rate = row.kbps_per_channel if self.per_channel else row.bitrate_kbps
        return self.high if rate >= self.threshold else self.low

    def describe(self) -> str:
        if self.low is None or self.threshold is None:
            return f"{self.high} everywhere"
        unit = "kbit/s per channel" if self.per_channel else "kbit/s (whole stream)"
        return f"{self.high} at and above {self.threshold:g} {unit}, {self.low} below"


@dataclass(frozen=True, slots=True)
class Verdict:
    rule: Rule
    shortfalls: list[float]  # best PESQ minus the rule's PESQ, per row

    @property
    def worst(self) -> float:
        return max(self.shortfalls)

    @property
    def mean(self) -> float:
        return float(np.mean(self.shortfalls))

    @property
    def failures(self) -> int:
        return sum(s > TOLERANCE + 1e-9 for s in self.shortfalls)


def candidate_rules(rows: Sequence[Row]) -> list[Rule]:
    rules = [Rule(app) for app in APPLICATIONS]
    for per_channel in (True, False):
        levels = sorted({r.kbps_per_channel if per_channel else float(r.bitrate_kbps) for r in rows})
        for high, low in itertools.permutations(APPLICATIONS, 2):
            rules += [Rule(high, low, level, per_channel) for level in levels[1:]]
    return rules


def judge(rule: Rule, rows: Sequence[Row]) -> Verdict:
    return Verdict(rule, [r.best_pesq - r.scores[rule.pick(r)].pesq for r in rows])


def choose_rule(rows: Sequence[Row], lookaheads: dict[str, int]) -> tuple[Verdict, list[Verdict]]:
    """The chosen rule and every candidate's verdict.

    Among rules within TOLERANCE everywhere: one application beats two, then the smaller largest
    lookahead the rule ever uses (latency is what the project optimises), then per-channel thresholds
    over whole-stream ones, then the smaller mean shortfall. If none passes, the fewest failing rows.
    """
    verdicts = [judge(rule, rows) for rule in candidate_rules(rows)]

    def key(v: Verdict) -> tuple[int, int, int, bool, float]:
        apps = {v.rule.pick(r) for r in rows}
        return (v.failures, len(apps), max(lookaheads[a] for a in apps), not v.rule.per_channel, v.mean)

    return min(verdicts, key=key), verdicts


# -- reporting ---------------------------------------------------------------------------------------


def ms(samples: int) -> str:
    return f"{samples * 1000 / RATE:g} ms"


def results_table(rows: Sequence[Row], rule: Rule) -> str:
    head = ["channels", "frame", "kbit/s"]
    for app in APPLICATIONS:
        head += [f"{app} PESQ-WB", f"{app} segSNR"]
    head += ["best application", "auto rule", f"auto within {TOLERANCE:g}"]
    head += ["coded as (" + " / ".join(SHORT[a] for a in APPLICATIONS) + ")"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * (3 + 2 * len(APPLICATIONS)) + "---|" * 4]
    for r in rows:
        cells = [str(r.channels), f"{r.frame_ms} ms", str(r.bitrate_kbps)]
        for app in APPLICATIONS:
            cells += [f"{r.scores[app].pesq:.2f}", f"{r.scores[app].seg_snr:.1f} dB"]
        auto = rule.pick(r)
        shortfall = r.best_pesq - r.scores[auto].pesq
        ok = "yes" if shortfall <= TOLERANCE + 1e-9 else f"no (-{shortfall:.2f})"
        cells += [" / ".join(r.best), auto, ok, " / ".join(r.scores[a].mode for a in APPLICATIONS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lookahead_table(lookaheads: dict[str, int]) -> str:
    lines = ["| application | lookahead (samples at 48 kHz) | lookahead |", "|---|---:|---:|"]
    lines += [f"| {app} | {lookaheads[app]} | {ms(lookaheads[app])} |" for app in APPLICATIONS]
    return "\n".join(lines)


def evidence(chosen: Verdict, verdicts: Sequence[Verdict], rows: Sequence[Row]) -> str:
    """The chosen rule's worst row, and how the one-application rules fare, as Markdown bullets."""
    worst = rows[int(np.argmax(chosen.shortfalls))]
    lines = [
        f"- Chosen: **{chosen.rule.describe()}**: worst shortfall {chosen.worst:.3f} PESQ "
        f"({worst.channels} ch, {worst.frame_ms} ms, {worst.bitrate_kbps} kbit/s), "
        f"mean {chosen.mean:.3f}, {chosen.failures} of {len(rows)} rows beyond {TOLERANCE:g}.",
    ]
    for v in verdicts:
        if v.rule.low is None:
            w = rows[int(np.argmax(v.shortfalls))]
            at = f"{w.channels} ch, {w.frame_ms} ms, {w.bitrate_kbps} kbit/s"
            lines.append(
                f"- {v.rule.describe()}: {v.failures} of {len(rows)} rows beyond {TOLERANCE:g}, "
                f"worst {v.worst:.2f} ({at}), mean {v.mean:.3f}."
            )
    passing = [v for v in verdicts if v.failures == 0]
    lines.append(
        f"- {len(passing)} of {len(verdicts)} candidate rules (each application everywhere, or any two "
        "split at one of the measured bitrates, per channel or per stream) stay within "
        f"{TOLERANCE:g} everywhere."
    )
    return "\n".join(lines)


def anomalies(rows: Sequence[Row]) -> list[str]:
    """Residual lags (grouped by application and lag) and bitrates far off their target."""
    lags: dict[tuple[str, int], list[str]] = {}
    notes: list[str] = []
    for r in rows:
        for app, s in r.scores.items():
            where = f"{r.channels} ch {r.frame_ms} ms {r.bitrate_kbps}"
            if s.lag != 0:
                lags.setdefault((app, s.lag), []).append(where)
            if abs(s.actual_kbps / r.bitrate_kbps - 1) > BITRATE_DEVIATION:
                notes.append(f"{app}, {where} kbit/s: actual bitrate {s.actual_kbps:.1f} kbit/s")
    lag_notes = [
        f"{app}: decoded audio {abs(lag)} sample(s) {'early' if lag < 0 else 'late'} after the lookahead "
        f"compensation in {len(places)} row(s) ({', '.join(places)} kbit/s)"
        for (app, lag), places in sorted(lags.items())
    ]
    return lag_notes + notes


def document(
    rows: Sequence[Row],
    lookaheads: dict[str, int],
    ceiling: float,
    chosen: Verdict,
    verdicts: Sequence[Verdict],
    speech_s: float,
    elapsed_s: float,
    efforts: Sequence[Effort],
) -> str:
    version = opus_version()
    defaults = CodecConfig()
    ch, frame, kbps = DEFAULT_STREAM
    notes = anomalies(rows)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lag_note = (
        "After shifting the decoded audio back by the encoder's lookahead, cross-correlation finds no "
        "residual lag in any configuration (searched within +-10 ms), and every actual bitrate is within "
        f"{BITRATE_DEVIATION:.0%} of its target."
        if not notes
        else "Checks (cross-correlation after the lookahead compensation, within +-10 ms; actual bitrates "
        f"more than {BITRATE_DEVIATION:.0%} off their target):\n\n"
        + "\n".join(f"- {n}" for n in notes)
        + "\n\nPESQ aligns the signals itself, so a residual lag does not affect it; segSNR is measured at "
        "the lookahead alignment, as a receiver would play the audio, and a lag of even a few samples at "
        '48 kHz costs it several dB (compare the "coded as" column).'
    )
    return f"""# Opus quality per application mode

<!-- Generated by benchmarks/codec_quality.py: edit the script, not this file. -->

How Opus's three application modes compare on speech, so the default can be chosen from measurements.
`benchmarks/codec_quality.py` sends `tests/data/speech.wav` ({speech_s:.2f} s of synthetic speech, 48 kHz)
through tiality's own codec wrapper (`tiality_cli.codec.OpusEncoder` -> `OpusDecoder`, no network, no
loss) at 48 kHz for every application, bitrate (whole stream, not per channel), channel count (stereo:
mono speech duplicated into both channels) and frame size below. Everything else is `CodecConfig`'s
default: complexity {defaults.complexity}, FEC {"on" if defaults.inband_fec else "off"}, \
DTX {"on" if defaults.dtx else "off"}, expected loss {defaults.packet_loss_perc} %. The decoded audio is
shifted back by the encoder's lookahead and scored against the input: **PESQ-WB** (ITU-T P.862.2
MOS-LQO, `pesq` package, both signals resampled to 16 kHz with libsamplerate's `{RESAMPLER}`; the
reference against itself scores {ceiling:.2f}, the scale's ceiling) and **segSNR** (mean over 20 ms
segments of the SNR clamped to [-10, 35] dB, segments of the reference below -50 dBFS skipped, no gain
matching). Stereo is scored on the mean of its two channels.

Measured {when} with `{COMMAND}`: {version}, Python {platform.python_version()}, \
{platform.machine()}, {elapsed_s:.0f} s.

## Lookahead (algorithmic delay)

{lookahead_table(lookaheads)}

restricted-lowdelay (CELT only: no SILK, no hybrid mode) saves \
{ms(lookaheads["audio"] - lookaheads["restricted-lowdelay"])} of latency against audio and \
{ms(lookaheads["voip"] - lookaheads["restricted-lowdelay"])} against voip.

## Auto rule

"auto" must stay within {TOLERANCE:g} PESQ of the best application in every row. Among the rules that
do, the simplest wins (one application over two), then the one with the least lookahead, then the
smaller mean shortfall.

{evidence(chosen, verdicts, rows)}

## Results

PESQ-WB (1.0 to 4.64) and segmental SNR per application; "best application" has the highest PESQ
(ties at two decimals all listed); "auto rule" is what the chosen rule picks for that row; "coded as"
is the mode Opus chose for the packets (from their TOC bytes; a percentage when it was not the mode of
every packet; "mono" when a stereo stream was coded as mono).

{results_table(rows, chosen.rule)}

{lag_note}

## Complexity: quality against the encoder's CPU

The default stream ({ch} channels, {frame} ms, {kbps} kbit/s), each application at
complexity {", ".join(map(str, COMPLEXITIES))} (`send --complexity`), scored as above. The encoder's CPU per
frame is `time.process_time` over the speech's frames with one encoder, as a sender runs it, the median
of {CPU_PASSES} passes, on the machine named above (a shared one: about ±20 %). A Pi's core is several times
slower, so its absolute figures differ; the ratios in the last column are what to compare, and this
script run on the Pi measures its own.

{complexity_table(efforts)}

## Reading the numbers

- PESQ-WB judges the 50-7000 Hz band only (it runs at 16 kHz): what Opus codes above 8 kHz, where the
  modes differ most at high bitrates, is invisible to it. The test speech was synthesised at 22.05 kHz,
  so it has nothing above 11 kHz anyway. One short synthetic voice is a coarse sample: treat
  differences below about 0.1 PESQ as noise.
- restricted-lowdelay is CELT only. audio and voip use SILK (speech-only, up to wideband) or hybrid
  (SILK below 8 kHz, CELT above) at low bitrates and switch to CELT higher up; where they do, all
  three modes code the same way and score close together.
- Complexity: on the default stream, audio and restricted-lowdelay code CELT at every complexity, and
  their encoder's CPU falls with it (to about 0.4 x the default's at 0) while PESQ-WB falls by up to
  about half a point, not in order on this short sample. voip below complexity 8 codes the stream as
  hybrid (SILK below 8 kHz), which PESQ-WB, blind above 8 kHz, scores higher, at more CPU.
- In voip mode libopus high-passes the input (a second-order filter, cutoff 60 Hz and up); the other
  modes only remove DC. A waveform measure like segSNR counts that filter's phase shift as noise, so
  voip's segSNR stays low at every bitrate while its PESQ does not.
"""


def opus_version() -> str:
    raw = opus_info.get_version_string()
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/codec-quality.md")
    args = parser.parse_args(argv)

    speech = load_speech(SPEECH_WAV)
    speech_s = speech.shape[0] / RATE
    print(f"{opus_version()}; {SPEECH_WAV.relative_to(ROOT)}: {speech_s:.2f} s, {speech.shape[1]} ch")
    t0 = time.monotonic()
    rows, lookaheads, ceiling = measure(speech)
    elapsed = time.monotonic() - t0
    chosen, verdicts = choose_rule(rows, lookaheads)
    efforts = measure_complexity(speech)

    print(f"\nReference against itself: PESQ-WB {ceiling:.2f}\n")
    print(lookahead_table(lookaheads) + "\n")
    print(results_table(rows, chosen.rule) + "\n")
    print(f"Auto rule: {chosen.rule.describe()}")
    print(evidence(chosen, verdicts, rows))
    for note in anomalies(rows):
        print(f"Note: {note}")
    print("\n" + complexity_table(efforts))
    print(f"\n{elapsed:.0f} s")
    if not args.no_write:
        DOC.write_text(document(rows, lookaheads, ceiling, chosen, verdicts, speech_s, elapsed, efforts))
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
