"""The worker ready line: formatted by the runtime, parsed by every launcher."""

from __future__ import annotations

import pytest

from common.ready_line import (
    Ready,
    RouterReady,
    format_ready,
    format_router_ready,
    format_up_http_ready,
    format_up_ready,
    parse_ready,
    parse_router_ready,
    parse_up_http_ready,
    parse_up_ready,
)


@pytest.mark.parametrize(
    "ready",
    [
        Ready("decode", "decode-0", "127.0.0.1:5001", "127.0.0.1:5002", "127.0.0.1:5003"),
        Ready("prefill", "prefill-12-ab12cd", "127.0.0.1:1", None, "0.0.0.0:9"),
        Ready("colocated", "c", "[::1]:7", None, None),
    ],
)
def test_round_trip(ready: Ready) -> None:
    line = format_ready(
        ready.role, ready.worker_id, ready.grpc_address, ready.kv_address, ready.metrics_address
    )
    assert parse_ready(line) == ready
    assert parse_ready(line + "\n") == ready  # as read from a pipe


def test_the_printed_text_is_unchanged() -> None:
    line = format_ready("prefill", "p-1", "127.0.0.1:5001", None, "127.0.0.1:9100")
    assert line == "prefill worker p-1 serving gRPC on 127.0.0.1:5001 kv - metrics 127.0.0.1:9100"
    line = format_ready("decode", "d", "h:1", "h:2", None)
    assert line == "decode worker d serving gRPC on h:1 kv h:2 metrics -"


@pytest.mark.parametrize(
    "line",
    [
        "",
        "2024-01-01 INFO worker.runtime: draining",
        "router serving gRPC on 127.0.0.1:1 http - metrics - pools default",
        "fake worker serving gRPC on 127.0.0.1:1",
        "decode worker d serving gRPC on h:1 kv h:2",  # truncated
        "decode worker d serving gRPC on h:1 kv h:2 metrics - extra",
        "log: decode worker d serving gRPC on h:1 kv h:2 metrics -",  # not at the start
    ],
)
def test_other_lines_are_not_ready_lines(line: str) -> None:
    assert parse_ready(line) is None


def test_router_and_up_lines_round_trip() -> None:
    line = format_router_ready("127.0.0.1:50051", "127.0.0.1:8000", None, ("default", "code"))
    assert line == (
        "router serving gRPC on 127.0.0.1:50051 http 127.0.0.1:8000 metrics - pools default,code"
    )
    assert parse_router_ready(line) == RouterReady(
        "127.0.0.1:50051", "127.0.0.1:8000", None, ("default", "code")
    )
    no_http = format_router_ready("h:1", None, "h:2", ("a",))
    assert parse_router_ready(no_http) == RouterReady("h:1", None, "h:2", ("a",))
    assert parse_router_ready(format_ready("decode", "d", "h:1", None, None)) is None
    assert parse_up_ready(format_up_ready("127.0.0.1:50051")) == "127.0.0.1:50051"
    assert parse_up_ready("pdserve up: ray 127.0.0.1:6379") is None
    assert format_up_http_ready("127.0.0.1:8000") == "serving HTTP on 127.0.0.1:8000"
    assert parse_up_http_ready(format_up_http_ready("127.0.0.1:8000")) == "127.0.0.1:8000"
    assert parse_up_http_ready(format_up_ready("127.0.0.1:50051")) is None
    assert parse_up_ready(format_up_http_ready("127.0.0.1:8000")) is None
