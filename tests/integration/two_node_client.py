"""The two-node test's client, run *inside* namespace A (the router's node).

    python -m tests.integration.two_node_client generate ROUTER REQUESTS.json
        one thread per request, all at once; prints JSON lines:
        {"i": 0, "event": "sent"}                         the call is on the wire
        {"i": 0, "event": "done", "token_ids": [...], "finish": "length",
         "route": {...}, "seconds": 1.2}                   a complete stream
        {"i": 0, "event": "error", "code": "UNAVAILABLE", "details": "...", "seconds": 0.4}
        then {"event": "end"}
    python -m tests.integration.two_node_client registry REDIS_URL PASSWORD_FILE
        one JSON line: the registered workers (WorkerInfo fields)

REQUESTS.json: ``[{"token_ids": [...], "max_tokens": 8, "timeout_s": 90}, ...]`` (greedy).
Every call has a deadline, so the process always ends.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from common.registry import SyncRegistryReader
from router.client import build_request, collect, stream_generate

_print_lock = threading.Lock()


def _say(record: dict[str, Any]) -> None:
    with _print_lock:
        print(json.dumps(record, default=str), flush=True)


def _one(address: str, i: int, spec: dict[str, Any]) -> None:
    request = build_request(token_ids=spec["token_ids"], max_tokens=spec["max_tokens"])
    started = time.monotonic()
    _say({"i": i, "event": "sent"})
    try:
        result = collect(stream_generate(address, request, spec.get("timeout_s", 90.0)))
    except grpc.RpcError as exc:
        _say({
            "i": i,
            "event": "error",
            "code": exc.code().name,  # type: ignore[attr-defined]
            "details": exc.details(),  # type: ignore[attr-defined]
            "seconds": time.monotonic() - started,
        })  # fmt: skip
        return
    _say({
        "i": i,
        "event": "done",
        "token_ids": list(result.token_ids),
        "finish": result.finish_reason,
        "route": dataclasses.asdict(result.route) if result.route is not None else None,
        "seconds": time.monotonic() - started,
    })  # fmt: skip


def generate(address: str, requests_file: str) -> None:
    specs = json.loads(Path(requests_file).read_text())
    threads = [
        threading.Thread(target=_one, args=(address, i, spec), daemon=True)
        for i, spec in enumerate(specs)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _say({"event": "end"})


def registry(redis_url: str, password_file: str) -> None:
    reader = SyncRegistryReader(redis_url, "pdserve", password_file=password_file)
    try:
        workers = [dataclasses.asdict(w) for w in reader.list_workers()]
    finally:
        reader.close()
    _say({"workers": workers})


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "generate":
        generate(*args)
    elif command == "registry":
        registry(*args)
    else:
        raise SystemExit(f"unknown command {command!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
