"""Is the input silent or clipped, channel by channel, and what to do about it.

    channel_levels(pcm, labels) -> [ChannelLevel]      peak, RMS and full-scale share of each column
    assess_levels(levels, used, stream_channels) -> LevelVerdict    pass / warn / fail, the detail, the fix

Shared by ``tiality doctor`` (which measures every device channel, so it can point at the live ones) and
``tiality loopback`` (which sees the channels it encodes). Channels are numbered as ``--channel-map``
numbers them: device channels from 0. A Pi's mic array often delivers its signal on other channels
than the first two, or on none until its gain is raised: the fix names the options that reach it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

SILENCE_DBFS = -120.0  # the level reported for digital silence (JSON has no -inf)
SILENT_PEAK = 1  # |sample| <= 1 LSB (-90 dBFS) over the whole check: digital silence, not a quiet room
CLIP_LEVEL = 32767  # a sample at full scale (either sign)
CLIP_SHARE = 0.0005  # 0.05% of the samples at full scale: clipping (a loud but clean signal has none)


def dbfs(value: float) -> float:
    """An int16 amplitude in dBFS (full scale 32768), SILENCE_DBFS for 0."""
    return max(SILENCE_DBFS, 20 * math.log10(value / 32768)) if value > 0 else SILENCE_DBFS


@dataclass(frozen=True, slots=True)
class ChannelLevel:
    """One channel's level over the check; ``channel`` is its number as ``--channel-map`` counts."""

    channel: int
    peak: int  # the largest |sample|
    rms_dbfs: float
    clipped_share: float  # share of the samples at full scale

    @property
    def peak_dbfs(self) -> float:
        return dbfs(float(self.peak))

    @property
    def silent(self) -> bool:
        return self.peak <= SILENT_PEAK

    @property
    def clipped(self) -> bool:
        return self.clipped_share >= CLIP_SHARE

    def as_dict(self) -> dict[str, float | int | bool]:
        return {
            "channel": self.channel,
            "peak_dbfs": round(self.peak_dbfs, 1),
            "rms_dbfs": round(self.rms_dbfs, 1),
            "clipped_pct": round(self.clipped_share * 100, 3),
            "silent": self.silent,
            "clipped": self.clipped,
        }


def channel_levels(pcm: npt.NDArray[np.int16], labels: Sequence[int] | None = None) -> list[ChannelLevel]:
    """Levels of each column of ``pcm`` (samples x channels); ``labels`` numbers them (default 0, 1...)."""
    x = pcm.reshape(len(pcm), -1) if pcm.ndim == 2 else pcm.reshape(-1, 1)
    n = max(1, len(x))
    wide = x.astype(np.int32)
    peaks = np.abs(wide).max(axis=0, initial=0)
    clipped = np.count_nonzero(np.abs(wide) >= CLIP_LEVEL, axis=0)
    f = x.astype(np.float64)
    sq = np.einsum("ij,ij->j", f, f)
    names = list(labels) if labels is not None else list(range(x.shape[1]))
    return [
        ChannelLevel(names[c], int(peaks[c]), dbfs(math.sqrt(float(sq[c]) / n)), float(clipped[c]) / n)
        for c in range(x.shape[1])
    ]


class LevelMeter:
    """Accumulates ``channel_levels`` frame by frame (live capture); every buffer is allocated once."""

    def __init__(self, channels: int, frame_samples: int) -> None:
        self.peaks = np.zeros(channels, dtype=np.int32)
        self.clipped = np.zeros(channels, dtype=np.int64)
        self.sum_sq = np.zeros(channels, dtype=np.float64)
        self.samples = 0
        self._wide = np.zeros((frame_samples, channels), dtype=np.int32)
        self._f = np.zeros((frame_samples, channels), dtype=np.float64)
        self._mask = np.zeros((frame_samples, channels), dtype=np.bool_)
        self._peak = np.zeros(channels, dtype=np.int32)
        self._count = np.zeros(channels, dtype=np.int64)
        self._sq = np.zeros(channels, dtype=np.float64)

    def add(self, frame: npt.NDArray[np.int16]) -> None:
        n = len(frame)
        if n == 0:
            return
        wide, f, mask = self._wide[:n], self._f[:n], self._mask[:n]
        np.abs(frame, out=wide, dtype=np.int32)
        np.max(wide, axis=0, out=self._peak)
        np.maximum(self.peaks, self._peak, out=self.peaks)
        np.greater_equal(wide, CLIP_LEVEL, out=mask)
        np.sum(mask, axis=0, out=self._count)
        self.clipped += self._count
        np.copyto(f, wide)
        np.einsum("ij,ij->j", f, f, out=self._sq)
        self.sum_sq += self._sq
        self.samples += n

    def levels(self, labels: Sequence[int] | None = None) -> list[ChannelLevel]:
        n = max(1, self.samples)
        names = list(labels) if labels is not None else list(range(len(self.peaks)))
        return [
            ChannelLevel(
                names[c],
                int(self.peaks[c]),
                dbfs(math.sqrt(float(self.sum_sq[c]) / n)),
                float(self.clipped[c]) / n,
            )
            for c in range(len(self.peaks))
        ]


