"""ALSA capture and playback through pyalsaaudio: the natural devices of a headless Pi.

Capture: one period per frame; ``read(out)`` returns the wall-clock time of the frame's first sample.
Playback: a thread fills one 5 ms period at a time and writes it to a 4-period buffer. ``overruns`` and
``underruns`` count the device's xruns. Device names: any ALSA PCM name (``default``, ``hw:1,0``,
``plughw:CARD=Array,DEV=0``, a name from asound.conf).
"""

from __future__ import annotations

import select as _select
import threading as _threading
from typing import Any

import numpy as np
import numpy.typing as npt

from tiality_cli.clock import Clock
from tiality_cli.config import AudioFormat
from tiality_cli.errors import DeviceError
from tiality_cli.io.backends import load_alsaaudio
from tiality_cli.io.base import BLOCK_US, NS, POLL_MS, STALL_S, FillFn, Freshness, realtime_thread
from tiality_cli.io.listing import device_error, ranges
from tiality_cli.io.routing import ChannelRouter


def alsa_reason(message: str) -> str:
    """A user's reason for an ALSAAudioError text such as 'Device or resource busy [hw:1,0]'."""
    text = message.rsplit(" [", 1)[0]
    low = text.lower()
    if "no such file" in low or "no such device" in low:
        return "no such ALSA device"
    if "busy" in low:
        return "busy: another program is using it (close it, or use a dsnoop/dmix or pulse device)"
    if "permission" in low:
        return "permission denied (add your user to the 'audio' group)"
    return text


def open_alsa_pcm(
    uri: str, device: str, capture: bool, rate: int, channels: int, period: int, periods: int
) -> tuple[Any, dict[str, Any]]:
    """Opens and configures an ALSA PCM (non-blocking), or raises DeviceError with the reason."""
    aa = load_alsaaudio()
    if not device:
        raise device_error(
            uri, "expected alsa://DEVICE, e.g. alsa://default or alsa://hw:1,0", capture, "alsa://"
        )
    try:
        pcm = aa.PCM(
            type=aa.PCM_CAPTURE if capture else aa.PCM_PLAYBACK,
            mode=aa.PCM_NONBLOCK,
            device=device,
            rate=rate,
            channels=channels,
            format=aa.PCM_FORMAT_S16_LE,
            periodsize=period,
            periods=periods,
        )
    except aa.ALSAAudioError as exc:
        raise device_error(uri, alsa_reason(str(exc)), capture, "alsa://") from None
    info = pcm.info()
    # pyalsaaudio silently keeps what the device accepts: check what we got.
    what = "capture" if capture else "play"
    problem = ""
    if info["channels"] != channels:
        offered = ranges(pcm.getchannels())
        problem = f"cannot {what} {channels} channel(s) (the device offers {offered})"
    elif info["rate"] != rate:
        problem = f"cannot {what} at {rate} Hz (the device runs at {info['rate']} Hz; plughw: converts)"
    elif info["format_name"] != "S16_LE":
        problem = f"cannot {what} 16-bit samples (the device offers {info['format_name']}; plughw: converts)"
    if problem:
        pcm.close()
        raise device_error(uri, problem, capture, "alsa://")
    return pcm, info


class _PcmPoll:
    """Waits on a PCM's poll descriptors (registered once per PCM, not once per wait)."""

    def __init__(self, pcm: Any, events: int) -> None:
        self._pcm = pcm
        self._events = events | _select.POLLERR  # an error is "ready": the next call reports it
        self._poller = _select.poll()
        for fd, mask in pcm.polldescriptors():
            self._poller.register(fd, mask)

    def wait(self, timeout_ms: int) -> bool:
        """True when the PCM can be read/written (or is in error), False after ``timeout_ms``."""
        ready = self._poller.poll(timeout_ms)
        return bool(ready) and bool(self._pcm.polldescriptors_revents(ready) & self._events)


