"""A worker program for the end-to-end tests, written with the Python SDK
(sdk/python): tasks that succeed, fail in each documented way, exit
mid-task, spin with and without looking at cancellation, and report
progress."""

import hashlib
import os
import socket
import tempfile
import threading
import time

from offload_worker import InvalidArgument, task, serve


@task("py.reverse", description="reverses the input", params={"upper": ("uppercase the result", "false")})
def reverse(ctx, data: bytes, params: dict) -> bytes:
    out = data[::-1]
    return out.upper() if params["upper"] == "true" else out


# A required param, declared by its description alone.
@task("py.repeat", description="the input, `times` times", params={"times": ("how many times, 0..=100",)})
def repeat(ctx, data, params):
    try:
        times = int(params["times"])
    except ValueError:
        raise InvalidArgument("param times: %r is not an integer" % params["times"]) from None
    if not 0 <= times <= 100:
        raise ValueError("param times: %d is not in 0..=100" % times)
    return data * times


@task("py.sha256", description="SHA-256 of the input")
def sha256(ctx, data, params):
    return hashlib.sha256(data).digest()


@task("py.pid", description="the worker's pid, in ASCII decimal")
def pid(ctx, data, params):
    return str(os.getpid()).encode()


@task("py.thread", description="`main` or `task`: the thread the task ran on")
def thread(ctx, data, params):
    return b"main" if threading.current_thread() is threading.main_thread() else b"task"


@task("py.broken", description="raises an uncaught exception")
def broken(ctx, data, params):
    return {}["missing"]


@task("py.text", description="returns text instead of bytes")
def text(ctx, data, params):
    return "not bytes"


@task("py.exit", description="exits the process mid-task with status `code`", params={"code": ("its exit status", "7")})
def exit_(ctx, data, params):
    os._exit(int(params["code"]))


@task(
    "py.progress",
    description="reports each of `fractions` (comma-separated), 50 ms apart",
    params={"fractions": ("what to report, as Python floats", None)},
)
def progress(ctx, data, params):
    for fraction in params["fractions"].split(","):
        ctx.progress(float(fraction), "reported " + fraction)
        time.sleep(0.05)
    return b"reported"


@task("py.fds", description="the open descriptors above 2 as fd:device:inode, comma-separated")
def fds(ctx, data, params):
    open_fds = []
    for fd in range(3, 1024):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        open_fds.append("%d:%d:%d" % (fd, st.st_dev, st.st_ino))
    return ",".join(open_fds).encode()


@task(
    "py.spin",
    description="a pure-Python loop for `ms` ms; stops when cancelled if `obey` is true",
    params={"ms": ("how long", "1000"), "obey": ("look at ctx.cancelled", "true")},
    cost_param="ms",
)
def spin(ctx, data, params):
    end = time.monotonic() + int(params["ms"]) / 1000
    obey = params["obey"] == "true"
    start = time.monotonic()
    rounds = 0
    while time.monotonic() < end:
        if obey and ctx.cancelled:
            return b"stopped"
        x = 0
        for i in range(2000):
            x += i * i
        rounds += 1
        if rounds % 50 == 0:
            ctx.progress((time.monotonic() - start) / (end - start), "spinning")
    ctx.progress(1.0, "done")
    return str(rounds).encode()


_RUNS = 0


@task(
    "py.counted",
    description="waits `ms` ms (stopping if cancelled); output: how many runs of it this process started",
    params={"ms": ("how long", "200")},
    cacheable=True,
    version=2,
)
def counted(ctx, data, params):
    global _RUNS
    _RUNS += 1
    runs = _RUNS
    end = time.monotonic() + int(params["ms"]) / 1000
    while time.monotonic() < end:
        if ctx.cancelled:
            return b"stopped"
        time.sleep(0.005)
    return str(runs).encode()


@task("py.alloc", description="holds `mb` MB for a moment; output: the size", params={"mb": ("megabytes", None)})
def alloc(ctx, data, params):
    block = b"\x01" * (int(params["mb"]) << 20)
    time.sleep(0.3)
    return str(len(block)).encode()


@task(
    "py.probe",
    description="tries what a sandboxed worker may not do; output `allowed` or `denied: <error>`",
    params={
        "what": ("read (/etc/passwd), write (a file in /tmp), connect (TCP to 127.0.0.1:port), scratch (a file in TMPDIR)", None),
        "port": ("the port connect tries", "1"),
    },
)
def probe(ctx, data, params):
    what = params["what"]
    try:
        if what == "read":
            open("/etc/passwd", "rb").close()
        elif what == "write":
            path = "/tmp/offload-probe-%d-%d" % (os.getpid(), time.time_ns())
            open(path, "xb").close()
            os.remove(path)
        elif what == "connect":
            socket.create_connection(("127.0.0.1", int(params["port"])), timeout=2).close()
        elif what == "scratch":
            with tempfile.NamedTemporaryFile() as scratch:
                scratch.write(b"x")
        else:
            raise InvalidArgument("what must be read, write, connect or scratch")
    except OSError as err:
        return ("denied: %s" % err).encode()
    return b"allowed"


if __name__ == "__main__":
    serve()
