"""What every source and sink is: the real-time contracts, URIs, pacing and the shared device limits.

Sources (``-i``): ``read(out)`` blocks until one whole frame is available, writes it into ``out`` (int16,
shape (frame_samples, channels)) and returns the sender's wall-clock time of the frame's first sample in
ns, or None when the source has ended. Synthetic sources pace themselves from an absolute schedule
(start + k frames), so they behave like a microphone: a late reader catches up instead of drifting.

Sinks (``-o``): the sink is the clock. It pulls audio by calling ``fill(buf)``, which must write the
whole buffer (int16, shape (n, channels)) in place and return True when it holds stream audio, False
when no stream is playing (the buffer is then silence). A device sink calls ``fill`` from its audio
callback; a file or null sink from its own thread paced in real time, one 5 ms block at a time, and
keeps only the blocks for which it returned True, so a file holds exactly the streams' audio.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from tiality_cli.clock import SYSTEM_CLOCK, Clock
from tiality_cli.config import AudioFormat
from tiality_cli.errors import ConfigError

BLOCK_US = 5_000  # the paced sinks' pull period, and the device sinks' period
STALL_S = 5.0  # a device that delivers or takes no audio for this long is reported as broken
POLL_MS = 100  # how often a blocked device read or write looks at close()/stop()
NS = 1_000_000_000
FillFn = Callable[[npt.NDArray[np.int16]], bool]


class Source(Protocol):
    """A real-time stream of int16 frames in ``format`` (see the module doc for the contract)."""

    format: AudioFormat
    name: str
    overruns: int  # frames the source lost because nobody read them in time
    dropped_ns: int  # stale audio dropped so that the capture device never queues beyond a period

    def open(self) -> None: ...

    def read(self, out: npt.NDArray[np.int16]) -> int | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class CaptureOptions:
    """Which device channels reach the encoder (devices only)."""

    capture_channels: int | None = None  # channels opened on the device; None: the stream's count
    channel_map: tuple[int, ...] | None = None  # device channel per stream channel; None: the first ones
    downmix: bool = False  # average all captured channels into each stream channel instead


INPUTS_TOLD = "tone://FREQ, file:PATH.wav, alsa://DEVICE, sd://DEVICE"  # how the error messages name them
OUTPUTS_TOLD = "alsa://DEVICE, sd://DEVICE, file:PATH.wav, null://"


def split_uri(uri: str, known: str = INPUTS_TOLD) -> tuple[str, str]:
    """Returns (scheme, rest) for a source/sink URI, or raises ConfigError naming ``known``: the schemes
    of the side it was given for (an output's list must not offer tone://)."""
    for scheme in ("tone://", "file:", "alsa://", "sd://", "null://", "app://"):
        if uri.startswith(scheme):
            rest = uri[len(scheme) :]
            if scheme == "file:" and rest.startswith("//"):
                rest = rest[2:]  # file://path as well as file:path
            return scheme, rest
    raise ConfigError(f"{uri!r}: unknown scheme; use one of {known}")


class Halt:
    """A stop flag for threads that wait out a period 50-200 times a second: the timed wait is one C call
    on a lock held until ``set()`` (threading.Event.wait is a Python Condition that allocates a lock per
    call), and once released the lock stays released for every later wait."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout_s: float) -> bool:
        """Sleeps up to ``timeout_s``; True (at once) when set."""
        if self._lock.acquire(timeout=timeout_s):
            self._release()  # set: keep it released for every later wait
        return self._set

    def set(self) -> None:
        self._set = True
        self._release()

    def clear(self) -> None:
        self._lock.acquire(blocking=False)  # held again (it already is unless set)
        self._set = False

    def _release(self) -> None:
        with contextlib.suppress(RuntimeError):  # already released (set twice, or by a waiter)
            self._lock.release()


class Pacer:
    """Waits for frame k to be 'captured' at start + (k + 1) frames on the monotonic clock."""

    def __init__(self, frame_ns: int, clock: Clock) -> None:
        self._frame_ns = frame_ns
        self._clock = clock
        self._start_mono = 0
        self._start_wall = 0
        self.k = 0
        self._halt = Halt()

    def start(self) -> None:
        self._start_mono = self._clock.monotonic_ns()
        self._start_wall = self._clock.wall_ns()
        self.k = 0

    def wait_next(self) -> int | None:
        """Blocks until the next frame is due; returns its first sample's wall time, None if stopped."""
        due = self._start_mono + (self.k + 1) * self._frame_ns
        delay = due - self._clock.monotonic_ns()
        if (delay > 0 and self._halt.wait(delay / 1e9)) or self._halt.is_set():
            return None
        t = self._start_wall + self.k * self._frame_ns
        self.k += 1
        return t

    def stop(self) -> None:
        self._halt.set()


class Sink(Protocol):
    """Real-time consumer of audio; see the module doc for the ``fill`` contract."""

    name: str
    format: AudioFormat | None  # None until opened: file sinks take the first stream's format
    underruns: int  # device periods that found no data ready in time (device sinks)
    frames_written: int  # samples per channel kept (stream audio only)

    def open(self, fmt: AudioFormat) -> None: ...

    def start(self, fill: FillFn) -> None: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


def to_int16(
    block: npt.NDArray[np.float32], out: npt.NDArray[np.int16], gain: float = 1.0, peak: float | None = None
) -> None:
    """Float audio (full scale 1.0) times ``gain`` into a sink's int16 buffer, rounded and clipped.

    For a sink's ``fill`` (every block): scales ``block`` in place and allocates nothing. ``peak``: the
    block's largest magnitude when the caller has it (the mixer's limiter does); a block that cannot
    reach full scale then skips the clip, the costliest of these calls.
    """
    scale = gain * 32768.0
    np.multiply(block, scale, out=block)
    np.rint(block, out=block)
    if peak is None or peak * abs(scale) > 32767.0:
        np.clip(block, -32768, 32767, out=block)
    out[:] = block


class AppSink:
    """The application's own audio engine is the clock (``app://``): it calls ``Receiver.fill(buf)`` itself.

    Nothing runs here; the format is the one the application asked the receiver for, and ``delay_ns`` is
    how long its engine takes from ``fill`` to the DAC, when it knows (for A/V sync).
    """

    def __init__(self, fmt: AudioFormat | None = None, name: str = "app://") -> None:
        self.name = name
        self.format: AudioFormat | None = fmt
        self.underruns = 0
        self.frames_written = 0
        self.delay_ns = 0

    def open(self, fmt: AudioFormat) -> None:
        self.format = fmt

    def start(self, fill: FillFn) -> None:
        if self.format is None:
            raise RuntimeError("open() the sink before start()")

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


REALTIME_PRIORITY = 4  # SCHED_FIFO priority of the audio threads: below the sound server's (PulseAudio 5)
REALTIME_ENV = "TIALITY_REALTIME"  # 0 keeps every thread in the ordinary policy


def realtime_thread(priority: int = REALTIME_PRIORITY) -> bool:
    """Moves the calling thread to SCHED_FIFO at ``priority``, as sound servers and JACK clients run
    theirs: a device thread then preempts ordinary work (a build, a browser, the robot's own software)
    the moment its period is due, instead of waiting for its time slice behind it. False where the OS
    refuses (no CAP_SYS_NICE or RLIMIT_RTPRIO, not Linux) or ``TIALITY_REALTIME=0`` says not to: the
    thread runs on as it was."""
    if os.environ.get(REALTIME_ENV, "1").strip().lower() in ("0", "no", "false", "off"):
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (OSError, AttributeError):
        return False
    return True


class ClockedSink:
    """Base for sinks with no hardware clock: a thread calls ``fill`` once per frame period."""

    fixed_format: AudioFormat | None = None
    # How far behind its schedule the thread may fall (fill() slower than real time) before it gives the
    # time up and plays on from now, as a sound card does after an underrun; None: it catches up, so that
    # a file keeps every sample.
    max_lag_ns: int | None = None

    def __init__(self, name: str, clock: Clock = SYSTEM_CLOCK) -> None:
        self.name = name
        self.format: AudioFormat | None = None
        self.underruns = 0
        self.frames_written = 0
        self.late_ticks = 0  # ticks that ran more than one period behind schedule (a busy machine)
        self.limit_seconds: float | None = None  # keep no more than this much audio (recv --seconds)
        self._clock = clock
        self._halt = Halt()  # 200 waits a second
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def open(self, fmt: AudioFormat) -> None:
        self.format = fmt

    def start(self, fill: FillFn) -> None:
        if self.format is None:
            raise RuntimeError("open() the sink before start()")
        self._halt.clear()
        self._thread = threading.Thread(
            target=self._run, args=(fill, self.format), name=self.name, daemon=True
        )
        self._thread.start()

    def _run(self, fill: FillFn, fmt: AudioFormat) -> None:
        # Pull in blocks of at most 5 ms, as a sound card with a small period would: a frame decoded
        # at a block boundary then waits at most one block before it goes out.
        block = min(fmt.frame_samples, fmt.sample_rate * BLOCK_US // 1_000_000)
        buf = np.zeros((block, fmt.channels), dtype=np.int16)
        period = block * 1_000_000_000 // fmt.sample_rate
        due = self._clock.monotonic_ns()
        while not self._halt.is_set():
            due += period
            now = self._clock.monotonic_ns()
            delay = due - now
            if delay > 0:
                if self._halt.wait(delay / 1e9):
                    break
            elif delay < -period:
                self.late_ticks += 1
                if self.max_lag_ns is not None and delay < -self.max_lag_ns:
                    self.underruns += 1
                    due = now
            if fill(buf):
                keep = len(buf)
                if self.limit_seconds is not None:
                    keep = max(
                        0, min(keep, round(self.limit_seconds * fmt.sample_rate) - self.frames_written)
                    )
                if keep:
                    with self._lock:
                        self.consume(buf[:keep])
                        self.frames_written += keep

    def consume(self, buf: npt.NDArray[np.int16]) -> None:
        """Takes one frame of stream audio (called on the sink's thread)."""

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.stop()


class Freshness:
    """Decides when audio queued in a capture device is stale, so that it never turns into latency.

    A capture device hands over audio in bursts (the pulse plugin gives 3-8 frames at once at start) and
    a reader can stall (a GC pause, a frozen process, a slow Pi): either way frames wait in the device,
    and a reader that then takes one frame per period keeps that backlog for good. After each read,
    ``excess(backlog)`` says how many samples to drop so that at most one period stays queued: at once
    when the backlog is ``burst`` periods or more (nothing normal explains that), otherwise when more
    than a period has stayed queued for ``persist`` reads in a row (a device that delivers two periods
    at a time leaves one queued every other read only, which is left alone).
    """

    def __init__(self, period: int, persist: int = 3, burst: int = 3) -> None:
        self.period = period
        self._persist = persist
        self._burst = burst
        self._over = 0
        self.dropped = 0  # samples (per channel) dropped so far

    def excess(self, backlog: int) -> int:
        """Samples to drop now, oldest first (whole periods), given what is queued after this frame."""
        p = self.period
        if backlog <= p:
            self._over = 0
            return 0
        self._over += 1
        if backlog < self._burst * p and self._over < self._persist:
            return 0
        self._over = 0
        drop = -(-(backlog - p) // p) * p
        self.dropped += drop
        return drop