class AlsaCapture:
    """ALSA capture, one period per frame; see the module doc for the timestamps."""

    def __init__(self, uri: str, device: str, fmt: AudioFormat, router: ChannelRouter, clock: Clock) -> None:
        self.format = fmt
        self.name = uri
        self.overruns = 0
        self.dropped_ns = 0
        self.device = device
        self._router = router
        self._clock = clock
        self._periods = max(4, -(-100_000 // fmt.frame_us))  # >= 100 ms of slack for a late reader
        self._pcm: Any = None
        self._closing = False
        self._lock = _threading.Lock()
        self._opened = False
        self._reopen()

    def _reopen(self) -> None:
        fmt = self.format
        self._pcm, info = open_alsa_pcm(
            self.name,
            self.device,
            True,
            fmt.sample_rate,
            self._router.device_channels,
            fmt.frame_samples,
            self._periods,
        )
        self._poll = _PcmPoll(self._pcm, _select.POLLIN)
        self.period = int(info["period_size"])
        self.buffer_frames = int(info["buffer_size"])
        self._stage = np.zeros(
            (fmt.frame_samples + self.period, self._router.device_channels), dtype=np.int16
        )
        self._staged = 0
        self._fresh = Freshness(fmt.frame_samples)

    def open(self) -> None:
        with self._lock:
            if self._pcm is None:
                self._reopen()
            self._closing = False
            self._staged = 0
            self._pcm.read()  # a prepared capture PCM starts on its first read (non-blocking: returns 0)
            self._opened = True

    def read(self, out: npt.NDArray[np.int16]) -> int | None:
        """Blocks for the next frame; returns the wall-clock time its first sample reached the ADC.

        What is queued behind the frame is checked after every read: a stale backlog (Freshness) is
        dropped, oldest first, so the frame returned is never more than a period old.
        """
        n = self.format.frame_samples
        rate = self.format.sample_rate
        with self._lock:
            pcm = self._pcm
            if pcm is None or self._closing:
                return None
            if not self._opened:
                raise RuntimeError("open() the source before read()")
            while True:
                if not self._fill(pcm, n):
                    return None
                queued = max(0, int(pcm.avail()))
                drop = self._fresh.excess(queued + self._staged - n)
                if not drop:
                    break
                self.dropped_ns += drop * NS // rate
                self._discard(pcm, drop)
            t = self._clock.wall_ns() - (queued + self._staged) * NS // rate
            self._router.route(self._stage[:n], out)
            rest = self._staged - n
            if rest:
                self._stage[:rest] = self._stage[n : self._staged]
            self._staged = rest
            return t

    def _fill(self, pcm: Any, n: int) -> bool:
        """Reads until ``n`` samples are staged; False when closing."""
        stalled = 0
        kick = False
        while self._staged < n:
            if self._closing:
                return False
            if not kick and not self._poll.wait(POLL_MS):
                stalled += POLL_MS
                if stalled >= STALL_S * 1000:
                    raise DeviceError(f"{self.name}: no audio from the device for {STALL_S:g} s")
                continue
            kick = False
            length = self._read_chunk(pcm)
            if length < 0:  # -EPIPE: overrun; pyalsaaudio has prepared the PCM again
                self.overruns += 1
                self._staged = 0  # never join audio across a gap
                kick = True  # the next read restarts capture
            elif length:
                stalled = 0
        return True

    def _read_chunk(self, pcm: Any) -> int:
        """One non-blocking read appended to the stage; returns its length (< 0: overrun)."""
        try:
            length, data = pcm.read()
        except Exception as exc:  # ALSAAudioError: unplugged, server gone...
            raise DeviceError(f"{self.name}: capture failed: {alsa_reason(str(exc))}") from None
        if length > 0:
            if self._staged + length > len(self._stage):  # more than a frame and a period: grow once
                grown = np.zeros((self._staged + length, self._stage.shape[1]), dtype=np.int16)
                grown[: self._staged] = self._stage[: self._staged]
                self._stage = grown
            chunk = np.frombuffer(data, dtype=np.int16).reshape(length, -1)
            self._stage[self._staged : self._staged + length] = chunk
            self._staged += length
        return int(length)

    def _discard(self, pcm: Any, count: int) -> None:
        """Drops the oldest ``count`` samples: staged ones first, then straight from the device."""
        while count > 0:
            take = min(count, self._staged)
            if take:
                rest = self._staged - take
                self._stage[:rest] = self._stage[take : self._staged]
                self._staged = rest
                count -= take
            elif self._read_chunk(pcm) <= 0:
                return  # nothing more queued after all (or an overrun, counted by the next fill)

    def close(self) -> None:
        self._closing = True
        with self._lock:
            if self._pcm is not None:
                self._pcm.close()
                self._pcm = None
            self._opened = False


class AlsaPlayback:
    """ALSA playback: a thread fills one 5 ms period at a time and writes it to a 4-period buffer."""

    # 4 x 5 ms, as the PortAudio sink: the device plays one period while we fill the next, two more
    # absorb scheduling jitter. (3 x 20 ms cost about 30 ms more end to end; docs/performance.md.)
    PERIODS = 4

    def __init__(self, uri: str, device: str, fmt: AudioFormat, clock: Clock) -> None:
        self.name = uri
        self.device = device
        self.format: AudioFormat | None = None
        self.underruns = 0
        self.frames_written = 0
        self.delay_ns = 0  # audio queued in the device after the last write
        self.delay_at_ns = 0  # when (monotonic) that was read: the next block reaches the DAC at the sum
        self.error: BaseException | None = None
        self._clock = clock
        self._pcm: Any = None
        self._stop = _threading.Event()
        self._thread: _threading.Thread | None = None
        self.open(fmt)

    def open(self, fmt: AudioFormat) -> None:
        if self._pcm is not None and fmt == self.format:
            return
        self.stop()
        if self._pcm is not None:
            self._pcm.close()
            self._pcm = None
        self.period = min(fmt.frame_samples, fmt.sample_rate * BLOCK_US // 1_000_000)
        self._pcm, info = open_alsa_pcm(
            self.name, self.device, False, fmt.sample_rate, fmt.channels, self.period, self.PERIODS
        )
        self.buffer_frames = int(info["buffer_size"])
        self._poll = _PcmPoll(self._pcm, _select.POLLOUT)
        self.format = fmt

    def start(self, fill: FillFn) -> None:
        if self.format is None or self._pcm is None:
            raise RuntimeError("open() the sink before start()")
        self.stop()
        self._stop.clear()
        self._thread = _threading.Thread(
            target=self._run, args=(fill, self.format), name=self.name, daemon=True
        )
        self._thread.start()

    def _run(self, fill: FillFn, fmt: AudioFormat) -> None:
        pcm = self._pcm
        buf = np.zeros((self.period, fmt.channels), dtype=np.int16)
        n = len(buf)
        realtime_thread()
        try:
            while not self._stop.is_set():
                if fill(buf):
                    self.frames_written += n
                done = stalled = 0
                while done < n and not self._stop.is_set():
                    if not self._poll.wait(POLL_MS):
                        stalled += POLL_MS
                        if stalled >= STALL_S * 1000:
                            raise DeviceError(f"{self.name}: the device took no audio for {STALL_S:g} s")
                        continue
                    try:
                        written = pcm.write(buf[done:])
                    except Exception as exc:  # ALSAAudioError: unplugged, server gone...
                        raise DeviceError(f"{self.name}: playback failed: {alsa_reason(str(exc))}") from None
                    if written < 0:  # -EPIPE: underrun; pyalsaaudio has prepared the PCM again
                        self.underruns += 1
                        continue
                    done += written
                self.delay_ns = max(0, self.buffer_frames - int(pcm.avail())) * NS // fmt.sample_rate
                self.delay_at_ns = self._clock.monotonic_ns()
        except BaseException as exc:  # reported through .error: nothing may escape a device thread
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._pcm is not None:
                self._pcm.drop()  # the next write prepares and restarts the PCM

    def close(self) -> None:
        self.stop()
        if self._pcm is not None:
            self._pcm.close()
            self._pcm = None
