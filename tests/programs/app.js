// A worker program for the end-to-end tests, written with the Node SDK
// (sdk/node): the same tasks as app.py, named js.*.
const crypto = require("crypto");
const fs = require("fs");
const net = require("net");
const os = require("os");
const path = require("path");
const { isMainThread } = require("worker_threads");
const { task, serve, InvalidArgument } = require("offload-worker");

task("js.reverse", { description: "reverses the input", params: { upper: ["uppercase the result", "false"] } },
  async (ctx, data, params) => {
    const out = Buffer.from(data).reverse();
    return params.upper === "true" ? Buffer.from(out.toString("latin1").toUpperCase(), "latin1") : out;
  });

// The example, as written.
task("js.upper", { description: "uppercases UTF-8 text", params: { trim: ["trim first", "false"] } },
  async (ctx, data, params) => Buffer.from(data.toString("utf8").toUpperCase()));

// A required param, declared by its description alone.
task("js.repeat", { description: "the input, `times` times", params: { times: ["how many times, 0..=100"] } },
  (ctx, data, params) => {
    const times = Number(params.times);
    if (!Number.isInteger(times)) throw new InvalidArgument(`param times: '${params.times}' is not an integer`);
    if (times < 0 || times > 100) throw new InvalidArgument(`param times: ${times} is not in 0..=100`);
    return Buffer.concat(Array(times).fill(data));
  });

task("js.sha256", { description: "SHA-256 of the input" }, (ctx, data) => crypto.createHash("sha256").update(data).digest());

task("js.pid", { description: "the worker's pid, in ASCII decimal" }, () => Buffer.from(String(process.pid)));

task("js.thread", { description: "`main` or `task`: the thread the task ran on" }, () =>
  Buffer.from(isMainThread ? "main" : "task"));

task("js.broken", { description: "throws an uncaught error" }, () => {
  throw new TypeError("missing is not a function");
});

task("js.text", { description: "returns text instead of a Buffer" }, () => "not bytes");

task("js.exit", { description: "exits the process mid-task with status `code`", params: { code: ["its exit status", "7"] } },
  (ctx, data, params) => process.exit(Number(params.code)));

task("js.progress", {
  description: "reports each of `fractions` (comma-separated), 50 ms apart",
  params: { fractions: ["what to report, as JavaScript numbers", null] },
}, async (ctx, data, params) => {
  for (const fraction of params.fractions.split(",")) {
    ctx.progress(Number(fraction), `reported ${fraction}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return Buffer.from("reported");
});

task("js.fds", { description: "the open descriptors above 2 as fd:device:inode, comma-separated" }, () => {
  const open = [];
  for (let fd = 3; fd < 1024; fd++) {
    try {
      const st = fs.fstatSync(fd, { bigint: true });
      open.push(`${fd}:${st.dev}:${st.ino}`);
    } catch (err) {
      // not open
    }
  }
  return Buffer.from(open.join(","));
});

task("js.spin", {
  description: "a busy loop for `ms` ms; stops when cancelled if `obey` is true",
  params: { ms: ["how long", "1000"], obey: ["look at ctx.cancelled", "true"] },
  costParam: "ms",
}, (ctx, data, params) => {
  const start = Date.now();
  const end = start + Number(params.ms);
  const obey = params.obey === "true";
  let rounds = 0;
  while (Date.now() < end) {
    if (obey && ctx.cancelled) return Buffer.from("stopped");
    let x = 0;
    for (let i = 0; i < 20000; i++) x += i * i;
    rounds += 1;
    if (rounds % 50 === 0) ctx.progress((Date.now() - start) / (end - start), "spinning");
  }
  ctx.progress(1, "done");
  return Buffer.from(String(rounds));
});

let runs = 0;
task("js.counted", {
  description: "waits `ms` ms (stopping if cancelled); output: how many runs of it this process started",
  params: { ms: ["how long", "200"] },
  cacheable: true,
  version: 2,
}, async (ctx, data, params) => {
  runs += 1;
  const mine = runs;
  const end = Date.now() + Number(params.ms);
  while (Date.now() < end) {
    if (ctx.cancelled) return Buffer.from("stopped");
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  return Buffer.from(String(mine));
});

task("js.alloc", { description: "holds `mb` MB for a moment; output: the size", params: { mb: ["megabytes", null] } },
  async (ctx, data, params) => {
    const block = Buffer.alloc(Number(params.mb) << 20, 1);
    await new Promise((resolve) => setTimeout(resolve, 300));
    return Buffer.from(String(block.length));
  });

task("js.probe", {
  description: "tries what a sandboxed worker may not do; output `allowed` or `denied: <error>`",
  params: {
    what: ["read (/etc/passwd), write (a file in /tmp), connect (TCP to 127.0.0.1:port), scratch (a file in TMPDIR)", null],
    port: ["the port connect tries", "1"],
  },
}, async (ctx, data, params) => {
  try {
    if (params.what === "read") {
      fs.readFileSync("/etc/passwd");
    } else if (params.what === "write" || params.what === "scratch") {
      const dir = params.what === "write" ? "/tmp" : os.tmpdir();
      const file = path.join(dir, `offload-probe-${process.pid}-${Date.now()}`);
      fs.writeFileSync(file, "x", { flag: "wx" });
      fs.unlinkSync(file);
    } else if (params.what === "connect") {
      await new Promise((resolve, reject) => {
        const socket = net.connect({ host: "127.0.0.1", port: Number(params.port) }, () => { socket.destroy(); resolve(); });
        socket.on("error", reject);
      });
    } else {
      throw new InvalidArgument("what must be read, write, connect or scratch");
    }
  } catch (err) {
    if (err instanceof InvalidArgument) throw err;
    return Buffer.from(`denied: ${err.message}`);
  }
  return Buffer.from("allowed");
});

serve();
