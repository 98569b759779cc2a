"""Calls Offload's Execute hash.sha256 from grpcio and checks it against hashlib."""
import hashlib
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from offload.v1 import compute_pb2, compute_pb2_grpc


def main(addr: str) -> None:
    with grpc.insecure_channel(addr) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="offload.v1.Compute"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, reply

        stub = compute_pb2_grpc.ComputeStub(channel)
        for size in (0, 3, 1 << 20):
            data = os.urandom(size)
            reply = stub.Execute(
                compute_pb2.ExecuteRequest(task="hash.sha256", input=data, id=f"py-{size}"), timeout=30
            )
            assert reply.output == hashlib.sha256(data).digest(), (size, reply.output.hex())
            assert reply.id == f"py-{size}"
            assert reply.mode == compute_pb2.EXECUTION_MODE_POOL

        try:
            stub.Execute(compute_pb2.ExecuteRequest(task="no.such"), timeout=10)
            raise AssertionError("unknown task should fail")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND, err
    print("python grpcio client: ok")


if __name__ == "__main__":
    main(sys.argv[1])
