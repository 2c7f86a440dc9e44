"""Comparing the audio that went into the pipeline with the audio that came out (numpy only).

End-to-end tests cannot expect equal samples: Opus is lossy, the receiver adds latency and may
resample. So they align the two signals, then compare them by (segmental) SNR or correlation, look
for dropped blocks, and time clicks to measure latency.

Generating:     tone, white_noise, click_train, load_speech (tests/data/speech.wav)
Aligning:       align, trim_aligned, follow_warp
Comparing:      snr_db, segmental_snr_db, chunked_snr_db, correlation, rms_dbfs
Inspecting:     find_dropouts, detect_clicks

Conventions: a signal is float in [-1, 1], shape (frames,) or (frames, channels) (the layout of
``tiality_cli.wavfile.read_wav`` and of sources); integer arrays (int16 ...) are scaled to that range.
Generators return float32 (frames, channels). Times and lengths are in samples (divide by the rate
for seconds). Levels are dB relative to full scale: ``level_dbfs`` is a peak level,
``rms_dbfs`` a mean-square one (a full-scale square wave is 0 dB, a full-scale sine -3 dB).
"""

from __future__ import annotations

import math
import wave
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = [
    "SPEECH_RATE",
    "SPEECH_WAV",
    "ClickTrain",
    "Signal",
    "align",
    "chunked_snr_db",
    "click_train",
    "correlation",
    "detect_clicks",
    "find_dropouts",
    "follow_warp",
    "load_speech",
    "rms_dbfs",
    "segmental_snr_db",
    "snr_db",
    "tone",
    "trim_aligned",
    "white_noise",
]

Signal = npt.NDArray[np.float32]
_F64 = npt.NDArray[np.float64]

SPEECH_WAV = Path(__file__).resolve().parent.parent / "data" / "speech.wav"
SPEECH_RATE = 48_000
_LSB16 = 1.0 / 32768.0  # one step of 16-bit PCM: the quietest sample that is not digital silence


# -- generating --------------------------------------------------------------------------------------


def tone(
    freq: float, seconds: float, rate: int, channels: int = 1, level_dbfs: float = -6.0, *, phase: float = 0.0
) -> Signal:
    """A sine of peak ``level_dbfs``, the same in every channel, shape (round(seconds*rate), channels)."""
    _check_rate(rate)
    n = round(seconds * rate)
    t = np.arange(n, dtype=np.float64) / rate
    x = _db_to_amplitude(level_dbfs) * np.sin(2.0 * np.pi * freq * t + phase)
    return np.repeat(x[:, None], channels, axis=1).astype(np.float32)


