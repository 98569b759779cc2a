// The work of the worker-program benchmark (scenario 9), as plain functions
// that Offload's Node program and the grpc-js + piscina baseline both run:
// a 1 KiB hash (overhead) and about 5 ms of CPU work.
const crypto = require("crypto");

const BURN_ROUNDS = 2_300_000;

function sha256(data) {
  return crypto.createHash("sha256").update(data).digest();
}

// The loop has a function of its own: V8 compiles a hot loop while it runs
// (on-stack replacement), before the code after it has ever run, and with
// that code in the same function the compiled loop was thrown away at the
// end of every call ("insufficient type feedback" deopts, `node
// --trace-deopt`), which made the work 4-8x slower in whichever harness it
// happened to.
function spin(x, rounds) {
  for (let i = 0; i < rounds; i++) x = (Math.imul(x, 31) + i) >>> 0;
  return x;
}

function burn(data) {
  const out = Buffer.alloc(4);
  out.writeUInt32BE(spin(data.length, BURN_ROUNDS));
  return out;
}

module.exports = { TASKS: { sha256, burn } };
