"""Offload worker programs in Python: warm processes that run your tasks for
Offload's callers, supervised by Offload (deadlines, cancellation,
heartbeats, crash isolation, recycling).

    from offload_worker import task, serve

    @task("py.reverse", description="reverses the input",
          params={"upper": ("uppercase the result", "false")})
    def reverse(ctx, data: bytes, params: dict) -> bytes:
        out = data[::-1]
        return out.upper() if params["upper"] == "true" else out

    if __name__ == "__main__":
        serve()

Declare the program in Offload's config file:

    [[worker_program]]
    name = "py"
    command = ["python3", "app.py"]
    workers = 2

A task gets a context, the input bytes and its params (every declared param,
defaults filled in) and returns bytes. Raising ValueError (or InvalidArgument)
fails the call with INVALID_ARGUMENT and its message; any other exception
fails it with INTERNAL and the worker serves on. `ctx.cancelled` turns true
when the caller went away or the deadline passed: a long task looks at it
and returns (or calls `ctx.check()`, which raises). `ctx.progress(fraction,
message)` is streamed to ExecuteStream callers.
"""

import os
import platform
import queue
import socket
import sys
import threading
import time
import traceback

from . import _protocol as wire

__all__ = ["task", "serve", "Context", "InvalidArgument", "Cancelled"]
__version__ = "0.1.0"

# Exit statuses the front understands (docs/worker-protocol.md).
EXIT_CLEAN = 0
EXIT_PROTOCOL = 2
EXIT_SETUP = 4


class InvalidArgument(ValueError):
    """The input or a param is not what the task accepts: INVALID_ARGUMENT."""


class Cancelled(Exception):
    """Raised by Context.check() once the call is cancelled or past its deadline."""


_TASKS = {}

# Room in a frame for TaskDone's own fields (id, times, span) around an
# output: an output that leaves less is answered TOO_LARGE, not sent.
_FRAME_ROOM = 4096


class _Task:
    def __init__(self, name, description, params, cost_param, cacheable, version, func):
        self.name = name
        self.description = description
        self.params = params
        self.cost_param = cost_param
        self.cacheable = cacheable
        self.version = version
        self.func = func

    def declaration(self):
        params = []
        for pname, (description, default) in self.params.items():
            params.append(
                wire.ParamDecl(
                    name=pname,
                    description=description,
                    default_value="" if default is None else str(default),
                    required=default is None,
                )
            )
        return wire.TaskDecl(
            name=self.name,
            description=self.description,
            params=params,
            cost_param=self.cost_param or "",
            cacheable=self.cacheable,
            version=self.version,
        )


def _param_spec(task_name, pname, spec):
    """(description, default) from what `@task` was given for one param:
    (description, default), or (description,) or a bare description for a
    required param."""
    if isinstance(spec, str):
        spec = (spec,)
    if isinstance(spec, (tuple, list)) and len(spec) == 1:
        spec = (spec[0], None)
    if not (isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str)):
        raise TypeError(
            "param %r of %s: give (description, default), with None as the default of a required param; got %r"
            % (pname, task_name, spec)
        )
    return spec[0], spec[1]


def task(name, description="", params=None, cost_param=None, cacheable=False, version=1):
    """Registers the decorated function as the task `name` ("<program>.<task>").

    `params` maps each param's name to (description, default); a default of
    None makes the param required, and so does giving the description alone
    (`("the column", None)`, `("the column",)` and `"the column"` are alike).
    The front refuses calls with unknown or missing params before the worker
    sees them. A malformed declaration raises TypeError here, at import.

    `cost_param` names the param whose value, a number, the task's time
    grows in proportion to ("ms", "rows"): Offload costs each call from it
    when deciding whether the call can start before its deadline. Without
    it, calls are costed by the size of their input.

    `cacheable=True` says the task's output is a pure function of its name,
    version, params and input (no clock, randomness or outside state):
    Offload may then answer a repeated call from its result cache. Bump
    `version` (a whole number from 1) whenever the output for the same
    params and input changes.
    """
    specs = {pname: _param_spec(name, pname, spec) for pname, spec in (params or {}).items()}
    if cost_param is not None and cost_param not in specs:
        raise TypeError("cost_param %r of %s is not one of its params" % (cost_param, name))
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= 0xFFFFFFFF:
        raise TypeError("version of %s: give a whole number from 1; got %r" % (name, version))

    def register(func):
        if name in _TASKS:
            raise ValueError("task %r is registered twice" % name)
        _TASKS[name] = _Task(name, description, specs, cost_param, bool(cacheable), version, func)
        return func

    return register


