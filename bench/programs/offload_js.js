// Scenario 9's Node worker program for Offload: the functions of tasks.js
// as tasks js.sha256 and js.burn.
const { task, serve } = require("offload-worker");
const { TASKS } = require("./tasks.js");

for (const [name, fn] of Object.entries(TASKS)) {
  task(`js.${name}`, { description: name }, (ctx, data) => fn(data));
}
serve();
