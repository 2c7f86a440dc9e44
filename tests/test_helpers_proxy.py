"""The fault proxy forwards exactly, and each fault does what the end-to-end tests rely on."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.helpers.proxy import FaultProxy

TIMEOUT = 5.0  # every blocking step fails after this instead of hanging the suite


class Server:
    """A loopback server on port 0 that records what it receives and how each connection ended.

    ``echo`` sends every byte back; ``greeting`` is sent as soon as a connection is accepted.
    """

    def __init__(self, *, echo: bool, greeting: bytes = b"") -> None:
        self.echo = echo
        self.greeting = greeting
        self.received = bytearray()
        self.endings: list[str] = []  # "eof" or "reset", one per finished connection
        self.cond = threading.Condition()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        ending = "eof"
        try:
            conn.sendall(self.greeting)
            while data := conn.recv(65536):
                with self.cond:
                    self.received += data
                    self.cond.notify_all()
                if self.echo:
                    conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except ConnectionResetError:
            ending = "reset"
        except OSError:
            ending = "closed"
        with self.cond:
            self.endings.append(ending)
            self.cond.notify_all()

    def push(self, data: bytes) -> None:
        """Sends ``data`` to every accepted connection, unprompted (server -> client traffic)."""
        for conn in self.conns:
            conn.sendall(data)

    def wait_for_endings(self, n: int) -> list[str]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.endings) >= n, TIMEOUT), f"endings: {self.endings}"
            return list(self.endings)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        self.listener.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def echo_server() -> Iterator[Server]:
    server = Server(echo=True)
    yield server
    server.close()


@pytest.fixture
def sink_server() -> Iterator[Server]:
    server = Server(echo=False)
    yield server
    server.close()


def connect(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        assert data, f"EOF after {len(buf)} of {n} bytes"
        buf += data
    return bytes(buf)


def recv_until_eof(sock: socket.socket) -> bytes:
    buf = bytearray()
    while data := sock.recv(65536):
        buf += data
    return bytes(buf)


def round_trip_s(sock: socket.socket) -> float:
    start = time.perf_counter()
    sock.sendall(b"x")
    assert recv_exactly(sock, 1) == b"x"
    return time.perf_counter() - start


def payload(n: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(n)


def test_forwards_both_ways_exactly_and_counts(echo_server: Server) -> None:
    data = payload(1 << 20)
    with FaultProxy("127.0.0.1", echo_server.port) as proxy, connect(proxy) as sock:

        def send() -> None:  # concurrently with the reads below, or both sides' buffers fill up
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        echoed = recv_until_eof(sock)
        sender.join(TIMEOUT)
        counters = proxy.wait_until(lambda c: c.connections_active == 0, TIMEOUT)

    assert echoed == data
    assert echo_server.wait_for_endings(1) == ["eof"]
    assert counters.connections_accepted == 1
    assert counters.bytes_from_client == counters.bytes_to_server == len(data)
    assert counters.bytes_from_server == counters.bytes_to_client == len(data)
    assert (counters.resets, counters.garbage_bytes, counters.connect_failures) == (0, 0, 0)


def test_forwards_a_stream_to_a_sink_and_passes_the_half_close_on(sink_server: Server) -> None:
    data = payload(300_000)
    with FaultProxy("127.0.0.1", sink_server.port) as proxy:
        for _ in range(3):
            with connect(proxy) as sock:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                assert recv_until_eof(sock) == b""  # the sink's own FIN comes back through the proxy
        assert sink_server.wait_for_endings(3) == ["eof"] * 3
        counters = proxy.wait_for_connections(3, TIMEOUT)

    assert bytes(sink_server.received) == data * 3
    assert counters.connections_accepted == 3
    assert counters.bytes_to_server == 3 * len(data)


def test_delay_adds_at_least_the_asked_latency(echo_server: Server) -> None:
    with FaultProxy("127.0.0.1", echo_server.port) as proxy, connect(proxy) as sock:
        round_trip_s(sock)
        proxy.set_delay(60)
        assert proxy.delay_ms == 60
        delayed = [round_trip_s(sock) for _ in range(3)]
        proxy.set_delay(0)
        round_trip_s(sock)

    assert min(delayed) >= 0.060, delayed


def test_delay_holds_only_client_to_server() -> None:
    server = Server(echo=False, greeting=b"hello")
    try:
        with FaultProxy("127.0.0.1", server.port) as proxy:
            proxy.set_delay(10_000)
            with connect(proxy) as sock:
                sock.sendall(b"x")
                proxy.wait_for_bytes(from_client=1, timeout=TIMEOUT)
                greeting = recv_exactly(sock, 5)  # flows server -> client while "x" is held
                counters = proxy.wait_for_bytes(to_client=5, timeout=TIMEOUT)
    finally:
        server.close()

    assert greeting == b"hello"
    assert counters.bytes_from_client == 1
    assert counters.bytes_to_server == 0
    assert counters.bytes_to_client == 5


def test_lowering_the_delay_keeps_the_order(sink_server: Server) -> None:
    with FaultProxy("127.0.0.1", sink_server.port) as proxy, connect(proxy) as sock:
        proxy.set_delay(150)
        sock.sendall(b"A" * 1000)
        proxy.wait_for_bytes(from_client=1000, timeout=TIMEOUT)
        proxy.set_delay(0)
        sock.sendall(b"B" * 1000)  # due at once, but queued behind the delayed A's
        sock.shutdown(socket.SHUT_WR)
        assert sink_server.wait_for_endings(1) == ["eof"]

    assert bytes(sink_server.received) == b"A" * 1000 + b"B" * 1000


def test_stall_queues_everything_and_resume_releases_it(echo_server: Server) -> None:
    data = payload(100_000)
    with FaultProxy("127.0.0.1", echo_server.port) as proxy, connect(proxy) as sock:
        round_trip_s(sock)
        proxy.stall()
        assert proxy.stalled
        sock.sendall(data)
        held = proxy.wait_for_bytes(from_client=1 + len(data), timeout=TIMEOUT)
        proxy.resume()
        echoed = recv_exactly(sock, len(data))

    assert (held.bytes_to_server, held.bytes_to_client) == (1, 1)  # only the first round trip
    assert echoed == data


def test_stall_holds_server_to_client_too(echo_server: Server) -> None:
    with FaultProxy("127.0.0.1", echo_server.port) as proxy, connect(proxy) as sock:
        round_trip_s(sock)  # the server has accepted, so push() reaches this connection
        proxy.stall()
        echo_server.push(b"z")
        held = proxy.wait_for_bytes(from_server=2, timeout=TIMEOUT)
        proxy.resume()
        after = recv_exactly(sock, 1)

    assert held.bytes_to_client == 1  # "z" reached the proxy but was held
    assert after == b"z"


def test_cut_resets_both_peers(echo_server: Server) -> None:
    with FaultProxy("127.0.0.1", echo_server.port) as proxy:
        with connect(proxy) as sock:
            round_trip_s(sock)
            assert proxy.cut() == 1
            with pytest.raises(ConnectionResetError):
                sock.recv(1)
        assert echo_server.wait_for_endings(1) == ["reset"]
        cut = proxy.counters()

        with connect(proxy) as again:  # still listening: a reconnect goes through
            round_trip_s(again)
        after = proxy.counters()

    assert (cut.resets, cut.connections_active) == (1, 0)
    assert after.connections_accepted == 2


def test_garbage_arrives_at_the_server_in_stream_order(sink_server: Server) -> None:
    with FaultProxy("127.0.0.1", sink_server.port) as proxy, connect(proxy) as sock:
        sock.sendall(b"hello")
        proxy.wait_for_bytes(from_client=5, timeout=TIMEOUT)
        garbage = proxy.inject_garbage(100, seed=3)
        sock.sendall(b"world")
        sock.shutdown(socket.SHUT_WR)
        assert sink_server.wait_for_endings(1) == ["eof"]
        counters = proxy.wait_for_bytes(to_server=110, timeout=TIMEOUT)

    assert len(garbage) == 100
    assert bytes(sink_server.received) == b"hello" + garbage + b"world"
    assert (counters.garbage_bytes, counters.bytes_from_client, counters.bytes_to_server) == (100, 10, 110)


def test_a_refused_target_resets_the_client() -> None:
    with socket.create_server(("127.0.0.1", 0)) as unused:
        port = unused.getsockname()[1]  # closed again below: nothing listens there
    with FaultProxy("127.0.0.1", port) as proxy:
        # The RST can come so soon that the client's connect() itself reports it.
        with pytest.raises(ConnectionResetError), connect(proxy) as sock:
            sock.recv(1)
        counters = proxy.wait_until(lambda c: c.connect_failures == 1, TIMEOUT)

    assert (counters.connections_accepted, counters.connections_active, counters.resets) == (1, 0, 0)


def test_waits_time_out_with_the_counters_and_controls_fail_after_close(echo_server: Server) -> None:
    proxy = FaultProxy("127.0.0.1", echo_server.port)
    with pytest.raises(TimeoutError, match="connections_accepted=0"):
        proxy.wait_for_connections(1, timeout=0.05)
    proxy.close()
    proxy.close()
    with pytest.raises(RuntimeError, match="closed"):
        proxy.stall()
    with pytest.raises(TimeoutError, match="closed"):
        proxy.wait_for_connections(1, timeout=TIMEOUT)