def white_noise(frames: int, rms_dbfs: float, channels: int = 1, *, seed: int = 0) -> Signal:
    """Gaussian noise of mean-square level ``rms_dbfs``, seeded so a failing test replays exactly."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((frames, channels)) * _db_to_amplitude(rms_dbfs)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


class ClickTrain(NamedTuple):
    """A click train and the sample index where each click starts (its first non-zero sample)."""

    signal: Signal
    onsets: npt.NDArray[np.int64]


def click_train(
    rate: int,
    period_s: float,
    n: int,
    *,
    start_s: float = 0.1,
    level_dbfs: float = -6.0,
    click_ms: float = 2.0,
    click_hz: float = 3000.0,
    channels: int = 1,
) -> ClickTrain:
    """``n`` clicks, one every ``period_s`` from ``start_s``, for latency measurement.

    A click is a decaying cosine burst (``click_hz``, ``click_ms`` long) that starts at its peak, so
    its onset is one sharp sample, yet it has enough energy in the speech band to survive Opus. The
    signal ends one period after the last onset. Onset k is at round((start_s + k * period_s) * rate).
    """
    _check_rate(rate)
    if n < 1 or period_s <= 0 or click_ms <= 0 or start_s < 0:
        raise ValueError("click_train: need n >= 1, period_s > 0, click_ms > 0 and start_s >= 0")
    click_len = max(1, round(click_ms * rate / 1000))
    if click_len >= period_s * rate:
        raise ValueError(f"click_train: a {click_ms} ms click does not fit in a {period_s} s period")
    t = np.arange(click_len, dtype=np.float64) / rate
    click = np.cos(2.0 * np.pi * click_hz * t) * np.exp(-t / (click_ms / 4000.0))
    click *= _db_to_amplitude(level_dbfs)
    onsets = np.array([round((start_s + k * period_s) * rate) for k in range(n)], dtype=np.int64)
    x = np.zeros(int(onsets[-1]) + round(period_s * rate), dtype=np.float64)
    for onset in onsets:
        x[onset : onset + click_len] += click
    return ClickTrain(np.repeat(x[:, None], channels, axis=1).astype(np.float32), onsets)


def load_speech() -> Signal:
    """tests/data/speech.wav (about 6 s at 48 kHz, peak -3 dBFS) as float32, shape (frames, 1)."""
    with wave.open(str(SPEECH_WAV), "rb") as w:
        if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (SPEECH_RATE, 1, 2):
            raise ValueError(f"{SPEECH_WAV}: expected 48 kHz mono 16-bit; see tests/data/README.md")
        raw = w.readframes(w.getnframes())
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    return x.reshape(-1, 1)


# -- aligning ----------------------------------------------------------------------------------------


def align(reference: npt.ArrayLike, received: npt.ArrayLike, max_lag_samples: int) -> int:
    """The lag L (|L| <= max_lag_samples) at which ``received[n + L]`` best matches ``reference[n]``.

    L > 0 means ``received`` is late (the usual case: pipeline latency). Channels are averaged, the
    mean is removed, and the lag is the peak of the FFT cross-correlation, so a gain change, a DC
    offset or lengths that differ do not move it. The reference must not be periodic within the
    search range (use speech, noise or clicks, not a tone). Raises ValueError if either is silent.
    """
    ref = _mono(reference)
    rec = _mono(received)
    if max_lag_samples < 0:
        raise ValueError(f"align: max_lag_samples must be >= 0, not {max_lag_samples}")
    if ref.size == 0 or rec.size == 0:
        raise ValueError("align: empty signal")
    ref = ref - ref.mean()
    rec = rec - rec.mean()
    if not ref.any():
        raise ValueError("align: the reference is silent (or constant)")
    if not rec.any():
        raise ValueError("align: the received signal is silent (or constant)")
    nfft = 1 << (ref.size + rec.size - 1).bit_length()
    # xcorr[k] = sum_n rec[n + k] * ref[n]; negative k wraps to the end of the circular result.
    xcorr = np.fft.irfft(np.fft.rfft(rec, nfft) * np.conj(np.fft.rfft(ref, nfft)), nfft)
    lo = max(-max_lag_samples, -(ref.size - 1))
    hi = min(max_lag_samples, rec.size - 1)
    lags = np.arange(lo, hi + 1)
    return int(lags[int(np.argmax(xcorr[lags % nfft]))])


def trim_aligned(reference: npt.ArrayLike, received: npt.ArrayLike, lag: int) -> tuple[_F64, _F64]:
    """The overlapping parts of ``reference[n]`` and ``received[n + lag]``, equal lengths, as float64.

    Feed ``align``'s result here, then the pair to ``snr_db``, ``segmental_snr_db`` or ``correlation``.
    Channels are kept; both signals must have the same number of them.
    """
    ref = _as_float(reference)
    rec = _as_float(received)
    if ref.ndim != rec.ndim or ref.shape[1:] != rec.shape[1:]:
        raise ValueError(f"trim_aligned: channel layouts differ: {ref.shape} vs {rec.shape}")
    start = max(0, -lag)  # first reference index that has a received sample
    stop = min(ref.shape[0], rec.shape[0] - lag)
    if stop <= start:
        raise ValueError(f"trim_aligned: no overlap at lag {lag} ({ref.shape[0]} vs {rec.shape[0]} frames)")
    return ref[start:stop], rec[start + lag : stop + lag]


# -- comparing ---------------------------------------------------------------------------------------


def snr_db(reference: npt.ArrayLike, received: npt.ArrayLike, *, match_gain: bool = True) -> float:
    """Signal-to-noise ratio of ``received`` against ``reference`` (aligned, equal shapes), in dB.

    With ``match_gain`` the reference is first scaled by the least-squares gain
    g = <received, reference> / <reference, reference>, so a pure volume change costs nothing and
    only what is not a copy of the reference counts as noise (scale-invariant SNR). Returns inf for
    an exact (scaled) copy.
    """
    target, error = _target_and_error(reference, received, match_gain, "snr_db")
    noise = float(np.sum(error**2))
    signal = float(np.sum(target**2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def segmental_snr_db(
    reference: npt.ArrayLike,
    received: npt.ArrayLike,
    rate: int,
    segment_ms: float = 20.0,
    *,
    min_db: float = -10.0,
    max_db: float = 35.0,
    silence_rms_dbfs: float = -50.0,
    match_gain: bool = True,
) -> float:
    """Mean over segments of the per-segment SNR clamped to [min_db, max_db] (the standard segmental SNR).

    Unlike the global SNR, loud passages cannot hide a broken quiet one: every ``segment_ms`` counts
    the same. Segments whose reference is quieter than ``silence_rms_dbfs`` (mean square) are left
    out, since any noise there would dominate; a trailing partial segment is dropped. The clamp keeps
    one perfect or one lost segment from dominating the mean. ``match_gain`` works as in ``snr_db``
    (one gain for the whole signal). Raises ValueError if no segment is loud enough.
    """
    _check_rate(rate)
    target, error = _target_and_error(reference, received, match_gain, "segmental_snr_db")
    ref = _as_float(reference)
    seg = round(segment_ms * rate / 1000)
    if seg < 1:
        raise ValueError(f"segmental_snr_db: segment_ms={segment_ms} is shorter than one sample")
    n_seg = ref.shape[0] // seg
    used = n_seg * seg

    def per_segment(x: _F64) -> _F64:
        return np.asarray(x[:used].reshape(n_seg, -1), dtype=np.float64)

    loud = 10.0 * np.log10(np.mean(per_segment(ref) ** 2, axis=1) + 1e-30) >= silence_rms_dbfs
    if not loud.any():
        raise ValueError(
            f"segmental_snr_db: no {segment_ms} ms segment of the reference is above {silence_rms_dbfs} dBFS"
        )
    signal = np.sum(per_segment(target)[loud] ** 2, axis=1)
    noise = np.sum(per_segment(error)[loud] ** 2, axis=1)
    with np.errstate(divide="ignore"):
        ratio = 10.0 * (np.log10(np.maximum(signal, 1e-30)) - np.log10(noise))  # noise 0 -> +inf
    return float(np.mean(np.clip(ratio, min_db, max_db)))


MIN_MATCH = 0.5  # a window whose best match correlates less measures no shift (a dropout, noise)
MAX_SLIDE = 0.006  # the fastest the receiver's timeline slides: its steering limit (0.5 %) plus drift


def follow_warp(
    reference: npt.ArrayLike,
    received: npt.ArrayLike,
    rate: int,
    *,
    block_ms: float = 100.0,
    max_shift_ms: float = 3.0,
) -> _F64:
    """``received`` re-timed onto ``reference`` (both already aligned, equal shapes), sample by sample.

    The receiver's drift compensation and latency steering resample by a slowly varying ratio (tens of
    ppm for drift, up to 0.5 % while steering), which is inaudible but slides the timeline: 0.5 % moves
    it by 0.5 ms in 100 ms, enough to ruin a waveform SNR. The shift is measured in ``block_ms``
    windows (within ``max_shift_ms``), then in windows a fifth as long near that, each to a fraction of
    a sample; a line through those shifts says where to read the received signal for every output
    sample (between two samples linearly: a loss under -40 dB at 48 kHz). So a slide is followed within
    a window too, while audio that is missing or wrong stays so: only timing is undone.
    """
    _check_rate(rate)
    ref = _as_float(reference)
    rec = _as_float(received)
    if ref.shape != rec.shape:
        raise ValueError(f"follow_warp: shapes differ: {ref.shape} vs {rec.shape}")
    block = max(1, round(block_ms * rate / 1000))
    shift_max = round(max_shift_ms * rate / 1000)
    ref_m = _mono(ref)
    rec_m = np.concatenate([np.zeros(shift_max), _mono(rec), np.zeros(shift_max)])  # room to look both ways
    # Coarse: block_ms windows, anchored on the clearest and tracked from there. Voiced speech also
    # matches itself a pitch period away; each next window looks only as far from its neighbour's shift
    # as the timeline can slide in between (MAX_SLIDE), so a false match a period away is out of reach.
    coarse = _track_shifts(ref_m, rec_m, shift_max, block)
    if not coarse[0].size:
        return rec.copy()
    # Fine: windows a fifth as long, each searched near the coarse line only. Within a long window a
    # 0.5 % steer also shifts the pitch, which blurs the match by several samples; a short one is sharp.
    fine = _track_shifts(ref_m, rec_m, shift_max, max(8, block // 5), (*coarse, MAX_SLIDE * block + 2))
    return retime(rec, *(fine if fine[0].size else coarse))


def retime(received: npt.ArrayLike, centres: _F64, shifts: _F64) -> _F64:
    """``received`` read at n + shift(n), the shift drawn as a line through (``centres``, ``shifts``) and
    held beyond the ends; between two samples, linearly (a loss under -40 dB at 48 kHz)."""
    rec = _as_float(received)
    t = np.arange(rec.shape[0], dtype=np.float64)
    where = np.clip(t + np.interp(t, centres, shifts), 0, rec.shape[0] - 1)
    if rec.ndim == 1:
        return np.interp(where, t, rec)
    return np.stack([np.interp(where, t, rec[:, c]) for c in range(rec.shape[1])], axis=1)


def _track_shifts(
    ref_m: _F64,
    rec_m: _F64,
    shift_max: int,
    block: int,
    guide: tuple[_F64, _F64, float] | None = None,
) -> tuple[_F64, _F64]:
    """(window centres, shifts) every half ``block`` of ``ref_m`` (silent windows skipped): where in
    ``rec_m`` (padded by ``shift_max`` each side) the window matches best, to a fraction of a sample.
    With a ``guide`` (centres, shifts, reach: a coarser line) each window looks within reach of it;
    without, the clearest window anchors the others, each within MAX_SLIDE of its neighbour."""
    n = ref_m.size
    windows: list[tuple[int, _F64]] = []  # start, match at each shift (-shift_max first)
    best: list[int] = []  # where each matches best
    strength: list[float] = []
    for start in range(0, n - block + 1, max(1, block // 2)):
        r = ref_m[start : start + block]
        energy = float(np.dot(r, r))
        if energy == 0.0:
            continue
        score = np.correlate(rec_m[start : start + 2 * shift_max + block], r, mode="valid")
        i = int(np.argmax(score))
        seg = rec_m[start + i : start + i + block]
        windows.append((start, score))
        best.append(i)
        strength.append(float(score[i]) / math.sqrt(energy * float(np.dot(seg, seg)) + 1e-30))
    if not windows:
        return np.zeros(0), np.zeros(0)
    found: dict[int, float] = {}
    # The anchor: the clearest window among those that agree with most (a false match is the exception).
    agree = np.abs(np.array(best) - np.median(best)) <= MAX_SLIDE * block + 2
    anchor = int(np.argmax(np.where(agree, strength, -np.inf)))
    for way in (range(anchor, len(windows)), range(anchor - 1, -1, -1)):
        prev = anchor if anchor in found else None
        for j in way:
            start, score = windows[j]
            if strength[j] < MIN_MATCH and j != anchor:
                continue  # a dropout or noise: no shift to read here; the line passes over it
            if guide is not None:
                around, reach = float(np.interp(start + block / 2, guide[0], guide[1])), guide[2]
            elif prev is not None:
                around, reach = found[prev], MAX_SLIDE * abs(start - windows[prev][0]) + 2
            else:
                around, reach = 0.0, float(shift_max)
            lo = max(0, math.floor(around - reach) + shift_max)
            hi = min(score.size - 1, math.ceil(around + reach) + shift_max)
            if lo > hi:
                continue
            i = lo + int(np.argmax(score[lo : hi + 1]))
            frac = 0.0
            if 0 < i < score.size - 1:  # the peak's vertex through its neighbours: a fraction of a sample
                y0, y1, y2 = float(score[i - 1]), float(score[i]), float(score[i + 1])
                bend = y0 - 2 * y1 + y2
                if bend < 0:
                    frac = max(-0.5, min(0.5, 0.5 * (y0 - y2) / bend))
            found[j] = i - shift_max + frac
            prev = j
    kept = sorted(found)
    return np.array([windows[j][0] + block / 2 for j in kept]), np.array([found[j] for j in kept])


def chunked_snr_db(
    reference: npt.ArrayLike,
    received: npt.ArrayLike,
    rate: int,
    *,
    chunk_ms: float = 100.0,
    max_shift_ms: float = 50.0,
    silence_rms_dbfs: float = -50.0,
) -> float:
    """Median over ``chunk_ms`` chunks of the SNR, each chunk aligned on its own (within ``max_shift_ms``).

    The receiver may skip or insert whole frames to steer its latency (each a 2.5-60 ms jump of the
    timeline): a global alignment then only fits the part before or after the jump. Aligning every
    chunk separately judges the audio itself; the median ignores the few chunks that straddle a jump.
    Chunks that are silent in the reference are left out. ``received`` is searched around the
    reference's own position, so pass signals already roughly aligned (``align``/``trim_aligned``).
    """
    _check_rate(rate)
    ref = _mono(reference)
    rec = _mono(received)
    chunk = max(1, round(chunk_ms * rate / 1000))
    shift = round(max_shift_ms * rate / 1000)
    results = []
    for start in range(0, ref.size - chunk + 1, chunk):
        r = ref[start : start + chunk]
        if 10 * math.log10(float(np.mean(r**2)) + 1e-30) < silence_rms_dbfs:
            continue
        lo, hi = max(0, start - shift), min(rec.size, start + chunk + shift)
        window = rec[lo:hi]
        if window.size < chunk:
            continue
        corr = np.correlate(window, r, mode="valid")
        k = int(np.argmax(corr))
        seg = window[k : k + chunk]
        energy = float(np.dot(r, r))
        gain = float(np.dot(seg, r)) / energy
        noise = float(np.sum((seg - gain * r) ** 2))
        results.append(35.0 if noise == 0 else min(35.0, 10 * math.log10(gain * gain * energy / noise)))
    if not results:
        raise ValueError("chunked_snr_db: no chunk of the reference is loud enough")
    return float(np.median(results))


def correlation(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Pearson correlation coefficient of two equal-shape signals, in [-1, 1]; gain and DC do not matter.

    A quick "same audio?" check: near 1 for a faithful copy, near 0 for unrelated audio, near -1 for
    an inverted one. Raises ValueError if either is constant (correlation is undefined).
    """
    x = _as_float(a).ravel()
    y = _as_float(b).ravel()
    if x.shape != y.shape:
        raise ValueError(f"correlation: lengths differ: {x.size} vs {y.size}")
    x = x - x.mean()
    y = y - y.mean()
    norm = math.sqrt(float(np.dot(x, x)) * float(np.dot(y, y)))
    if norm == 0.0:
        raise ValueError("correlation: a signal is constant (silent)")
    return float(np.clip(np.dot(x, y) / norm, -1.0, 1.0))


