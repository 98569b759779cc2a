"""A bare worker program for profiling (bench/PROFILING.md, item 9): the
worker protocol spoken in as few lines as Python allows, serving py.sha256,
with none of the SDK (no task thread, no context, no error mapping). Its
added latency against the SDK's shows what the SDK's path costs. Not a
template: a real program uses sdk/python."""

import io, os, socket, struct, hashlib
from offload_worker import _protocol as wire
sock = socket.socket(fileno=int(os.environ["OFFLOAD_WORKER_FD"]))
# Waits with poll(), as docs/worker-protocol.md advises (PROFILING item 13),
# through the SDK's reading end, as the SDK's own reader does.
f = io.BufferedReader(wire._Readable(sock), 1 << 16)
decl = wire.TaskDecl(name="py.sha256", description="x")
sock.sendall(wire.encode(wire.WorkerReply(hello=wire.Hello(protocol_version=3, pid=os.getpid(), tasks=["py.sha256"], declared=[decl], runtime="mini"))))
L = struct.Struct(">I")
def read():
    h = f.read(4)
    if len(h) < 4: os._exit(0)
    (n,) = L.unpack(h)
    r = wire.WorkerRequest(); r.ParseFromString(f.read(n)); return r
read()  # welcome
while True:
    r = read()
    k = r.WhichOneof("body")
    if k == "run":
        rep = wire.WorkerReply(payload=hashlib.sha256(r.payload).digest())
        rep.done.id = r.run.id; rep.done.run_us = 5
        sock.sendall(wire.encode(rep))
    elif k == "ping":
        sock.sendall(wire.encode(wire.WorkerReply(pong=wire.Pong(seq=r.ping.seq))))
