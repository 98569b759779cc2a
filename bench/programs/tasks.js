// The work of the worker-program benchmark (scenario 9), as plain functions
// that Offload's Node program and the grpc-js + piscina baseline both run:
// a 1 KiB hash (overhead) and about 5 ms of CPU work.
const crypto = require("crypto");

const BURN_ROUNDS = 2_300_000;

function sha256(data) {
  return crypto.createHash("sha256").update(data).digest();
}

function burn(data) {
  let x = data.length;
  for (let i = 0; i < BURN_ROUNDS; i++) x = (Math.imul(x, 31) + i) >>> 0;
  const out = Buffer.alloc(4);
  out.writeUInt32BE(x);
  return out;
}

module.exports = { TASKS: { sha256, burn } };