def rms_dbfs(x: npt.ArrayLike) -> float:
    """Mean-square level in dB re full scale (-inf for digital silence): "is the output silent?"."""
    ms = float(np.mean(_as_float(x) ** 2))
    return 10.0 * math.log10(ms) if ms > 0.0 else -math.inf


# -- inspecting --------------------------------------------------------------------------------------


def find_dropouts(
    received: npt.ArrayLike,
    rate: int,
    *,
    min_ms: float = 5.0,
    silence_level: float = _LSB16,
    include_edges: bool = False,
) -> list[tuple[int, int]]:
    """Runs of digital silence, as (start, length) in samples, in a signal that should be continuous.

    A receiver fills a missing 20 ms block with zeros, which a tone or noise never produces: a
    sample counts as silent if every channel is within ``silence_level`` of zero (default one 16-bit
    step, so int16 round trips still count), and runs shorter than ``min_ms`` (zero crossings) are
    ignored. Runs touching the first or last sample are left out unless ``include_edges``, since a
    stream starts after its latency and may be cut at the end. Not for speech: it pauses.
    """
    _check_rate(rate)
    x = _as_float(received)
    quiet = np.abs(x) <= silence_level
    if quiet.ndim == 2:
        quiet = np.all(quiet, axis=1)
    edges = np.diff(np.concatenate(([0], quiet.astype(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    stops = np.flatnonzero(edges == -1)
    min_len = max(1, round(min_ms * rate / 1000))
    runs = []
    for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
        if stop - start < min_len:
            continue
        if not include_edges and (start == 0 or stop == quiet.size):
            continue
        runs.append((start, stop - start))
    return runs


def detect_clicks(
    x: npt.ArrayLike, rate: int, threshold: float, *, min_gap_s: float = 0.05
) -> npt.NDArray[np.int64]:
    """Onsets (sample indices) of clicks: the first sample with |x| >= ``threshold`` (linear, 0..1).

    After each onset the next ``min_gap_s`` is skipped, so a click's own ringing (longer after a
    codec) is not counted again; keep it below the click period. Channels are averaged. Compare
    with ``click_train(...).onsets`` to get the latency of each click.
    """
    _check_rate(rate)
    if threshold <= 0:
        raise ValueError(f"detect_clicks: threshold must be > 0, not {threshold}")
    loud = np.flatnonzero(np.abs(_mono(x)) >= threshold)
    gap = max(1, round(min_gap_s * rate))
    onsets: list[int] = []
    for i in loud.tolist():
        if not onsets or i - onsets[-1] >= gap:
            onsets.append(i)
    return np.array(onsets, dtype=np.int64)


# -- internals ---------------------------------------------------------------------------------------


def _as_float(x: npt.ArrayLike) -> _F64:
    arr: npt.NDArray[Any] = np.asarray(x)
    if arr.ndim not in (1, 2):
        raise ValueError(f"expected shape (frames,) or (frames, channels), not {arr.shape}")
    if np.issubdtype(arr.dtype, np.unsignedinteger):
        raise ValueError(f"unsigned samples ({arr.dtype}) are not supported; convert to float first")
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.float64) / float(2 ** (8 * arr.dtype.itemsize - 1))
    return arr.astype(np.float64)


def _mono(x: npt.ArrayLike) -> _F64:
    arr = _as_float(x)
    return arr.mean(axis=1) if arr.ndim == 2 else arr


def _target_and_error(
    reference: npt.ArrayLike, received: npt.ArrayLike, match_gain: bool, who: str
) -> tuple[_F64, _F64]:
    ref = _as_float(reference)
    rec = _as_float(received)
    if ref.shape != rec.shape:
        raise ValueError(f"{who}: shapes differ: {ref.shape} vs {rec.shape} (use align and trim_aligned)")
    energy = float(np.sum(ref**2))
    if energy == 0.0:
        raise ValueError(f"{who}: the reference is silent")
    gain = float(np.sum(ref * rec)) / energy if match_gain else 1.0
    target = gain * ref
    return target, rec - target


def _db_to_amplitude(db: float) -> float:
    return float(10.0 ** (db / 20.0))


def _check_rate(rate: int) -> None:
    if rate <= 0:
        raise ValueError(f"rate must be > 0, not {rate}")