class Context:
    """What a running task sees of its call."""

    def __init__(self, worker, task_id, deadline):
        self._worker = worker
        self._id = task_id
        # Set by the reading thread on Cancel (a plain attribute: the
        # interpreter lock makes the store visible to the task).
        self._cancel = False
        # Seconds on the monotonic clock, or None.
        self.deadline = deadline
        self._last_progress = 0.0

    @property
    def cancelled(self):
        """True once the caller went away, the front stopped the call, or its
        deadline passed: the task should stop and return."""
        if self._cancel:
            return True
        return self.deadline is not None and time.monotonic() >= self.deadline

    def check(self):
        """Raises Cancelled when the task should stop."""
        if self.cancelled:
            raise Cancelled()

    def progress(self, fraction, message=""):
        """Reports progress, fraction in [0, 1] (at most one report per 20 ms
        goes out, and always the last one)."""
        fraction = min(max(float(fraction), 0.0), 1.0)
        now = time.monotonic()
        if fraction < 1.0 and now - self._last_progress < 0.02:
            return
        self._last_progress = now
        reply = wire.WorkerReply(progress=wire.TaskProgress(id=self._id, fraction=fraction, message=str(message)))
        self._worker.send(reply)


class _Worker:
    def __init__(self, sock, max_frame):
        self._sock = sock
        self._max_frame = max_frame
        self._write_lock = threading.Lock()
        # Tasks handed to the task thread and not yet answered: id -> Context.
        self._outstanding = {}
        self._outstanding_lock = threading.Lock()
        self._jobs = queue.Queue()

    def send(self, reply, handed=None):
        """Sends `reply`; `handed` is the id of the task-thread task it
        answers, which stops counting as outstanding under the write lock:
        before the front can see the answer (and send a task in its place),
        and before a tiny task read meanwhile (run once nothing is
        outstanding) can send its own answer ahead of this one."""
        frame = wire.encode(reply)
        with self._write_lock:
            if handed is not None:
                with self._outstanding_lock:
                    del self._outstanding[handed]
            self._sock.sendall(frame)

    def serve(self):
        declared = [t.declaration() for t in _TASKS.values()]
        runtime = "%s %s" % (platform.python_implementation(), platform.python_version())
        hello = wire.Hello(
            protocol_version=wire.PROTOCOL_VERSION,
            pid=os.getpid(),
            tasks=[d.name for d in declared],
            declared=declared,
            runtime=runtime,
        )
        self.send(wire.WorkerReply(hello=hello))
        reader = wire.FrameReader(self._sock, self._max_frame)
        welcome = reader.next()
        if welcome is None:
            return EXIT_CLEAN
        if welcome.WhichOneof("body") != "welcome":
            raise wire.ProtocolError("expected Welcome, got %s" % welcome.WhichOneof("body"))
        if welcome.welcome.protocol_version != wire.PROTOCOL_VERSION:
            raise wire.ProtocolError(
                "the front speaks protocol %d, this SDK %d" % (welcome.welcome.protocol_version, wire.PROTOCOL_VERSION)
            )
        threading.Thread(target=self._run_tasks, name="offload-task", daemon=True).start()
        # This thread reads frames and answers pings at once, so a long task
        # on the task thread (which releases the interpreter lock every few
        # milliseconds, pure Python loops included) is never mistaken for a
        # hung worker. A task the front marks tiny (`inline`: it measured
        # well under a millisecond) runs here when nothing is ahead of it:
        # handing it over would cost more than running it, and a ping waits
        # no longer than the task.
        while True:
            request = reader.next()
            if request is None:
                return EXIT_CLEAN
            kind = request.WhichOneof("body")
            if kind == "run":
                run = request.run
                deadline = None
                if run.deadline_unix_nanos:
                    deadline = time.monotonic() + (run.deadline_unix_nanos / 1e9 - time.time())
                ctx = Context(self, run.id, deadline)
                # Read without the lock: only this thread adds entries, so an
                # empty dict stays empty until it adds one (the task thread's
                # removals can only make a stale read say "busy").
                if run.inline and not self._outstanding:
                    # No Cancel can reach a task running here before it ends.
                    self._answer(self._run_one(run, request.payload, ctx))
                    continue
                with self._outstanding_lock:
                    if len(self._outstanding) >= 64:
                        raise wire.ProtocolError("task %d sent while 64 tasks are outstanding" % run.id)
                    self._outstanding[run.id] = ctx
                self._jobs.put((run, request.payload, ctx))
            elif kind == "cancel":
                with self._outstanding_lock:
                    ctx = self._outstanding.get(request.cancel.id)
                if ctx is not None:
                    ctx._cancel = True
            elif kind == "ping":
                self.send(wire.WorkerReply(pong=wire.Pong(seq=request.ping.seq)))
            else:
                raise wire.ProtocolError("unexpected %s" % kind)

    def _run_tasks(self):
        while True:
            run, payload, ctx = self._jobs.get()
            self._answer(self._run_one(run, payload, ctx), handed=run.id)

    def _answer(self, reply, handed=None):
        """Answers a task (see `send`); a front that is gone ends the worker."""
        try:
            self.send(reply, handed)
        except OSError:
            # The front is gone.
            os._exit(EXIT_CLEAN)

    def _run_one(self, run, payload, ctx):
        traced = bool(run.traceparent)
        started_wall = time.time_ns() if traced else 0
        started = time.perf_counter()
        output = b""
        failure, message = 0, ""
        spec = _TASKS.get(run.task)
        if spec is None:
            failure, message = wire.FAILURE["FAILURE_KIND_UNKNOWN_TASK"], "this worker has no task %r" % run.task
        elif ctx.cancelled:
            failure, message = _stopped(ctx)
        else:
            try:
                result = spec.func(ctx, payload, dict(run.params) if run.params else {})
                if ctx.cancelled:
                    failure, message = _stopped(ctx)
                elif not isinstance(result, bytes):
                    failure = wire.FAILURE["FAILURE_KIND_FAILED"]
                    message = "%s returned %s, not bytes" % (run.task, type(result).__name__)
                elif len(result) + _FRAME_ROOM > self._max_frame:
                    failure = wire.FAILURE["FAILURE_KIND_TOO_LARGE"]
                    message = "its output of %d bytes does not fit a frame of %d bytes" % (len(result), self._max_frame)
                else:
                    output = result
            except Cancelled:
                failure, message = _stopped(ctx)
            except ValueError as err:
                failure, message = wire.FAILURE["FAILURE_KIND_INVALID_INPUT"], str(err) or type(err).__name__
            except Exception as err:  # the worker serves on
                failure, message = wire.FAILURE["FAILURE_KIND_FAILED"], "%s: %s" % (type(err).__name__, err)
                traceback.print_exc(file=sys.stderr)
        # Filled in place: building a TaskDone and passing it to the reply
        # would copy it.
        reply = wire.WorkerReply(payload=output)
        done = reply.done
        done.id = run.id
        done.run_us = int((time.perf_counter() - started) * 1e6)
        if failure:
            done.failure = failure
            done.message = message
        if traced:
            done.span.CopyFrom(_span(run.task, started_wall, message if failure else ""))
        return reply


