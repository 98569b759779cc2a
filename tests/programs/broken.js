// A worker program that cannot start: its declaration is malformed (a param
// given as a number), so the SDK throws TypeError where the task is
// registered (the end-to-end tests declare it as "broken").
const { task, serve } = require("offload-worker");
task("broken.sum", { description: "sums a column", params: { column: 5 } }, (ctx, data) => data);
serve();
