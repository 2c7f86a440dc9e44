"""A TCP proxy for tests that injects network faults between a client and a server on loopback.

The test kernel has no ``tc netem``, so tests put this proxy between the sender and the receiver's
port instead, and break the link while audio streams:

    with FaultProxy("127.0.0.1", server_port) as proxy:
        connect the client to 127.0.0.1:proxy.port
        proxy.wait_for_connections(1, timeout=5)
        proxy.set_delay(80)        # one-way latency, client -> server
        proxy.stall(); ...; proxy.resume()   # hold everything, then release it in a burst
        proxy.inject_garbage(64)   # corrupt the client -> server stream
        proxy.cut()                # reset every connection (RST both ways)

Controls: set_delay, stall, resume, cut, inject_garbage, close. Each runs on the proxy's I/O thread
and returns once it has taken effect, so "after ``stall()`` returns nothing more is forwarded" holds,
and they may be called from any thread while streams run.
State: counters() (a ProxyCounters snapshot), port, delay_ms, stalled.
Waiting: wait_until(predicate, timeout), wait_for_connections(n, timeout), wait_for_bytes(...).
Waits block on a condition the I/O thread signals; they never poll or sleep.

One thread runs every socket (non-blocking, ``selectors``), so no direction can block another.
Chunks wait in per-direction FIFO queues: a delayed chunk holds back those behind it, so order is
kept. While a queue holds more than ``max_buffered`` bytes its source is not read, and TCP flow
control pushes back on the sender as a slow network would.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import os
import random
import selectors
import socket
import struct
import threading
import time
import typing
from collections.abc import Callable
from concurrent.futures import Future
from types import TracebackType
from typing import Self, TypeVar

__all__ = ["FaultProxy", "ProxyCounters"]

_T = TypeVar("_T")
_CHUNK = 65536
_CONTROL_TIMEOUT_S = 5.0  # a control that takes longer means the I/O thread is stuck: fail loudly


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyCounters:
    """What the proxy has done so far; bytes count what the sockets actually read and wrote."""

    connections_accepted: int = 0
    connections_active: int = 0
    connect_failures: int = 0  # clients reset because the target refused or was unreachable
    resets: int = 0  # connections ended by cut() or by a reset from either side
    bytes_from_client: int = 0  # read from clients
    bytes_to_server: int = 0  # written to the server, injected garbage included
    bytes_from_server: int = 0
    bytes_to_client: int = 0
    garbage_bytes: int = 0  # queued by inject_garbage, summed over connections


class _Pipe:
    """One direction of one connection: bytes read from ``src`` waiting to be written to ``dst``."""

    def __init__(self, src: socket.socket, dst: socket.socket, delayed: bool) -> None:
        self.src = src
        self.dst = dst
        self.delayed = delayed  # only client -> server chunks get the delay
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()  # (due, chunk)
        self.head_sent = 0  # bytes of queue[0] already written
        self.queued = 0  # bytes waiting, for the max_buffered back-pressure
        self.src_eof = False
        self.dst_shut = False
        self.want_write = False  # dst's send buffer was full: wait for it to drain


class _Conn:
    def __init__(self, client: socket.socket, server: socket.socket, connecting: bool) -> None:
        self.client = client
        self.server = server
        self.connecting = connecting  # non-blocking connect to the target still in progress
        self.up = _Pipe(client, server, delayed=True)
        self.down = _Pipe(server, client, delayed=False)
        self.masks: dict[socket.socket, int] = {client: 0, server: 0}


class FaultProxy:
    """Forwards 127.0.0.1:``port`` to ``target_host:target_port``, with faults on demand.

    It listens (port 0, see ``port``) and starts its I/O thread on construction; ``close()``, or
    leaving the ``with`` block, stops it and closes every socket. Each accepted client gets its own
    connection to the target.
    """

    def __init__(self, target_host: str, target_port: int, *, max_buffered: int = 4 << 20) -> None:
        family, _, _, _, address = socket.getaddrinfo(target_host, target_port, type=socket.SOCK_STREAM)[0]
        self._target_family = family
        self._target_address = address
        self._max_buffered = max_buffered
        self._delay_s = 0.0
        self._stalled = False
        self._conns: list[_Conn] = []
        self._counts: dict[str, int] = {f.name: 0 for f in dataclasses.fields(ProxyCounters)}
        self._cond = threading.Condition()
        # (run, fail): run on the I/O thread, or fail with the reason if the proxy closes first
        self._commands: collections.deque[tuple[Callable[[], None], Callable[[BaseException], None]]]
        self._commands = collections.deque()
        self._closing = False
        self._closed = False
        self._crash: BaseException | None = None  # what killed the I/O thread, reported by close()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, "listener")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name=f"FaultProxy:{self.port}", daemon=True)
        self._thread.start()

    # -- controls (any thread) -----------------------------------------------------------------------

    def set_delay(self, ms: float) -> None:
        """Holds each client -> server chunk read from now on for ``ms`` before writing it (order kept)."""
        if ms < 0:
            raise ValueError(f"set_delay: ms must be >= 0, not {ms}")
        self._call(lambda: setattr(self, "_delay_s", ms / 1000.0))

    def stall(self) -> None:
        """Stops forwarding in both directions, connections open; incoming bytes queue up."""
        self._call(lambda: setattr(self, "_stalled", True))

    def resume(self) -> None:
        """Ends a stall: everything queued is written at once (a burst), then forwarding goes on."""
        self._call(lambda: setattr(self, "_stalled", False))

    def cut(self) -> int:
        """Resets every current connection (SO_LINGER 0, so both peers get RST); returns how many."""
        return self._call(self._cut_all)

    def inject_garbage(self, n_bytes: int, *, seed: int | None = None) -> bytes:
        """Queues ``n_bytes`` random bytes into every current client -> server stream; returns them.

        They go in behind what has already been read from the client and ahead of what comes next.
        """
        if n_bytes < 1:
            raise ValueError(f"inject_garbage: n_bytes must be >= 1, not {n_bytes}")
        data = os.urandom(n_bytes) if seed is None else _seeded_bytes(n_bytes, seed)
        self._call(lambda: self._inject(data))
        return data

    def close(self) -> None:
        """Stops the I/O thread and closes the listener and every connection (normal close). Idempotent.

        Raises RuntimeError if the I/O thread had died of an exception, so a proxy bug fails the test.
        """
        with self._cond:
            self._closing = True
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(_CONTROL_TIMEOUT_S)
        if self._crash is not None:
            raise RuntimeError(f"FaultProxy:{self.port}: the I/O thread failed: {self._crash!r}")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- state and waits -----------------------------------------------------------------------------

    @property
    def delay_ms(self) -> float:
        return self._delay_s * 1000.0

    @property
    def stalled(self) -> bool:
        return self._stalled

    def counters(self) -> ProxyCounters:
        with self._cond:
            return ProxyCounters(**self._counts)

    def wait_until(self, predicate: Callable[[ProxyCounters], bool], timeout: float) -> ProxyCounters:
        """Blocks until ``predicate(counters)`` holds; returns those counters, or raises TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                counters = ProxyCounters(**self._counts)
                if predicate(counters):
                    return counters
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    state = self._closed_reason() if self._closed else f"timed out after {timeout} s"
                    raise TimeoutError(f"FaultProxy:{self.port}: {state} waiting; counters: {counters}")
                self._cond.wait(left)

    def wait_for_connections(self, n: int, timeout: float) -> ProxyCounters:
        """Blocks until ``n`` connections have been accepted in all (not necessarily still open)."""
        return self.wait_until(lambda c: c.connections_accepted >= n, timeout)

    def wait_for_bytes(
        self,
        *,
        from_client: int = 0,
        to_server: int = 0,
        from_server: int = 0,
        to_client: int = 0,
        timeout: float,
    ) -> ProxyCounters:
        """Blocks until each counter has reached at least the given total."""
        return self.wait_until(
            lambda c: (
                c.bytes_from_client >= from_client
                and c.bytes_to_server >= to_server
                and c.bytes_from_server >= from_server
                and c.bytes_to_client >= to_client
            ),
            timeout,
        )

    # -- plumbing between the callers and the I/O thread --------------------------------------------

    def _call(self, fn: Callable[[], _T]) -> _T:
        if threading.current_thread() is self._thread:
            return fn()
        future: Future[_T] = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller, not lost in the I/O thread
                future.set_exception(exc)

        with self._cond:
            if self._closing:
                raise RuntimeError(f"FaultProxy:{self.port}: {self._closed_reason()}")
            self._commands.append((run, future.set_exception))
        self._wake()
        return future.result(_CONTROL_TIMEOUT_S)

    def _closed_reason(self) -> str:
        return "closed" if self._crash is None else f"closed: the I/O thread failed: {self._crash!r}"

    def _wake(self) -> None:
        # A full wake-up pipe means a wake-up is pending anyway; a closed one, that the loop has ended.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _bump(self, **deltas: int) -> None:
        with self._cond:
            for name, delta in deltas.items():
                self._counts[name] += delta
            self._counts["connections_active"] = len(self._conns)
            self._cond.notify_all()

    # -- the I/O thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    commands = list(self._commands)
                    self._commands.clear()
                    closing = self._closing
                for run, _ in commands:
                    run()
                if closing:
                    break
                now = time.monotonic()
                for conn in list(self._conns):
                    self._service(conn, now)
                timeout = self._next_due(now)
                for key, events in self._sel.select(timeout):
                    self._on_event(key, events)
        except BaseException as exc:
            self._crash = exc
            raise
        finally:
            self._shutdown()

    def _on_event(self, key: selectors.SelectorKey, events: int) -> None:
        if key.data == "listener":
            self._accept()
        elif key.data == "wake":
            with contextlib.suppress(BlockingIOError):
                while self._wake_r.recv(4096):
                    pass
        else:
            conn: _Conn = key.data
            sock = typing.cast(socket.socket, key.fileobj)
            if conn not in self._conns:
                return  # reset earlier in this batch of events
            if conn.connecting and sock is conn.server:
                if events & selectors.EVENT_WRITE:
                    self._finish_connect(conn)
                return
            if events & selectors.EVENT_READ:
                self._read(conn, conn.up if sock is conn.client else conn.down)
            if conn in self._conns and events & selectors.EVENT_WRITE:
                (conn.down if sock is conn.client else conn.up).want_write = False

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError:
                return  # e.g. the client already reset; nothing to forward
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            server = socket.socket(self._target_family, socket.SOCK_STREAM)
            server.setblocking(False)
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = server.connect_ex(self._target_address)
            conn = _Conn(client, server, connecting=err != 0)
            self._conns.append(conn)
            self._bump(connections_accepted=1)
            if err not in (0, errno.EINPROGRESS):
                self._fail_connect(conn)

    def _finish_connect(self, conn: _Conn) -> None:
        if conn.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
            self._fail_connect(conn)
        else:
            conn.connecting = False

    def _fail_connect(self, conn: _Conn) -> None:
        self._reset(conn, counter="connect_failures")  # RST the client, as a refused connect would

    def _read(self, conn: _Conn, pipe: _Pipe) -> None:
        try:
            data = pipe.src.recv(_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            self._reset(conn)  # pass a reset from one side on to the other
            return
        if not data:
            pipe.src_eof = True
            return
        due = time.monotonic() + (self._delay_s if pipe.delayed else 0.0)
        pipe.queue.append((due, data))
        pipe.queued += len(data)
        self._bump(**{"bytes_from_client" if pipe.delayed else "bytes_from_server": len(data)})

    def _service(self, conn: _Conn, now: float) -> None:
        """Writes what is due in both directions, passes on EOFs, and updates the selector."""
        if not conn.connecting:
            for pipe in (conn.up, conn.down):
                if not self._flush(conn, pipe, now):
                    return  # the connection was reset
            if conn.up.dst_shut and conn.down.dst_shut:
                self._drop(conn)
                conn.client.close()
                conn.server.close()
                self._bump()
                return
        self._update_interest(conn)

    def _flush(self, conn: _Conn, pipe: _Pipe, now: float) -> bool:
        if self._stalled or pipe.want_write:
            return True
        sent_total = 0
        while pipe.queue and pipe.queue[0][0] <= now:
            chunk = pipe.queue[0][1]
            try:
                sent = pipe.dst.send(memoryview(chunk)[pipe.head_sent :])
            except BlockingIOError:
                pipe.want_write = True
                break
            except OSError:
                self._reset(conn)
                return False
            sent_total += sent
            pipe.head_sent += sent
            if pipe.head_sent < len(chunk):
                pipe.want_write = True
                break
            pipe.queue.popleft()
            pipe.head_sent = 0
        pipe.queued -= sent_total
        if sent_total:
            self._bump(**{"bytes_to_server" if pipe.delayed else "bytes_to_client": sent_total})
        if pipe.src_eof and not pipe.queue and not pipe.dst_shut:
            pipe.dst_shut = True
            with contextlib.suppress(OSError):
                pipe.dst.shutdown(socket.SHUT_WR)  # pass the half-close on
        return True

    def _update_interest(self, conn: _Conn) -> None:
        wanted = {conn.client: 0, conn.server: 0}
        if conn.connecting:
            wanted[conn.server] = selectors.EVENT_WRITE
        else:
            for pipe in (conn.up, conn.down):
                if not pipe.src_eof and pipe.queued < self._max_buffered:
                    wanted[pipe.src] |= selectors.EVENT_READ
                if pipe.want_write:
                    wanted[pipe.dst] |= selectors.EVENT_WRITE
        for sock, mask in wanted.items():
            old = conn.masks[sock]
            if mask == old:
                continue
            if old == 0:
                self._sel.register(sock, mask, conn)
            elif mask == 0:
                self._sel.unregister(sock)
            else:
                self._sel.modify(sock, mask, conn)
            conn.masks[sock] = mask

    def _next_due(self, now: float) -> float | None:
        """Seconds until the earliest delayed chunk falls due (None: nothing is waiting on time)."""
        if self._stalled:
            return None
        due = [p.queue[0][0] for c in self._conns for p in (c.up, c.down) if p.queue and not p.want_write]
        return max(0.0, min(due) - now) if due else None

    def _inject(self, data: bytes) -> None:
        now = time.monotonic()
        n = 0
        for conn in self._conns:
            if not conn.up.dst_shut:
                conn.up.queue.append((now, data))
                conn.up.queued += len(data)
                n += 1
        self._bump(garbage_bytes=n * len(data))

    def _cut_all(self) -> int:
        conns = list(self._conns)
        for conn in conns:
            self._reset(conn)
        return len(conns)

    def _reset(self, conn: _Conn, counter: str = "resets") -> None:
        """Closes both sides with SO_LINGER 0, which sends RST instead of FIN."""
        self._drop(conn)
        for sock in (conn.client, conn.server):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        self._bump(**{counter: 1})

    def _drop(self, conn: _Conn) -> None:
        self._conns.remove(conn)
        for sock, mask in conn.masks.items():
            if mask:
                self._sel.unregister(sock)
                conn.masks[sock] = 0

    def _shutdown(self) -> None:
        for conn in list(self._conns):
            self._drop(conn)
            conn.client.close()
            conn.server.close()
        self._sel.close()
        self._listener.close()
        self._wake_r.close()
        with self._cond:
            self._closing = True
            self._closed = True
            pending = list(self._commands)
            self._commands.clear()
            self._counts["connections_active"] = 0
            self._cond.notify_all()
        for _, fail in pending:
            fail(RuntimeError(f"FaultProxy:{self.port}: {self._closed_reason()}"))
        self._wake_w.close()


def _seeded_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)
