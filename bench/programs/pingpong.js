// A bare round trip between two Node processes over a Unix socket (1 KiB
// each way), the floor of what any Node worker pool pays per call. Prints
// the median round trip in microseconds. Usage: node pingpong.js SECONDS
const net = require("net");
const os = require("os");
const path = require("path");
const { fork } = require("child_process");

const SIZE = 1024;

if (process.argv[2] === "--peer") {
  const socket = net.connect(process.argv[3]);
  let got = 0;
  socket.on("data", (chunk) => {
    got += chunk.length;
    while (got >= SIZE) {
      got -= SIZE;
      socket.write(Buffer.alloc(SIZE, 120));
    }
  });
  socket.on("end", () => process.exit(0));
} else {
  const seconds = Number(process.argv[2]);
  const address = path.join(os.tmpdir(), `offload-pingpong-${process.pid}.sock`);
  const server = net.createServer((socket) => {
    const message = Buffer.alloc(SIZE, 120);
    const samples = [];
    const end = Date.now() + seconds * 1000;
    let got = 0;
    let start = process.hrtime.bigint();
    socket.on("data", (chunk) => {
      got += chunk.length;
      if (got < SIZE) return;
      got -= SIZE;
      samples.push(Number(process.hrtime.bigint() - start) / 1000);
      if (Date.now() < end) {
        start = process.hrtime.bigint();
        socket.write(message);
        return;
      }
      samples.sort((a, b) => a - b);
      console.log(samples[samples.length >> 1].toFixed(1));
      socket.end();
      server.close();
      child.kill();
    });
    socket.write(message);
  });
  server.listen(address);
  const child = fork(__filename, ["--peer", address]);
}
