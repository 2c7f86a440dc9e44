"""PortAudio capture and playback through python-sounddevice (``sd://NAME_OR_INDEX``).

``sd://`` takes a PortAudio device number, or words that must appear in order in "device name, host
API"; an exact name wins over substrings; ``sd://`` and ``sd://default`` are PortAudio's default device.
The playback callback hands its own output buffer to ``fill``: nothing is allocated per period.
"""

from __future__ import annotations

import threading as _threading
from typing import Any

import numpy as np
import numpy.typing as npt

from tiality_cli.clock import Clock
from tiality_cli.config import AudioFormat
from tiality_cli.errors import DeviceError
from tiality_cli.io.backends import load_sounddevice
from tiality_cli.io.base import BLOCK_US, NS, POLL_MS, STALL_S, FillFn, Freshness, realtime_thread
from tiality_cli.io.listing import device_error, sd_defaults, sd_match
from tiality_cli.io.routing import ChannelRouter

SD_OUTPUT_LATENCY_S = 0.020  # PortAudio output buffer asked for: 'low' (~9 ms) underran under CPU load


def sd_device(uri: str, query: str, capture: bool) -> tuple[Any, int, dict[str, Any]]:
    """Resolves an sd:// device (number, words, default); returns (sounddevice, index, info)."""
    sd = load_sounddevice()
    kind = "input" if capture else "output"
    infos = list(sd.query_devices())
    hostapis = [h["name"] for h in sd.query_hostapis()]
    q = query.strip()
    if q.lower() in ("", "default"):
        index = sd_defaults(sd)[0 if capture else 1]
        if index < 0:
            raise device_error(uri, f"PortAudio has no default {kind} device", capture, "sd://")
    elif q.isdigit():
        index = int(q)
        if index >= len(infos) or infos[index][f"max_{kind}_channels"] <= 0:
            raise device_error(uri, f"no PortAudio {kind} device number {index}", capture, "sd://")
    else:
        matches = sd_match(infos, hostapis, q, kind)
        if not matches:
            raise device_error(uri, f"no PortAudio {kind} device matches {q!r}", capture, "sd://")
        if len(matches) > 1:
            names = ", ".join(f"sd://{i} ({infos[i]['name']})" for i in matches)
            raise DeviceError(
                f"{uri}: {len(matches)} {kind} devices match {q!r}: {names}; name one exactly or by number"
            )
        index = matches[0]
    return sd, index, dict(infos[index])


def _sd_open_error(
    uri: str, exc: Exception, info: dict[str, Any], capture: bool, channels: int, rate: int
) -> DeviceError:
    kind = "input" if capture else "output"
    code = exc.args[1] if len(exc.args) > 1 else 0
    if code == -9998:  # paInvalidChannelCount
        verb = "capture" if capture else "play"
        reason = f"cannot {verb} {channels} channel(s) (max {info[f'max_{kind}_channels']})"
    elif code == -9997:  # paInvalidSampleRate
        reason = f"cannot run at {rate} Hz (default rate {info['default_samplerate']:g} Hz)"
    elif code == -9985:  # paDeviceUnavailable
        reason = "busy or unavailable: another program may be using it"
    else:
        reason = str(exc)
    return device_error(uri, reason, capture, "sd://")


