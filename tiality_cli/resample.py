"""libsamplerate's converters through ctypes, into a buffer allocated once.

The playout resamples every frame of every stream for drift compensation. python-samplerate's
``Resampler.process`` allocates its output array on each call: at 64 streams, 3200 arrays a second
(issue 11). This calls the same library (the symbols python-samplerate exports) with the same converter
and the same output room, so the audio is bit for bit the same, into one ``output`` array. The call
releases the GIL (ctypes.CDLL), as libopus's does: holding it through the sink's 64 decodes and
conversions per block was measured to starve the gRPC loop's thread and make packets late.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
CONVERTERS = {"sinc_best": 0, "sinc_medium": 1, "sinc_fastest": 2, "zero_order_hold": 3, "linear": 4}
# What drift compensation may use: zero_order_hold drops or repeats whole samples (a click on highs at each).
DRIFT_CONVERTERS = ("sinc_fastest", "linear", "sinc_medium", "sinc_best")


class _SrcData(ctypes.Structure):
    _fields_ = (
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("input_frames", ctypes.c_long),
        ("output_frames", ctypes.c_long),
        ("input_frames_used", ctypes.c_long),
        ("output_frames_gen", ctypes.c_long),
        ("end_of_input", ctypes.c_int),
        ("src_ratio", ctypes.c_double),
    )


def _library() -> ctypes.CDLL:
    import samplerate

    lib = ctypes.CDLL(samplerate.__file__)
    lib.src_new.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int))
    lib.src_new.restype = ctypes.c_void_p
    lib.src_process.argtypes = (ctypes.c_void_p, ctypes.POINTER(_SrcData))
    lib.src_process.restype = ctypes.c_int
    lib.src_reset.argtypes = (ctypes.c_void_p,)
    lib.src_reset.restype = ctypes.c_int
    lib.src_delete.argtypes = (ctypes.c_void_p,)
    lib.src_delete.restype = ctypes.c_void_p
    lib.src_strerror.argtypes = (ctypes.c_int,)
    lib.src_strerror.restype = ctypes.c_char_p
    return lib


_lib: ctypes.CDLL | None = None


class Resampler:
    """One stream's converter: ``process(x, ratio)`` converts ``x`` (n x channels float32, C-contiguous,
    n <= ``max_input``) into ``output`` and returns how many samples it wrote there."""

    _state: int | None = None

    def __init__(self, converter: str, channels: int, max_input: int) -> None:
        global _lib
        if converter not in CONVERTERS:
            known = ", ".join(CONVERTERS)
            raise ValueError(f"unknown libsamplerate converter {converter!r} (one of {known})")
        if _lib is None:
            _lib = _library()
        self._libref = _lib
        err = ctypes.c_int(0)
        state = _lib.src_new(CONVERTERS[converter], channels, ctypes.byref(err))
        if not state:
            raise RuntimeError(f"libsamplerate: {_lib.src_strerror(err.value).decode()}")
        self._state = state
        self.channels = channels
        # Room for the input at the highest ratio the playout uses (well under 2).
        self.output = np.zeros((2 * max_input + 16, channels), dtype=np.float32)
        self._data = _SrcData()
        self._data.data_out = self.output.ctypes.data
        self._ref = ctypes.byref(self._data)

    def process(self, x: F32, ratio: float) -> int:
        d = self._data
        d.data_in = x.ctypes.data
        d.input_frames = n = len(x)
        d.end_of_input = 0
        d.src_ratio = ratio
        # As python-samplerate asks: libsamplerate ramps a new ratio in over the output it is given room
        # for, so the same room gives the same audio.
        d.output_frames = math.ceil(n * ratio)
        err = self._libref.src_process(self._state, self._ref)
        if err:
            raise RuntimeError(f"libsamplerate: {self._libref.src_strerror(err).decode()}")
        return int(d.output_frames_gen)

    def reset(self) -> None:
        self._libref.src_reset(self._state)

    def close(self) -> None:
        if self._state is not None:
            self._libref.src_delete(self._state)
            self._state = None

    def __del__(self) -> None:
        self.close()
