"""The worker protocol (offload.worker.v1) on the wire: message classes built
at run time from the descriptor shipped with the package (no protoc, no
generated code), and frames: a 4-byte big-endian length, then one message.
See docs/worker-protocol.md in the Offload repository."""

import io
import os
import select
import struct

from google.protobuf import descriptor_pb2, descriptor_pool

try:  # protobuf >= 4.22
    from google.protobuf.message_factory import GetMessageClass as _message_class
except ImportError:  # pragma: no cover - older runtimes
    from google.protobuf import message_factory as _factory

    def _message_class(descriptor):
        return _factory.MessageFactory(descriptor.file.pool).GetPrototype(descriptor)


PROTOCOL_VERSION = 3

_PACKAGE = "offload.worker.v1."


def _load():
    path = os.path.join(os.path.dirname(__file__), "worker.desc")
    with open(path, "rb") as f:
        file_proto = descriptor_pb2.FileDescriptorProto.FromString(f.read())
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    names = [
        "WorkerRequest",
        "WorkerReply",
        "Hello",
        "TaskDecl",
        "ParamDecl",
        "TaskProgress",
        "TaskDone",
        "Pong",
        "WorkerSpan",
        "SpanAttribute",
    ]
    classes = {name: _message_class(pool.FindMessageTypeByName(_PACKAGE + name)) for name in names}
    kinds = pool.FindEnumTypeByName(_PACKAGE + "FailureKind").values_by_name
    return classes, {name: value.number for name, value in kinds.items()}


_CLASSES, FAILURE = _load()
WorkerRequest = _CLASSES["WorkerRequest"]
WorkerReply = _CLASSES["WorkerReply"]
Hello = _CLASSES["Hello"]
TaskDecl = _CLASSES["TaskDecl"]
ParamDecl = _CLASSES["ParamDecl"]
TaskProgress = _CLASSES["TaskProgress"]
TaskDone = _CLASSES["TaskDone"]
Pong = _CLASSES["Pong"]
WorkerSpan = _CLASSES["WorkerSpan"]
SpanAttribute = _CLASSES["SpanAttribute"]

_LENGTH = struct.Struct(">I")


class ProtocolError(Exception):
    """The front sent something that is not the protocol."""


def encode(message):
    """One frame: the length prefix, then the message."""
    body = message.SerializeToString()
    return _LENGTH.pack(len(body)) + body


class _Readable(io.RawIOBase):
    """The socket's reading end, waiting for data with poll() rather than in
    a blocking recv(). A thread blocked in recv() on a Unix socket is also
    woken each time the front reads what this end wrote (the space freed
    wakes every sleeper on the socket): one futile wake-up per task, which
    at concurrency 1 took the CPU from the front just as it answered its
    caller. A poll for readability is woken by data alone."""

    def __init__(self, sock):
        self._sock = sock
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)

    def readable(self):
        return True

    def readinto(self, buffer):
        self._poll.poll()
        return self._sock.recv_into(buffer)


class FrameReader:
    """Reads WorkerRequest frames from a socket, refusing any larger than
    `max_frame` before reading its body. Reads are buffered: a frame's
    length and body (and the frames pipelined behind it) usually come in
    one system call."""

    def __init__(self, sock, max_frame):
        self._file = io.BufferedReader(_Readable(sock), 1 << 16)
        self._max_frame = max_frame

    def _exactly(self, n):
        data = self._file.read(n)
        return data if len(data) == n else None

    def next(self):
        """The next request, or None when the front closed the socket."""
        head = self._exactly(_LENGTH.size)
        if head is None:
            return None
        (length,) = _LENGTH.unpack(head)
        if length > self._max_frame:
            raise ProtocolError("a frame of %d bytes exceeds the limit of %d" % (length, self._max_frame))
        body = self._exactly(length)
        if body is None:
            return None
        request = WorkerRequest()
        try:
            request.ParseFromString(body)
        except Exception as err:  # DecodeError
            raise ProtocolError("undecodable frame: %s" % err) from None
        return request