@dataclass(frozen=True, slots=True)
class LevelVerdict:
    status: str  # "pass", "warn" or "fail"
    detail: str
    fix: str  # "" when nothing needs doing
    silent: tuple[int, ...]  # channels (of those encoded) with no signal
    clipped: tuple[int, ...]  # channels (of those encoded) that clip


def _names(channels: Sequence[int]) -> str:
    word = "channel" if len(channels) == 1 else "channels"
    return f"{word} {', '.join(str(c) for c in channels)}"


def _figures(levels: Sequence[ChannelLevel]) -> str:
    if len(levels) == 1:
        lv = levels[0]
        return f"peak {lv.peak_dbfs:.1f} dBFS, RMS {lv.rms_dbfs:.1f} dBFS"
    return "; ".join(
        f"ch {lv.channel}: "
        + ("silent" if lv.silent else f"peak {lv.peak_dbfs:.1f} / RMS {lv.rms_dbfs:.1f} dBFS")
        for lv in levels
    )


def suggest_map(live: Sequence[int], stream_channels: int) -> str:
    """A ``--channel-map`` value built from channels that carry signal (repeated when too few)."""
    picks = [live[i % len(live)] for i in range(stream_channels)]
    return ",".join(str(c) for c in picks)


def assess_levels(
    levels: Sequence[ChannelLevel], used: Sequence[int], stream_channels: int, downmix: bool = False
) -> LevelVerdict:
    """Judges the channels that reach the encoder (``used``, numbered like ``levels``).

    All of them silent: fail (nothing would be heard). Some: warn, one side of the stream is silent.
    Clipping: warn. ``levels`` may list more channels than are used (doctor opens every device
    channel): the fix then points at those that carry a signal.
    """
    by = {lv.channel: lv for lv in levels}
    used_u = [c for c in dict.fromkeys(used) if c in by]
    silent = tuple(c for c in used_u if by[c].silent)
    clipped = tuple(c for c in used_u if by[c].clipped)
    live = [lv.channel for lv in levels if not lv.silent]
    figures = _figures(levels)
    more = " --capture-channels 4 (a mic array), then --channel-map with the channels that carry sound"
    if used_u and len(silent) == len(used_u):
        if live:
            spare = [c for c in live if c not in used_u]
            return LevelVerdict(
                "fail",
                f"silent: {_names(silent)} (the encoded ones); sound on {_names(live)}. {figures}",
                f"use --channel-map {suggest_map(spare or live, stream_channels)}",
                silent,
                clipped,
            )
        loudest = max(by[c].peak_dbfs for c in silent)
        return LevelVerdict(
            "fail",
            f"silent: no sound on {_names(silent)} (peak {loudest:.1f} dBFS)",
            "unmute the microphone and raise its capture gain (alsamixer, F4), check that this is the right "
            f"device (tiality devices); or open more of its channels:{more}",
            silent,
            clipped,
        )
    if silent:
        if downmix:
            fix = f"--channel-map {suggest_map(live, stream_channels)} instead of --downmix"
        else:
            fix = f"use --channel-map {suggest_map(live, stream_channels)}" if live else more.strip()
        effect = "the downmix loses level" if downmix else "part of the stream is mute"
        return LevelVerdict(
            "warn",
            f"{_names(silent)} silent: {effect} ({figures})",
            fix,
            silent,
            clipped,
        )
    if clipped:
        worst = max(by[c].clipped_share for c in clipped)
        return LevelVerdict(
            "warn",
            f"{_names(clipped)} clipped ({worst * 100:.2f}% of the samples at full scale; {figures})",
            "lower the capture gain (alsamixer, F4) or the source's volume",
            silent,
            clipped,
        )
    return LevelVerdict("pass", figures, "", silent, clipped)