class SdCapture:
    """PortAudio capture: the callback copies each frame into a small ring that read() drains."""

    RING_FRAMES = 8  # frames kept for a late reader; older ones are dropped (and counted) first

    def __init__(self, uri: str, query: str, fmt: AudioFormat, router: ChannelRouter, clock: Clock) -> None:
        self.format = fmt
        self.name = uri
        self.overruns = 0
        self.dropped_ns = 0
        self._router = router
        self._clock = clock
        self._realtime: bool | None = None  # the callback thread's scheduling: None until it first runs
        self._fresh = Freshness(fmt.frame_samples)
        sd, index, info = sd_device(uri, query, True)
        self.device = f"sd://{index} ({info['name']})"
        ch, n = router.device_channels, fmt.frame_samples
        if ch > info["max_input_channels"]:
            raise device_error(
                uri, f"cannot capture {ch} channel(s) (max {info['max_input_channels']})", True, "sd://"
            )
        self._ring = np.zeros((self.RING_FRAMES, n, ch), dtype=np.int16)
        self._times = np.zeros(self.RING_FRAMES, dtype=np.int64)
        self._written = self._read = 0
        self._cond = _threading.Condition()
        self._closing = False
        self._frame_ns = fmt.frame_ns
        self._pa_time = PaTimeMap()
        self._close_lock = _threading.Lock()
        self._stream_closed = False
        try:
            self._stream = sd.InputStream(
                device=index,
                samplerate=fmt.sample_rate,
                channels=ch,
                dtype="int16",
                blocksize=n,
                latency="low",
                callback=self._callback,
            )
        except sd.PortAudioError as exc:
            raise _sd_open_error(uri, exc, info, True, ch, fmt.sample_rate) from None
        self.latency_s = float(self._stream.latency)

    def _callback(self, indata: npt.NDArray[np.int16], frames: int, time: Any, status: Any) -> None:
        now = self._clock.wall_ns()
        if self._realtime is None:  # PortAudio's ALSA host API leaves its callback thread unscheduled
            self._realtime = realtime_thread()
        if status.input_overflow:
            self.overruns += 1
        # PortAudio's ADC time of the first sample; never later than one frame before now.
        age = 0
        if 0.0 < time.currentTime - time.inputBufferAdcTime < 1.0:
            age = now - self._pa_time.to_local(time.currentTime, now, time.inputBufferAdcTime)
        with self._cond:
            if self._written - self._read >= self.RING_FRAMES:
                self._read += 1
                self.overruns += 1
                self.dropped_ns += self._frame_ns
            slot = self._written % self.RING_FRAMES
            self._ring[slot] = indata
            self._times[slot] = now - max(age, self._frame_ns)
            self._written += 1
            self._cond.notify()

    def open(self) -> None:
        with self._cond:
            self._closing = False
            self._written = self._read = 0
        if not self._stream.active:
            self._stream.start()

    def read(self, out: npt.NDArray[np.int16]) -> int | None:
        waited = 0.0
        with self._cond:
            while self._written == self._read:
                if self._closing:
                    return None
                if not self._cond.wait(POLL_MS / 1000):
                    waited += POLL_MS / 1000
                    if waited >= STALL_S:
                        raise DeviceError(f"{self.name}: no audio from the device for {STALL_S:g} s")
            if self._closing:
                return None
            n = self.format.frame_samples
            drop = self._fresh.excess((self._written - self._read - 1) * n) // n
            if drop:  # a stale backlog (the reader stalled): skip the oldest frames, keep the newest
                self._read += drop
                self.dropped_ns += drop * self._frame_ns
            slot = self._read % self.RING_FRAMES
            self._router.route(self._ring[slot], out)
            self._read += 1
            return int(self._times[slot])

    def close(self) -> None:
        """Ends reads at once; stops and closes the stream once, whichever threads call it (a sender's
        ``stop()`` and the end of its ``run()`` may close together: two concurrent Pa_StopStream calls
        on one stream, one of them closing it, hung ``send -i sd://`` at exit)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        with self._close_lock:
            if self._stream_closed:
                return
            self._stream_closed = True
            self._stream.stop()
            self._stream.close()


class PaTimeMap:
    """Maps PortAudio's stream times (ADC/DAC times in a callback) onto one of our clocks.

    A callback's ``currentTime`` is when PortAudio read the device, which can be well before the
    callback's Python code runs (it waits for the GIL). Using ``DacTime - currentTime`` as the delay
    from *now* then reads the lateness as device delay. The offset between the two clocks is the
    smallest ``now - currentTime`` seen: the callback that ran at once. It creeps up 1 µs per callback
    (0.2 ms/s at 5 ms callbacks) so that a step of the system clock is followed.
    """

    CREEP_NS = 1_000

    def __init__(self) -> None:
        self._offset_ns: int | None = None

    def to_local(self, current_s: float, now_ns: int, pa_s: float) -> int:
        """``pa_s`` (a PortAudio time) on the clock ``now_ns`` was read from, at ``current_s``."""
        offset = now_ns - int(current_s * NS)
        if self._offset_ns is None or offset < self._offset_ns + self.CREEP_NS:
            self._offset_ns = offset
        else:
            self._offset_ns += self.CREEP_NS
        return int(pa_s * NS) + self._offset_ns


class SdPlayback:
    """PortAudio playback: one continuous OutputStream whose callback hands its buffer to ``fill``.

    The callback period is 5 ms (BLOCK_US; at most one frame) and the buffer about 20 ms
    (SD_OUTPUT_LATENCY_S): a small period shortens the output delay, which with 20 ms periods is at
    least two of them (through the virtual card: 46 ms of output delay with 20 ms blocks, 34 ms with
    5 ms blocks in a 20 ms buffer). PortAudio's 'low' (~9 ms) underran with both CPUs busy.
    ``fill`` gets any length.
    """

    def __init__(
        self, uri: str, query: str, fmt: AudioFormat, clock: Clock, blocksize: int | None = None
    ) -> None:
        self.name = uri
        self.format: AudioFormat | None = None
        self.underruns = 0
        self.frames_written = 0
        self.delay_ns = 0  # from the callback to the DAC, as PortAudio last reported it
        self.delay_at_ns = 0  # when (monotonic) the callback read it: the block reaches the DAC at the sum
        self.error: BaseException | None = None
        self._clock = clock
        self._realtime: bool | None = None  # the callback thread's scheduling: None until it first runs
        self._blocksize = blocksize
        self._fill: FillFn = _silence
        self._pa_time = PaTimeMap()
        self._stream: Any = None
        self._sd, self._index, self._info = sd_device(uri, query, False)
        self.device = f"sd://{self._index} ({self._info['name']})"
        self.open(fmt)

    def open(self, fmt: AudioFormat) -> None:
        if self._stream is not None and fmt == self.format:
            return
        self.close()
        sd = self._sd
        if fmt.channels > self._info["max_output_channels"]:
            reason = f"cannot play {fmt.channels} channel(s) (max {self._info['max_output_channels']})"
            raise device_error(self.name, reason, False, "sd://")
        try:
            self._stream = sd.OutputStream(
                device=self._index,
                samplerate=fmt.sample_rate,
                channels=fmt.channels,
                dtype="int16",
                blocksize=self._blocksize or min(fmt.frame_samples, fmt.sample_rate * BLOCK_US // 1_000_000),
                latency=SD_OUTPUT_LATENCY_S,
                callback=self._callback,
            )
        except sd.PortAudioError as exc:
            raise _sd_open_error(self.name, exc, self._info, False, fmt.channels, fmt.sample_rate) from None
        self.latency_s = float(self._stream.latency)
        self.format = fmt

    def _callback(self, outdata: npt.NDArray[np.int16], frames: int, time: Any, status: Any) -> None:
        if self._realtime is None:  # PortAudio's ALSA host API leaves its callback thread unscheduled
            self._realtime = realtime_thread()
        if status.output_underflow:
            self.underruns += 1
        now = self._clock.monotonic_ns()
        if 0.0 < time.outputBufferDacTime - time.currentTime < 1.0:  # 0 where a host API gives no times
            self.delay_ns = max(
                0, self._pa_time.to_local(time.currentTime, now, time.outputBufferDacTime) - now
            )
        self.delay_at_ns = now  # every callback: without times, the last delay counts from now
        try:
            if self._fill(outdata):
                self.frames_written += frames
        except BaseException as exc:  # reported through .error; the stream goes quiet
            self.error = exc
            outdata.fill(0)
            raise self._sd.CallbackAbort from None

    def start(self, fill: FillFn) -> None:
        if self._stream is None:
            raise RuntimeError("open() the sink before start()")
        self.stop()
        self._fill = fill
        self._stream.start()

    def stop(self) -> None:
        if self._stream is not None and not self._stream.stopped:
            self._stream.stop()
        self._fill = _silence

    def close(self) -> None:
        if self._stream is not None:
            self.stop()
            self._stream.close()
            self._stream = None


def _silence(buf: npt.NDArray[np.int16]) -> bool:
    buf.fill(0)
    return False
