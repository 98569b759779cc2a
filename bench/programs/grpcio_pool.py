"""Scenario 9's Python baseline: what a Python team would run without
Offload, a grpcio (asyncio) server serving offload.v1.Compute/Execute from a
concurrent.futures.ProcessPoolExecutor of the same size as Offload's
workers, running the same functions (tasks.py).

Usage: grpcio_pool.py PORT PROCESSES GENERATED_STUBS_DIR"""

import asyncio
import concurrent.futures
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, sys.argv[3])

import grpc  # noqa: E402
from offload.v1 import compute_pb2, compute_pb2_grpc  # noqa: E402

import tasks  # noqa: E402


def run(name, data):
    return tasks.TASKS[name](data)


class Compute(compute_pb2_grpc.ComputeServicer):
    def __init__(self, pool):
        self.pool = pool

    async def Execute(self, request, context):
        name = request.task.split(".", 1)[-1]
        if name not in tasks.TASKS:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown task %r" % request.task)
        output = await asyncio.get_running_loop().run_in_executor(self.pool, run, name, request.input)
        return compute_pb2.ExecuteResponse(output=output)


async def main():
    port, processes = int(sys.argv[1]), int(sys.argv[2])
    with concurrent.futures.ProcessPoolExecutor(max_workers=processes) as pool:
        # Start the processes now, not on the first calls.
        list(pool.map(run, ["sha256"] * processes, [b""] * processes))
        server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 1024)])
        compute_pb2_grpc.add_ComputeServicer_to_server(Compute(pool), server)
        server.add_insecure_port("127.0.0.1:%d" % port)
        await server.start()
        print("listening", flush=True)
        await server.wait_for_termination()


asyncio.run(main())
