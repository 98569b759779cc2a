"use strict";
// Offload worker programs in Node: warm processes that run your tasks for
// Offload's callers, supervised by Offload. The protocol is specified in
// docs/worker-protocol.md of the Offload repository.
//
// The main thread owns the socket: it answers heartbeats at once and sends
// tasks, one at a time, to a worker thread that runs them, so a CPU-bound
// task never makes the worker look hung. The worker thread runs the same
// script (its `task` calls register the same tasks); `serve()` there waits
// for tasks from the main thread. A task the front marks tiny (`inline`: it
// measured well under a millisecond) runs on the main thread when nothing is
// ahead of it: the hop to the thread and back would cost more than the task,
// and a heartbeat waits no longer than the task.

const net = require("net");
const path = require("path");
const { Worker, isMainThread, parentPort, workerData } = require("worker_threads");
const protobuf = require("protobufjs");

const PROTOCOL_VERSION = 3;
const EXIT_CLEAN = 0;
const EXIT_PROTOCOL = 2;
const EXIT_SETUP = 4;
const MAX_OUTSTANDING = 64;
// Room in a frame for TaskDone's own fields (id, times, span) around an output.
const FRAME_ROOM = 4096;

/** The input or a param is not what the task accepts: INVALID_ARGUMENT. */
class InvalidArgument extends Error {
  constructor(message) {
    super(message);
    this.name = "InvalidArgument";
  }
}

/** Thrown by ctx.check() once the call is cancelled or past its deadline. */
class Cancelled extends Error {
  constructor() {
    super("cancelled");
    this.name = "Cancelled";
  }
}

const tasks = new Map();

/**
 * Registers `fn(ctx, data, params)` as the task `name` ("<program>.<task>").
 * `options.params` maps each param to [description, default]; a default of
 * null, or the description alone (`[description]`), makes it required.
 * `options.costParam` names the param whose value, a number, the task's time
 * grows in proportion to ("ms", "rows"): Offload costs each call from it when
 * deciding whether the call can start before its deadline; without it, by
 * the size of its input. `options.cacheable: true` says its output is a pure
 * function of its name, version, params and input (no clock, randomness or
 * outside state): Offload may then answer a repeated call from its result
 * cache. `options.version` (default 1) is bumped whenever its output for the
 * same params and input changes. `fn` returns (or resolves to) a Buffer.
 */
function task(name, options, fn) {
  if (typeof options === "function") {
    fn = options;
    options = {};
  }
  if (tasks.has(name)) throw new Error(`task ${JSON.stringify(name)} is registered twice`);
  if (typeof fn !== "function") throw new TypeError(`task ${name}: give a function`);
  const params = Object.entries((options && options.params) || {}).map(([pname, spec]) => paramDecl(name, pname, spec));
  const costParam = (options && options.costParam) || "";
  if (costParam && !params.some((p) => p.name === costParam)) {
    throw new TypeError(`costParam ${JSON.stringify(costParam)} of ${name} is not one of its params`);
  }
  const cacheable = Boolean(options && options.cacheable);
  const version = options && options.version !== undefined ? options.version : 1;
  if (!Number.isInteger(version) || version < 1 || version > 0xffffffff) {
    throw new TypeError(`version of ${name}: give a whole number from 1; got ${JSON.stringify(version)}`);
  }
  tasks.set(name, { name, description: (options && options.description) || "", params, costParam, cacheable, version, fn });
}

// A param's declaration from [description, default]; [description] (or the
// description alone) and a null default make it required. A malformed one
// throws at `task()`, where the program registers it.
function paramDecl(taskName, pname, spec) {
  if (typeof spec === "string") spec = [spec];
  if (!Array.isArray(spec) || spec.length < 1 || spec.length > 2 || typeof spec[0] !== "string") {
    throw new TypeError(
      `param ${pname} of ${taskName}: give [description, default], with null as the default of a required param; got ${JSON.stringify(spec)}`);
  }
  const [description, def] = spec;
  const required = def === null || def === undefined;
  return { name: pname, description, defaultValue: required ? "" : String(def), required };
}

