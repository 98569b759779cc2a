// A piscina task: runs one function of tasks.js. An empty input may arrive
// as undefined (grpc-js leaves empty bytes fields out).
const { TASKS } = require("./tasks.js");

module.exports = ({ name, data }) => {
  const input = data instanceof Uint8Array ? Buffer.from(data.buffer, data.byteOffset, data.byteLength) : Buffer.alloc(0);
  return TASKS[name](input);
};
