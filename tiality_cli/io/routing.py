"""Channel routing: which captured device channels reach the encoder (``--channel-map``, ``--downmix``)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from tiality_cli.config import AudioFormat
from tiality_cli.errors import ConfigError
from tiality_cli.io.base import CaptureOptions


class ChannelRouter:
    """Copies the stream's channels out of a device frame, without allocating per frame.

    ``device_channels`` are opened on the device; stream channel c takes device channel ``channel_map[c]``,
    or with ``downmix`` the average of all device channels.
    """

    def __init__(
        self, device_channels: int, channel_map: tuple[int, ...], downmix: bool, max_samples: int
    ) -> None:
        self.device_channels = device_channels
        self.channel_map = channel_map
        self.downmix = downmix
        self.identity = not downmix and channel_map == tuple(range(device_channels))
        self._acc = np.zeros(max_samples if downmix else 0, dtype=np.int32)

    def route(self, src: npt.NDArray[np.int16], out: npt.NDArray[np.int16]) -> None:
        """``src``: (n, device_channels); ``out``: (n, len(channel_map)), written in place."""
        if self.identity:
            out[:] = src
        elif self.downmix:
            acc = self._acc[: len(src)]
            np.sum(src, axis=1, dtype=np.int32, out=acc)
            np.floor_divide(acc, self.device_channels, out=acc)
            for c in range(out.shape[1]):
                out[:, c] = acc
        else:
            for c, d in enumerate(self.channel_map):
                out[:, c] = src[:, d]


def resolve_capture(fmt: AudioFormat, capture: CaptureOptions) -> ChannelRouter:
    """Checks the capture options against the stream format; raises ConfigError naming the option."""
    n = fmt.channels
    if capture.downmix and capture.channel_map is not None:
        raise ConfigError("--downmix and --channel-map exclude each other: choose one")
    cmap = capture.channel_map if capture.channel_map is not None else tuple(range(n))
    if len(cmap) != n:
        raise ConfigError(
            f"--channel-map {','.join(map(str, cmap))}: needs {n} device channel(s), one per stream channel"
        )
    device_channels = capture.capture_channels
    if device_channels is None:
        device_channels = n if capture.downmix else max(n, max(cmap) + 1)
    if device_channels < 1:
        raise ConfigError(f"--capture-channels {device_channels}: must be at least 1")
    bad = [d for d in cmap if not 0 <= d < device_channels]
    if bad and not capture.downmix and capture.channel_map is None:
        raise ConfigError(
            f"--capture-channels {device_channels}: fewer than the {n} stream channels; "
            f"add --channel-map (e.g. {','.join(['0'] * n)}) or --downmix"
        )
    if bad and not capture.downmix:
        raise ConfigError(
            f"--channel-map {','.join(map(str, cmap))}: channel {bad[0]} does not exist in "
            f"{device_channels} captured channel(s) (0-{device_channels - 1})"
        )
    return ChannelRouter(device_channels, cmap, capture.downmix, fmt.frame_samples)
