// Scenario 14's Node baseline: BullMQ on Redis, what a Node team runs for
// background jobs, running the same work as Offload's jobs (tasks.js).
// Usage:
//   node bullmq_jobs.js worker REDIS_PORT
//     one worker process, one job at a time (the suite starts as many as
//     Offload has workers); prints "listening" once connected.
//   node bullmq_jobs.js bench REDIS_PORT KIND COUNT IN_FLIGHT [BOUND_SECS]
//     adds COUNT jobs of KIND ("sha256": SHA-256 of 1 KiB; "spin": 50 ms of
//     CPU; "logged": 20 ms of CPU whose start and end are appended to the
//     file OFFLOAD_BENCH_LOG names, as tasks.py's logged_spin does), IN_FLIGHT
//     at a time, each awaited to its end (at most BOUND_SECS, default 120:
//     past it, counted as failed); prints one JSON line with the throughput
//     and the submit-to-done latencies.
const crypto = require("crypto");
const fs = require("fs");
const { Queue, Worker, QueueEvents } = require("bullmq");

const [mode, port, kind, count, inFlight, boundSecs] = process.argv.slice(2);
const BOUND_MS = Number(boundSecs || 120) * 1000;
const connection = { host: "127.0.0.1", port: Number(port) };
const QUEUE = "offload-bench";

function work(name, input) {
  if (name === "sha256") return crypto.createHash("sha256").update(input).digest("hex");
  const end = process.hrtime.bigint() + 50_000_000n;
  let spins = 0;
  while (process.hrtime.bigint() < end) spins++;
  return spins;
}

// Lines "S|E KEY UNIX_NS PID", each one append (see tasks.py).
function logged(key) {
  const note = (what) => {
    const ns = BigInt(Date.now()) * 1_000_000n;
    fs.appendFileSync(process.env.OFFLOAD_BENCH_LOG, `${what} ${key} ${ns} ${process.pid}\n`);
  };
  note("S");
  const end = process.hrtime.bigint() + 20_000_000n;
  while (process.hrtime.bigint() < end);
  note("E");
  return key;
}

async function bench() {
  const queue = new Queue(QUEUE, { connection });
  const events = new QueueEvents(QUEUE, { connection });
  queue.setMaxListeners(0);
  events.setMaxListeners(0);
  await events.waitUntilReady();
  const input = crypto.randomBytes(1024).toString("base64");
  // The events' reader may start a moment after "ready": until it has
  // heard one job end, ends can be missed. Untimed.
  for (let i = 0; i < 50; i++) {
    try {
      await (await queue.add("sha256", { input })).waitUntilFinished(events, 5_000);
      break;
    } catch (err) {
      // Not heard: try again.
    }
  }
  const latencies = [];
  let next = 0;
  let failed = 0;
  const started = process.hrtime.bigint();
  async function submitter() {
    while (next < Number(count)) {
      next++;
      const t0 = process.hrtime.bigint();
      try {
        const data = kind === "logged" ? { key: String(next - 1) } : { input };
        const job = await queue.add(kind, data, { removeOnComplete: { age: 3600 }, removeOnFail: { age: 3600 } });
        // Bounded: a job not answered in time counts as lost.
        await job.waitUntilFinished(events, BOUND_MS);
        latencies.push(Number(process.hrtime.bigint() - t0) / 1000);
      } catch (err) {
        failed++;
      }
    }
  }
  await Promise.all(Array.from({ length: Number(inFlight) }, submitter));
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  latencies.sort((a, b) => a - b);
  const at = (q) => latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))] || 0;
  console.log(JSON.stringify({ done: latencies.length, failed, seconds, p50_us: at(0.5), p99_us: at(0.99) }));
  await events.close();
  await queue.close();
}

if (mode === "worker") {
  const run = (job) => (job.name === "logged" ? logged(job.data.key) : work(job.name, Buffer.from(job.data.input, "base64")));
  const worker = new Worker(QUEUE, async (job) => run(job), {
    connection,
    concurrency: 1,
  });
  worker.waitUntilReady().then(() => console.log("listening"));
} else {
  bench().then(
    () => process.exit(0),
    (err) => {
      console.error(err);
      process.exit(1);
    },
  );
}