function declaration(t) {
  return {
    name: t.name,
    description: t.description,
    params: t.params,
    costParam: t.costParam,
    cacheable: t.cacheable,
    version: t.version,
  };
}

let protocol;
function messages() {
  if (!protocol) {
    const root = protobuf.loadSync(path.join(__dirname, "worker.proto"));
    const kinds = root.lookupEnum("offload.worker.v1.FailureKind").values;
    protocol = {
      WorkerRequest: root.lookupType("offload.worker.v1.WorkerRequest"),
      WorkerReply: root.lookupType("offload.worker.v1.WorkerReply"),
      failure: (name) => kinds["FAILURE_KIND_" + name],
    };
  }
  return protocol;
}

// ---- The task thread --------------------------------------------------------

/** What a running task sees of its call. */
class Context {
  constructor(flag, deadlineMs, report) {
    this._flag = flag;
    this._deadlineMs = deadlineMs;
    this._report = report;
    this._lastProgress = 0;
  }

  /** True once the caller went away, the front stopped the call, or its deadline passed. */
  get cancelled() {
    return Atomics.load(this._flag, 0) === 1 || (this._deadlineMs > 0 && Date.now() >= this._deadlineMs);
  }

  /** Throws Cancelled when the task should stop. */
  check() {
    if (this.cancelled) throw new Cancelled();
  }

  /** Reports progress, fraction in [0, 1]; at most one report per 20 ms goes out, and always the last. */
  progress(fraction, message = "") {
    const f = Math.min(Math.max(Number(fraction) || 0, 0), 1);
    const now = Date.now();
    if (f < 1 && now - this._lastProgress < 20) return;
    this._lastProgress = now;
    this._report(f, String(message));
  }
}

/**
 * Runs `job` ({ id, task, params, deadlineMs, input }) on this thread and
 * calls `finish({ id, kind, message, runUs, started, output })` when it ends:
 * before returning when the task is synchronous, so that the answers of a
 * batch of tiny tasks go out together.
 */
function execute(job, flag, report, finish) {
  const started = Date.now();
  const startedNs = process.hrtime.bigint();
  const ctx = new Context(flag, job.deadlineMs, report);
  const end = (kind, message, output) =>
    finish({ id: job.id, kind, message, runUs: Number((process.hrtime.bigint() - startedNs) / 1000n), started, output });
  const failed = (err) => {
    if (err instanceof Cancelled) return end(...stopped(ctx), null);
    if (err instanceof InvalidArgument) return end("INVALID_INPUT", err.message, null);
    if (err instanceof Error && err.stack) process.stderr.write(err.stack + "\n");
    return end("FAILED", err instanceof Error ? `${err.name}: ${err.message}` : `thrown: ${String(err)}`, null);
  };
  const settle = (result) => {
    if (ctx.cancelled) return end(...stopped(ctx), null);
    if (result instanceof Uint8Array) return end("UNSPECIFIED", "", result);
    return end("FAILED", `${job.task} returned ${result === null ? "null" : typeof result}, not a Buffer`, null);
  };
  const t = tasks.get(job.task);
  if (!t) return end("UNKNOWN_TASK", `this worker has no task ${JSON.stringify(job.task)}`, null);
  let result;
  try {
    ctx.check();
    const input = Buffer.from(job.input.buffer, job.input.byteOffset, job.input.byteLength);
    result = t.fn(ctx, input, job.params);
  } catch (err) {
    return failed(err);
  }
  if (result && typeof result.then === "function") {
    Promise.resolve(result).then(settle, failed);
  } else {
    settle(result);
  }
}

function runTasks() {
  const flag = new Int32Array(workerData.flag);
  parentPort.on("message", (job) =>
    execute(
      job,
      flag,
      (fraction, message) => parentPort.postMessage({ type: "progress", id: job.id, fraction, message }),
      (result) => parentPort.postMessage({ type: "done", ...result }),
    ),
  );
}

