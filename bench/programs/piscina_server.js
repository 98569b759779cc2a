// Scenario 9's Node baseline: what a Node team would run without Offload, a
// grpc-js server serving offload.v1.Compute/Execute from a piscina pool of
// the same size as Offload's workers, running the same functions (tasks.js).
// Usage: node piscina_server.js PORT THREADS PROTO_DIR
const path = require("path");
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");
const { Piscina } = require("piscina");

const [port, threads, protoDir] = process.argv.slice(2);
const definition = loader.loadSync("offload/v1/compute.proto", { includeDirs: [protoDir], keepCase: false });
const compute = grpc.loadPackageDefinition(definition).offload.v1.Compute;
const pool = new Piscina({
  filename: path.join(__dirname, "piscina_worker.js"),
  minThreads: Number(threads),
  maxThreads: Number(threads),
});

const server = new grpc.Server({ "grpc.max_concurrent_streams": 1024 });
server.addService(compute.service, {
  Execute(call, callback) {
    const name = call.request.task.split(".").slice(1).join(".");
    pool
      .run({ name, data: call.request.input })
      .then((output) => callback(null, { output }))
      .catch((err) => callback({ code: grpc.status.INTERNAL, details: String(err) }));
  },
});
server.bindAsync(`127.0.0.1:${port}`, grpc.ServerCredentials.createInsecure(), (err) => {
  if (err) throw err;
  console.log("listening");
});
