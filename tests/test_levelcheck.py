"""Silent and clipped inputs: the verdict per channel, and `tiality loopback` warning about them.

Unit checks on synthetic audio, then real recordings from the virtual sound card's microphone (fed by
``pacat``: nothing, or a tone on the left channel only).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.soundcard import VirtualSoundCard
from tiality_cli.levelcheck import LevelMeter, assess_levels, channel_levels

TIALITY = [sys.executable, "-m", "tiality_cli"]
RATE = 48_000


def tone(seconds: float, amplitude: float = 8000.0) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return np.round(amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.int16)


def test_levels_per_channel_and_the_meter_agree() -> None:
    left = tone(1.0)
    pcm = np.stack([left, np.zeros_like(left), np.clip(left.astype(np.int32) * 8, -32768, 32767)], axis=1)
    pcm = pcm.astype(np.int16)
    levels = channel_levels(pcm)
    assert [round(lv.peak_dbfs, 1) for lv in levels[:2]] == [-12.2, -120.0]
    assert round(levels[0].rms_dbfs, 1) == -15.3  # a sine's RMS is 3 dB under its peak
    assert [lv.silent for lv in levels] == [False, True, False]
    assert [lv.clipped for lv in levels] == [False, False, True]
    assert 0.5 < levels[2].clipped_share < 0.8
    meter = LevelMeter(3, 960)
    for k in range(0, len(pcm), 960):
        meter.add(pcm[k : k + 960])
    assert meter.levels() == levels


def test_the_verdicts_name_the_channel_and_the_options_that_fix_it() -> None:
    live, silent = tone(0.5), np.zeros(RATE // 2, dtype=np.int16)
    four = channel_levels(np.stack([silent, silent, live, live], axis=1))
    v = assess_levels(four, used=[0, 1], stream_channels=2)
    assert v.status == "fail" and v.silent == (0, 1)
    assert v.detail.startswith("silent: channels 0, 1 (the encoded ones); sound on channels 2, 3.")
    assert v.fix == "use --channel-map 2,3"
    one_side = channel_levels(np.stack([live, silent], axis=1))
    v = assess_levels(one_side, used=[0, 1], stream_channels=2)
    assert (v.status, v.silent, v.fix) == ("warn", (1,), "use --channel-map 0,0")
    assert v.detail.startswith("channel 1 silent: part of the stream is mute")
    nothing = channel_levels(np.stack([silent, silent], axis=1))
    v = assess_levels(nothing, used=[0, 1], stream_channels=2)
    assert v.status == "fail" and v.detail == "silent: no sound on channels 0, 1 (peak -120.0 dBFS)"
    assert "--capture-channels" in v.fix and "--channel-map" in v.fix
    loud = np.full(RATE // 2, 32767, dtype=np.int16)
    v = assess_levels(channel_levels(np.stack([live, loud], axis=1)), used=[0, 1], stream_channels=2)
    assert (v.status, v.clipped) == ("warn", (1,))
    assert v.detail.startswith("channel 1 clipped (100.00% of the samples at full scale")
    v = assess_levels(channel_levels(np.stack([live, live], axis=1)), used=[0, 1], stream_channels=2)
    assert (v.status, v.fix) == ("pass", "")


def _loopback(card: VirtualSoundCard, feed: np.ndarray | None) -> subprocess.CompletedProcess[str]:
    player = card.play_into_mic(feed) if feed is not None else None
    try:
        return subprocess.run(
            [*TIALITY, "loopback", "-i", "alsa://tmic", "-o", "null://", "--seconds", "1", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**card.process_env(), "NO_COLOR": "1", "COLUMNS": "200"},
        )
    finally:
        if player is not None:
            player.kill()
            player.wait()


@pytest.mark.soundcard
def test_loopback_warns_about_a_silent_microphone(sound_card: VirtualSoundCard) -> None:
    done = _loopback(sound_card, None)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["input_check"]["status"] == "fail"
    assert [c["peak_dbfs"] for c in figures["input_channels"]] == [-120.0, -120.0]
    (warning,) = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert warning.startswith("tiality loopback: warning: input silent: no sound on channels 0, 1")
    assert "--capture-channels" in warning and "--channel-map" in warning


@pytest.mark.soundcard
def test_loopback_names_the_silent_channel_and_suggests_a_channel_map(sound_card: VirtualSoundCard) -> None:
    left = tone(8.0)
    done = _loopback(sound_card, np.stack([left, np.zeros_like(left)], axis=1))
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    left_level, right_level = figures["input_channels"]
    assert -13.0 < left_level["peak_dbfs"] < -11.5 and right_level["silent"]
    (warning,) = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert warning.startswith("tiality loopback: warning: input channel 1 silent: part of the stream is mute")
    assert warning.endswith("Fix: use --channel-map 0,0")