def _stopped(ctx):
    if ctx._cancel or ctx.deadline is None or time.monotonic() < ctx.deadline:
        return wire.FAILURE["FAILURE_KIND_CANCELLED"], "cancelled"
    return wire.FAILURE["FAILURE_KIND_DEADLINE_EXCEEDED"], "deadline exceeded"


def _span(task_name, start_ns, error):
    attributes = [
        wire.SpanAttribute(key="task.name", text=task_name),
        wire.SpanAttribute(key="worker.pid", integer=os.getpid()),
        wire.SpanAttribute(key="process.runtime.name", text=platform.python_implementation()),
    ]
    return wire.WorkerSpan(
        name="worker " + task_name,
        start_unix_nanos=start_ns,
        end_unix_nanos=time.time_ns(),
        attributes=attributes,
        error=error,
    )


def _setup():
    """The socket the front passed, after checking we are its child."""
    fd = os.environ.get("OFFLOAD_WORKER_FD")
    if fd is None:
        raise RuntimeError(
            "OFFLOAD_WORKER_FD is not set: a worker program is started by offload-server "
            "(declare it as a [[worker_program]] in the config file)"
        )
    parent = os.environ.get("OFFLOAD_WORKER_PARENT_PID")
    if parent is not None and int(parent) != os.getppid():
        raise RuntimeError("the front exited before the worker started")
    max_frame = int(os.environ.get("OFFLOAD_WORKER_MAX_FRAME", str(64 << 20)))
    fd = int(fd)
    os.set_inheritable(fd, False)
    return socket.socket(fileno=fd), max_frame


def serve():
    """Serves the registered tasks to the front over the socket it passed,
    until it closes; then exits the process."""
    try:
        sock, max_frame = _setup()
    except Exception as err:
        print("offload-worker (python) %d: cannot start: %s" % (os.getpid(), err), file=sys.stderr)
        sys.stderr.flush()
        os._exit(EXIT_SETUP)
    try:
        code = _Worker(sock, max_frame).serve()
    except wire.ProtocolError as err:
        print("offload-worker (python) %d: protocol error: %s" % (os.getpid(), err), file=sys.stderr)
        code = EXIT_PROTOCOL
    except OSError:
        code = EXIT_CLEAN
    sys.stderr.flush()
    # Not sys.exit: the task thread may still be running a task.
    os._exit(code)
