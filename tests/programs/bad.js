// A worker program that declares a task outside its namespace: the front
// refuses it at the handshake (the end-to-end tests declare it as "bad").
const { task, serve } = require("offload-worker");
task("other.x", { description: "not in program bad's namespace" }, (ctx, data) => data);
serve();
