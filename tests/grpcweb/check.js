// Calls Offload through gRPC-Web as a browser would, with the official
// grpc-web client library (its XHR transport, given xhr2 in Node), in the
// grpc-web-text format that supports server streaming. Checks Execute,
// ListTasks, ExecuteStream, an error status, and the CORS answers.
// Usage: node check.js http://HOST:PORT PROTO_DIR ALLOWED_ORIGIN
"use strict";
global.XMLHttpRequest = require("xhr2");
const assert = require("assert");
const crypto = require("crypto");
const http = require("http");
const path = require("path");
const protobuf = require("protobufjs");
const { GrpcWebClientBase, MethodDescriptor, MethodType } = require("grpc-web");

const [url, protoDir, allowedOrigin] = process.argv.slice(2);
const root = new protobuf.Root();
root.resolvePath = (_origin, target) => path.join(protoDir, target);
root.loadSync("offload/v1/compute.proto");
const type = (name) => root.lookupType(`offload.v1.${name}`);

// grpc-web only calls the (de)serializers it is given: protobufjs does both.
function method(name, kind, request, response) {
  const [req, resp] = [type(request), type(response)];
  return new MethodDescriptor(
    `/offload.v1.Compute/${name}`,
    kind,
    Object,
    Object,
    (message) => req.encode(req.fromObject(message)).finish(),
    (bytes) => resp.toObject(resp.decode(bytes), { defaults: true, enums: String }),
  );
}
const execute = method("Execute", MethodType.UNARY, "ExecuteRequest", "ExecuteResponse");
const executeStream = method("ExecuteStream", MethodType.SERVER_STREAMING, "ExecuteRequest", "ExecuteEvent");
const listTasks = method("ListTasks", MethodType.UNARY, "ListTasksRequest", "ListTasksResponse");

const client = new GrpcWebClientBase({ format: "text" });
const call = (descriptor, message) => client.unaryCall(url + descriptor.getName(), message, {}, descriptor);

function preflight(origin) {
  return new Promise((resolve, reject) => {
    const request = http.request(`${url}/offload.v1.Compute/Execute`, {
      method: "OPTIONS",
      headers: {
        Origin: origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-grpc-web,x-user-agent",
      },
    });
    request.on("response", (response) => {
      response.resume();
      resolve(response.headers);
    });
    request.on("error", reject);
    request.end();
  });
}

async function main() {
  const input = crypto.randomBytes(1000);
  const hashed = await call(execute, { task: "hash.sha256", input, id: "web-1" });
  assert.deepStrictEqual(Buffer.from(hashed.output), crypto.createHash("sha256").update(input).digest());
  assert.strictEqual(hashed.id, "web-1");

  const listed = await call(listTasks, {});
  assert.ok(listed.tasks.some((t) => t.name === "hash.sha256"), "ListTasks lists hash.sha256");

  const events = [];
  await new Promise((resolve, reject) => {
    const stream = client.serverStreaming(
      url + executeStream.getName(),
      { task: "debug.spin", params: { ms: "300" } },
      {},
      executeStream,
    );
    stream.on("data", (event) => events.push(event));
    stream.on("error", reject);
    stream.on("end", resolve);
  });
  assert.ok(events.some((e) => e.progress), "ExecuteStream sent progress events");
  assert.ok(events.some((e) => e.result), "ExecuteStream ended with its result");

  await assert.rejects(call(execute, { task: "no.such" }), (err) => err.code === 5 && /no\.such/.test(err.message));

  const allowed = await preflight(allowedOrigin);
  assert.strictEqual(allowed["access-control-allow-origin"], allowedOrigin, "the allowed origin may call");
  assert.match(allowed["access-control-allow-headers"] || "", /x-grpc-web/);
  const other = await preflight("https://elsewhere.example");
  assert.strictEqual(other["access-control-allow-origin"], undefined, "another origin may not");
  console.log("grpc-web client: ok");
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