function stopped(ctx) {
  if (Atomics.load(ctx._flag, 0) === 1 || !(ctx._deadlineMs > 0) || Date.now() < ctx._deadlineMs) {
    return ["CANCELLED", "cancelled"];
  }
  return ["DEADLINE_EXCEEDED", "deadline exceeded"];
}

// ---- The main thread --------------------------------------------------------

function fail(code, what) {
  process.stderr.write(`offload-worker (node) ${process.pid}: ${what}\n`, () => process.exit(code));
}

function serveMain() {
  const fd = process.env.OFFLOAD_WORKER_FD;
  if (fd === undefined) {
    return fail(
      EXIT_SETUP,
      "cannot start: OFFLOAD_WORKER_FD is not set: a worker program is started by offload-server " +
        "(declare it as a [[worker_program]] in the config file)",
    );
  }
  const parent = process.env.OFFLOAD_WORKER_PARENT_PID;
  if (parent !== undefined && Number(parent) !== process.ppid) {
    return fail(EXIT_SETUP, "cannot start: the front exited before the worker started");
  }
  const maxFrame = Number(process.env.OFFLOAD_WORKER_MAX_FRAME || 64 << 20);
  const { WorkerRequest, WorkerReply, failure } = messages();
  const declared = [...tasks.values()].map(declaration);

  const flag = new Int32Array(new SharedArrayBuffer(4));
  const thread = new Worker(process.argv[1], { argv: process.argv.slice(2), workerData: { flag: flag.buffer } });
  // process.exit() in a task ends the thread, not the process: end it too,
  // so the front sees the exit as the program's.
  thread.on("exit", (code) => fail(code || 1, `the task thread exited with status ${code}`));
  thread.on("error", (err) => fail(1, `the task thread failed: ${err && err.stack ? err.stack : err}`));

  const socket = new net.Socket({ fd: Number(fd), readable: true, writable: true });
  // Frames written while a data chunk is handled wait here and go out in
  // one write at its end: the answers of a batch of tiny tasks together.
  let held = null;
  const send = (reply) => {
    const body = WorkerReply.encode(reply).finish();
    const frame = Buffer.allocUnsafe(4 + body.length);
    frame.writeUInt32BE(body.length, 0);
    frame.set(body, 4);
    if (held) held.push(frame);
    else socket.write(frame);
  };

  // Outstanding tasks in arrival order: { run, payload, cancelled }.
  const queue = [];
  let running = null;
  // Names the running task to the task thread (a uint64 id is a Long here).
  let tokens = 0;
  let pumping = false;
  let welcomed = false;

  const progress = (id, fraction, message) => {
    if (running && id === running.token) send({ progress: { id: running.run.id, fraction, message } });
  };

  // Starts the oldest outstanding task when none runs.
  const next = () => {
    if (pumping) return; // a tiny task finished inside the loop below: it goes on
    pumping = true;
    while (!running && queue.length) {
      const job = queue[0];
      if (job.cancelled) {
        queue.shift();
        send({ done: { id: job.run.id, failure: failure("CANCELLED"), message: "cancelled" } });
        continue;
      }
      running = job;
      Atomics.store(flag, 0, 0);
      const deadline = job.run.deadlineUnixNanos;
      // A uint64 decodes as a Long (or a number): zero is no deadline.
      const deadlineMs = deadline && String(deadline) !== "0" ? Number(BigInt(String(deadline)) / 1000000n) : 0;
      const params = {};
      for (const [k, v] of Object.entries(job.run.params || {})) params[k] = v;
      // An absent payload decodes as protobufjs's default, not a Buffer.
      const input = job.payload instanceof Uint8Array ? job.payload : new Uint8Array(0);
      job.token = ++tokens;
      const message = { id: job.token, task: job.run.task, params, deadlineMs, input };
      if (job.run.inline) {
        execute(message, flag, (fraction, note) => progress(message.id, fraction, note), finished);
      } else {
        thread.postMessage(message);
      }
    }
    pumping = false;
  };

  thread.on("message", (msg) => {
    if (msg.type === "progress") {
      progress(msg.id, msg.fraction, msg.message);
    } else {
      finished(msg);
    }
  });

  // Answers the running task with `msg` (what `execute` reports).
  function finished(msg) {
    if (!running || msg.id !== running.token) return;
    const run = running.run;
    // An output that would overflow the frame is answered TOO_LARGE, not sent.
    if (msg.output && msg.output.byteLength + FRAME_ROOM > maxFrame) {
      msg = { ...msg, kind: "TOO_LARGE", output: null,
        message: `its output of ${msg.output.byteLength} bytes does not fit a frame of ${maxFrame} bytes` };
    }
    const done = { id: run.id, failure: failure(msg.kind), message: msg.message, runUs: msg.runUs };
    if (run.traceparent) {
      done.span = {
        name: "worker " + run.task,
        startUnixNanos: String(BigInt(msg.started) * 1000000n),
        endUnixNanos: String(BigInt(Date.now()) * 1000000n),
        attributes: [
          { key: "task.name", text: run.task },
          { key: "worker.pid", integer: process.pid },
          { key: "process.runtime.name", text: "nodejs" },
        ],
        error: msg.kind === "UNSPECIFIED" ? "" : msg.message,
      };
    }
    send({ done, payload: msg.output ? Buffer.from(msg.output.buffer, msg.output.byteOffset, msg.output.byteLength) : Buffer.alloc(0) });
    queue.shift();
    running = null;
    next();
  }

  const handle = (request) => {
    if (!welcomed) {
      if (request.body !== "welcome") throw new Error(`expected Welcome, got ${request.body}`);
      if (request.welcome.protocolVersion !== PROTOCOL_VERSION) {
        throw new Error(`the front speaks protocol ${request.welcome.protocolVersion}, this SDK ${PROTOCOL_VERSION}`);
      }
      welcomed = true;
      return;
    }
    switch (request.body) {
      case "run":
        if (queue.length >= MAX_OUTSTANDING) throw new Error(`task ${request.run.id} sent while 64 tasks are outstanding`);
        queue.push({ run: request.run, payload: request.payload, cancelled: false });
        next();
        break;
      case "cancel": {
        const id = String(request.cancel.id);
        const job = queue.find((j) => String(j.run.id) === id);
        if (job) {
          job.cancelled = true;
          if (job === running) Atomics.store(flag, 0, 1);
        }
        break;
      }
      case "ping":
        send({ pong: { seq: request.ping.seq } });
        break;
      default:
        throw new Error(`unexpected ${request.body}`);
    }
  };

  let buffered = Buffer.alloc(0);
  socket.on("data", (chunk) => {
    buffered = buffered.length ? Buffer.concat([buffered, chunk]) : chunk;
    held = [];
    try {
      while (buffered.length >= 4) {
        const length = buffered.readUInt32BE(0);
        if (length > maxFrame) throw new Error(`a frame of ${length} bytes exceeds the limit of ${maxFrame}`);
        if (buffered.length < 4 + length) break;
        const body = buffered.subarray(4, 4 + length);
        buffered = buffered.subarray(4 + length);
        handle(WorkerRequest.decode(body));
      }
    } catch (err) {
      fail(EXIT_PROTOCOL, `protocol error: ${err.message}`);
    }
    const frames = held;
    held = null;
    if (frames.length) socket.write(frames.length === 1 ? frames[0] : Buffer.concat(frames));
  });
  // The front closed the socket (it retired us, or it is gone).
  socket.on("end", () => process.exit(EXIT_CLEAN));
  socket.on("error", () => process.exit(EXIT_CLEAN));

  send({
    hello: {
      protocolVersion: PROTOCOL_VERSION,
      pid: process.pid,
      tasks: declared.map((d) => d.name),
      declared,
      runtime: `node ${process.version}`,
    },
  });
}

/** Serves the registered tasks to the front until it closes the socket. */
function serve() {
  if (isMainThread) {
    serveMain();
  } else {
    runTasks();
  }
}

module.exports = { task, serve, Context, InvalidArgument, Cancelled };
