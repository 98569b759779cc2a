"""Calls Offload's Execute hash.sha256 from grpcio and checks it against hashlib.

Usage: check_sha256.py HOST:PORT [CA.pem [CERT.pem KEY.pem [DOMAIN]]]
With a CA the channel is TLS (with a client certificate when CERT and KEY
are given); DOMAIN overrides the name the server certificate must carry."""
import hashlib
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from offload.v1 import compute_pb2, compute_pb2_grpc


def channel_to(addr, ca=None, cert=None, key=None, domain=None):
    if ca is None:
        return grpc.insecure_channel(addr)
    read = lambda path: open(path, "rb").read() if path else None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert)
    )
    options = [("grpc.ssl_target_name_override", domain)] if domain else []
    return grpc.secure_channel(addr, credentials, options=options)


def main(addr, *tls) -> None:
    with channel_to(addr, *tls) as channel:
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
    main(*sys.argv[1:])
