"""A scripted decode worker for the router-overhead benchmark: it answers every Decode at
once (a first token, then up to 7 more), so a TTFT through the router minus a TTFT to it
directly is the router's own cost.

    python -m benchmarks._fake_decode_worker --redis-url URL --namespace NS [--worker-id ID]

It registers as a colocated worker of the default pool and prints the workers' ready line
(:mod:`common.ready_line`), so any launcher reads it like a real worker's; SIGTERM / SIGINT
stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

BLOCK_SIZE = 16


async def serve(redis_url: str, namespace: str, worker_id: str) -> int:
    from common.grpc_server import GrpcServer
    from common.ready_line import format_ready
    from common.registry import Registry
    from common.worker_info import BlockGeometry, WorkerInfo, WorkerLoad, WorkerRole
    from proto import worker_pb2, worker_pb2_grpc
    from worker.heartbeat import Heartbeat

    class Servicer(worker_pb2_grpc.DecodeWorkerServicer):
        async def Decode(self, request, context):  # type: ignore[no-untyped-def]
            n = max(1, min(8, request.sampling.max_tokens))
            for i in range(n):
                message = worker_pb2.DecodeResponse(token_ids=[100 + i])
                if i == 0:
                    message.prefilled_by = "local"
                if i == n - 1:
                    message.finish_reason = worker_pb2.FINISH_REASON_LENGTH
                    message.usage.CopyFrom(
                        worker_pb2.Usage(prompt_tokens=len(request.token_ids), completion_tokens=n)
                    )
                yield message

    server = GrpcServer(
        "127.0.0.1",
        0,
        [(worker_pb2_grpc.add_DecodeWorkerServicer_to_server, Servicer())],
        ["pdserve.worker.v1.DecodeWorker"],
    )
    await server.start()
    geometry = BlockGeometry("SmolLM2-135M-Instruct", "float32", BLOCK_SIZE, 30, 3, 64, 4096)
    role = WorkerRole.COLOCATED
    info = WorkerInfo(
        worker_id, role, "default", "SmolLM2-135M-Instruct", server.address, None, geometry
    )
    registry = Registry(redis_url, namespace)
    beat = Heartbeat(registry, info, lambda: WorkerLoad(worker_id, 0, 0, 4096, 0, 0))
    await beat.start()
    print(format_ready(role.value, worker_id, server.address, None, None), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await beat.stop()
    await server.stop(0)
    await registry.aclose()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--worker-id", default="fake-0")
    args = parser.parse_args(argv)
    return asyncio.run(serve(args.redis_url, args.namespace, args.worker_id))


if __name__ == "__main__":
    sys.exit(main())
