"""Standard gRPC probes on the receiver: health checking (tracks the audio output) and reflection."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tiality_cli.io.files import NullSink
from tiality_cli.receiver import Receiver, ReceiverConfig


class BrokenOutput(NullSink):
    """A null sink whose device 'fails' on demand, the way a device sink reports an unplugged card."""

    error: BaseException | None = None


def _status(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)


def test_health_is_serving_while_the_output_runs_and_follows_its_failure() -> None:
    sink = BrokenOutput()
    rx = Receiver(sink, ReceiverConfig(port=0, bind="127.0.0.1"))
    port = rx.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            deadline = time.monotonic() + 5
            while _status(ch, "tiality.v1.AudioStream") != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert _status(ch, "") == health_pb2.HealthCheckResponse.SERVING
            sink.error = OSError("device unplugged")
            deadline = time.monotonic() + 5
            while _status(ch, "tiality.v1.AudioStream") != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "health never reported the broken output"
                time.sleep(0.05)
    finally:
        rx.stop()


def test_reflection_lists_the_audio_and_health_services() -> None:
    rx = Receiver(NullSink(), ReceiverConfig(port=0, bind="127.0.0.1"))
    port = rx.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
            names = sorted(s.name for s in response.list_services_response.service)
    finally:
        rx.stop()
    expected = ["grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "tiality.v1.AudioStream"]
    assert names == expected
