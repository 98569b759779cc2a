// Offload's web console. It speaks to the server's gRPC port through
// gRPC-Web (Connect's web client), with message types read at run time from
// the descriptors the server serves: the same API, checks and statuses as
// every other client, and no generated code to keep in step with proto/.
//
// Views have URLs of their own (#/tasks, #/try/NAME), for links and
// bookmarks.

import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { createFileRegistry, fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema, timestampDate } from "@bufbuild/protobuf/wkt";

const view = document.getElementById("view");

/** The API: the Compute client and the enums' names. */
async function connect() {
  const [config, descriptors] = await Promise.all([
    fetch("config.json").then((r) => r.json()),
    fetch("descriptors.bin").then((r) => r.arrayBuffer()),
  ]);
  const registry = createFileRegistry(fromBinary(FileDescriptorSetSchema, new Uint8Array(descriptors)));
  const host = location.hostname.includes(":") ? `[${location.hostname}]` : location.hostname;
  const baseUrl = `${config.grpcScheme}://${host}:${config.grpcPort}`;
  document.getElementById("server").textContent = `gRPC-Web at ${baseUrl}`;
  // The token, when the server declares clients: sent with every call.
  const bearer = (next) => async (req) => {
    const token = sessionStorage.getItem("offload-token");
    if (token) req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
  const transport = createGrpcWebTransport({ baseUrl, interceptors: [bearer] });
  const modes = registry.getEnum("offload.v1.ExecutionMode");
  const jobStates = registry.getEnum("offload.v1.JobState");
  return {
    compute: createClient(registry.getService("offload.v1.Compute"), transport),
    admin: createClient(registry.getService("offload.admin.v1.Admin"), transport),
    jobs: createClient(registry.getService("offload.v1.Jobs"), transport),
    stateName: (n) => jobStates.values.find((v) => v.number === n)?.name.replace("JOB_STATE_", "") ?? String(n),
    states: jobStates.values.filter((v) => v.number !== 0).map((v) => [v.number, v.name.replace("JOB_STATE_", "")]),
    modeName: (n) => modes.values.find((v) => v.number === n)?.name.replace("EXECUTION_MODE_", "") ?? String(n),
  };
}

/** A gRPC status code's name, as gRPC spells it (INVALID_ARGUMENT). */
function statusName(code) {
  // Connect spells code 1 the American way.
  if (code === Code.Canceled) return "CANCELLED";
  return (Code[code] ?? String(code)).replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

/** An element `tag` with `attrs` and `children` (strings become text). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === false || value == null) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children.flat(Infinity).filter((c) => c != null));
  return node;
}

function show(...nodes) {
  view.replaceChildren(...nodes);
  view.focus();
}

function failed(err) {
  const status = err instanceof ConnectError ? `${statusName(err.code)}: ${err.rawMessage}` : String(err);
  return el("p", { class: "status-bad", role: "alert" }, status);
}

/** The form asking for a token, after a call was refused for want of one. */
function tokenForm(err) {
  const input = el("input", { type: "password", id: "token", autocomplete: "off", required: true });
  const use = (e) => {
    e.preventDefault();
    sessionStorage.setItem("offload-token", input.value);
    tasksCache = undefined;
    window.dispatchEvent(new HashChangeEvent("hashchange"));
  };
  return el(
    "form",
    { class: "try", id: "token-form", onsubmit: use },
    el(
      "p",
      { style: "grid-column: 1 / -1", id: "token-why" },
      sessionStorage.getItem("offload-token")
        ? "The token given was refused: give another."
        : "This server serves declared clients only: give your client's token. It is kept in this tab only.",
    ),
    el("label", { for: "token" }, "Token"),
    input,
    el("div", { class: "actions" }, el("button", { type: "submit" }, "Use this token")),
    el("div", { style: "grid-column: 1 / -1" }, failed(err)),
  );
}

let tasksCache;
async function tasks(api) {
  tasksCache ??= (await api.compute.listTasks({})).tasks;
  return tasksCache;
}

/** #/tasks: every task the caller may run, with its modes and params. */
async function tasksView(api) {
  const list = await tasks(api);
  const rows = list.map((t) =>
    el(
      "tr",
      {},
      el("td", {}, el("a", { href: `#/try/${encodeURIComponent(t.name)}` }, t.name)),
      el("td", {}, t.description),
      el("td", {}, t.allowedModes.map(api.modeName).join(", ")),
      el("td", {}, t.params.map((p) => p.name).join(", ") || "none"),
      el("td", {}, t.cacheable ? `yes (v${t.version})` : "no"),
    ),
  );
  show(
    el("h2", {}, "Tasks"),
    el(
      "table",
      {},
      el("thead", {}, el("tr", {}, ["Task", "What it does", "Modes", "Params", "Cached"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, rows),
    ),
  );
}

/** The bytes of `output` as text when they are printable UTF-8. */
function asText(output) {
  try {
    const text = new TextDecoder("utf-8", { fatal: true }).decode(output);
    return /^[\P{Cc}\n\r\t]*$/u.test(text) ? text : null;
  } catch {
    return null;
  }
}

const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");

/** The image type of `output`, from its first bytes, if it is one. */
function imageType(output) {
  const starts = (...bytes) => bytes.every((b, i) => output[i] === b);
  if (starts(0x89, 0x50, 0x4e, 0x47)) return "image/png";
  if (starts(0xff, 0xd8, 0xff)) return "image/jpeg";
  if (starts(0x52, 0x49, 0x46, 0x46) && output[8] === 0x57) return "image/webp";
  return null;
}

/** The output shown as an image, text or hex, with a download link. */
function outputView(task, output) {
  const type = imageType(output);
  const blob = new Blob([output], { type: type ?? "application/octet-stream" });
  const url = URL.createObjectURL(blob);
  const text = type ? null : asText(output);
  const shown = type
    ? el("img", { class: "output", src: url, alt: `the output of ${task}` })
    : el("pre", { class: "output", "data-format": text == null ? "hex" : "text" }, text ?? hex(output));
  return [
    shown,
    el("p", {}, el("a", { href: url, download: `${task}.out` }, `Download the output (${output.length} bytes)`)),
  ];
}

/** #/try/NAME: a form built from the task's spec; runs it and shows the answer. */
async function tryView(api, name) {
  const list = await tasks(api);
  const task = list.find((t) => t.name === name) ?? list[0];
  if (!task) return show(el("p", {}, "This server offers no task to this caller."));
  const picker = el(
    "select",
    { id: "task", onchange: (e) => (location.hash = `#/try/${encodeURIComponent(e.target.value)}`) },
    list.map((t) => el("option", { value: t.name, selected: t.name === task.name }, t.name)),
  );
  const params = task.params.map((p) => {
    const id = `param-${p.name}`;
    return [
      el(
        "label",
        { for: id },
        p.name,
        p.required ? el("span", { class: "required", "aria-hidden": "true" }, " *") : null,
        el("span", { class: "hint" }, p.description),
      ),
      el("input", {
        type: "text",
        id,
        name: p.name,
        placeholder: p.required ? "required" : `default ${p.defaultValue}`,
        required: p.required,
        "aria-required": p.required ? "true" : null,
      }),
    ];
  });
  const modes = el(
    "select",
    { id: "mode" },
    el("option", { value: "0" }, `default (${api.modeName(task.defaultMode)})`),
    task.allowedModes.map((m) => el("option", { value: String(m) }, api.modeName(m))),
  );
  const result = el("section", { id: "result", "aria-live": "polite" });
  const form = el(
    "form",
    { class: "try", onsubmit: (e) => (e.preventDefault(), run(api, task, form, result)) },
    el("label", { for: "task" }, "Task", el("span", { class: "hint" }, task.description)),
    picker,
    params,
    el("label", { for: "input-text" }, "Input", el("span", { class: "hint" }, "text, or a file below")),
    el("textarea", { id: "input-text", name: "input" }),
    el("label", { for: "input-file" }, "Input file"),
    el("input", { type: "file", id: "input-file" }),
    el("label", { for: "mode" }, "Mode"),
    modes,
    el("label", { for: "deadline" }, "Deadline", el("span", { class: "hint" }, "seconds; empty: none")),
    el("input", { type: "number", id: "deadline", min: "0.001", step: "any" }),
    el("label", { for: "stream" }, "Progress", el("span", { class: "hint" }, "ExecuteStream instead of Execute")),
    el("input", { type: "checkbox", id: "stream", checked: true }),
    el("div", { class: "actions" }, el("button", { type: "submit", id: "run" }, "Run")),
  );
  show(el("h2", {}, "Try a task"), form, result);
}

async function run(api, task, form, result) {
  const params = {};
  for (const p of task.params) {
    const value = form.querySelector(`#param-${CSS.escape(p.name)}`).value;
    if (value !== "") params[p.name] = value;
  }
  const file = form.querySelector("#input-file").files[0];
  const input = file
    ? new Uint8Array(await file.arrayBuffer())
    : new TextEncoder().encode(form.querySelector("#input-text").value);
  const request = { task: task.name, input, params, mode: Number(form.querySelector("#mode").value) };
  const seconds = Number(form.querySelector("#deadline").value);
  const options = seconds > 0 ? { timeoutMs: Math.round(seconds * 1000) } : {};
  const bar = el("progress", { max: "1", value: "0", "aria-label": "progress" });
  const stage = el("p", { class: "muted" }, "Sent");
  result.replaceChildren(stage, bar);
  const started = performance.now();
  try {
    let response;
    if (form.querySelector("#stream").checked) {
      for await (const event of api.compute.executeStream(request, options)) {
        if (event.event.case === "progress") {
          const progress = event.event.value;
          bar.value = progress.fraction;
          stage.textContent = progress.message || "Running";
        } else if (event.event.case === "result") {
          response = event.event.value;
        }
      }
    } else {
      response = await api.compute.execute(request, options);
    }
    bar.value = 1;
    const took = ((performance.now() - started) / 1000).toFixed(3);
    const stats = response.stats;
    result.replaceChildren(
      el("p", { class: "status-ok", id: "status" }, "OK"),
      el(
        "p",
        { class: "muted" },
        `${api.modeName(response.mode)}, ${took} s` +
          (stats?.cached ? ", from the result cache" : `, ran ${stats?.runUs ?? 0} us`) +
          (stats?.workerPid ? `, worker ${stats.workerPid}` : ""),
      ),
      ...outputView(task.name, response.output),
    );
  } catch (err) {
    result.replaceChildren(Object.assign(failed(err), { id: "status" }));
  }
}

/** The view's refresh, stopped when another view is shown. */
let refresh;
function every(ms, tick) {
  clearInterval(refresh);
  refresh = setInterval(tick, ms);
}

const mib = (bytes) => (Number(bytes) / 1048576).toFixed(1);

const seconds = (s) => (s >= 1 ? `${s.toFixed(2)} s` : s >= 0.001 ? `${(s * 1e3).toFixed(1)} ms` : `${Math.round(s * 1e6)} us`);

/** #/overview: rates, latency, queues and memory, from the admin snapshot each second. */
async function overviewView(api) {
  const tasksBody = el("tbody");
  const executorsBody = el("tbody");
  const memory = el("progress", { id: "memory", max: "1", value: "0", "aria-label": "in-flight bytes against the budget" });
  const memoryText = el("span", { id: "memory-text" });
  const status = el("p", { class: "muted", "aria-live": "polite" });
  let before;
  async function draw() {
    const now = await api.admin.snapshot({});
    const dt = before ? now.uptimeSeconds - before.uptimeSeconds : 0;
    const previous = new Map((before?.tasks ?? []).map((t) => [`${t.task} ${t.mode}`, t]));
    const rate = (n) => (dt > 0 ? (n / dt).toFixed(1) : "-");
    tasksBody.replaceChildren(
      ...now.tasks.map((t) => {
        const was = previous.get(`${t.task} ${t.mode}`);
        const codes = Object.entries(t.codes)
          .map(([code, n]) => [code, Number(n) - Number(was?.codes[code] ?? 0)])
          .filter(([, n]) => n > 0)
          .map(([code, n]) => `${code} ${rate(n)}`)
          .join(", ");
        const ran = Number(t.ran) - Number(was?.ran ?? 0);
        const waited = ran > 0 ? seconds((t.queuedSeconds - (was?.queuedSeconds ?? 0)) / ran) : "-";
        return el(
          "tr",
          { "data-task": `${t.task} ${t.mode}` },
          el("td", {}, t.task),
          el("td", {}, t.mode),
          el("td", { class: "rate" }, rate(Number(t.calls) - Number(was?.calls ?? t.calls))),
          el("td", {}, codes || "-"),
          el("td", {}, t.recentP50RunSeconds ? seconds(t.recentP50RunSeconds) : "-"),
          el("td", {}, t.recentP99RunSeconds ? seconds(t.recentP99RunSeconds) : "-"),
          el("td", {}, waited),
          el("td", { class: "calls" }, String(t.calls)),
        );
      }),
    );
    executorsBody.replaceChildren(
      ...now.executors.map((e) =>
        el("tr", {}, el("td", {}, e.executor), el("td", {}, String(e.queued)), el("td", {}, String(e.busy)), el("td", {}, String(e.size))),
      ),
    );
    const budget = Number(now.inflightBudget);
    memory.value = budget > 0 ? Number(now.inflightBytes) / budget : 0;
    memoryText.textContent = ` ${mib(now.inflightBytes)} of ${mib(now.inflightBudget)} MiB held by calls in flight`;
    status.textContent = `Replica ${now.replica}, up ${now.uptimeSeconds.toFixed(0)} s; rates over the last ${dt.toFixed(1)} s, run times over the last 10-20 s.`;
    before = now;
  }
  show(
    el("h2", {}, "Overview"),
    status,
    el(
      "table",
      { id: "overview" },
      el("caption", { class: "muted" }, "Calls by task and mode"),
      el("thead", {}, el("tr", {}, ["Task", "Mode", "Calls/s", "By status (/s)", "Run p50", "Run p99", "Mean wait", "Calls"].map((h) => el("th", { scope: "col" }, h)))),
      tasksBody,
    ),
    el(
      "table",
      { id: "executors" },
      el("caption", { class: "muted" }, "Executors"),
      el("thead", {}, el("tr", {}, ["Executor", "Queued", "Busy", "Size"].map((h) => el("th", { scope: "col" }, h)))),
      executorsBody,
    ),
    el("h3", {}, "Memory"),
    el("p", {}, memory, memoryText),
  );
  await draw();
  every(1000, () => draw().catch((err) => status.replaceChildren(failed(err))));
}

/** #/workers: every worker process, redrawn each second; Recycle and pool sizes. */
async function workersView(api) {
  const status = el("p", { id: "workers-status", "aria-live": "polite", class: "muted" });
  const body = el("tbody");
  const sizes = el("tbody");
  const table = el(
    "table",
    { id: "workers" },
    el("caption", { class: "muted" }, "Worker processes of every pool and program"),
    el(
      "thead",
      {},
      el("tr", {}, ["Pool", "Slot", "PID", "State", "Task", "RSS (MiB)", "Tasks done", "Age (s)", ""].map((h) => el("th", { scope: "col" }, h))),
    ),
    body,
  );
  const pools = el(
    "table",
    { id: "pools" },
    el("caption", { class: "muted" }, "Executors: queued and busy now, and their size"),
    el("thead", {}, el("tr", {}, ["Executor", "Queued", "Busy", "Size", "Set size"].map((h) => el("th", { scope: "col" }, h)))),
    sizes,
  );
  const recycle = async (pid) => {
    try {
      await api.admin.recycleWorker({ pid });
      status.textContent = `Worker ${pid} is being replaced.`;
      await draw();
    } catch (err) {
      status.replaceChildren(failed(err));
    }
  };
  const resize = async (pool, input) => {
    try {
      const answer = await api.admin.setWorkers({ pool, workers: Number(input.value) });
      status.textContent = `${pool || "Offload's own workers"}: ${answer.previous} -> ${input.value}.`;
      await draw();
    } catch (err) {
      status.replaceChildren(failed(err));
    }
  };
  // Rows are kept and updated in place (by pid, by executor), so that a
  // button or field keeps its focus and its typed value across redraws.
  const rows = new Map();
  const place = (parent, row, index) => {
    if (parent.children[index] !== row) parent.insertBefore(row, parent.children[index] ?? null);
  };
  const cells = (row, values) => values.forEach((v, i) => (row.children[i].textContent = v));
  async function draw() {
    const now = await api.admin.snapshot({});
    const seen = new Set();
    now.workers.forEach((w, index) => {
      const key = `worker ${w.pid}`;
      seen.add(key);
      let row = rows.get(key);
      if (!row) {
        row = el(
          "tr",
          { "data-pid": String(w.pid) },
          ...Array.from({ length: 8 }, () => el("td")),
          el("td", {}, el("button", { class: "secondary", type: "button", "aria-label": `Recycle worker ${w.pid}`, onclick: () => recycle(w.pid) }, "Recycle")),
        );
        rows.set(key, row);
      }
      cells(row, [w.pool || "offload", w.slot, w.pid, w.state, w.task || "", mib(w.rssBytes), w.tasksDone, w.ageSeconds.toFixed(0)].map(String));
      place(body, row, index);
    });
    now.executors.forEach((e, index) => {
      const key = `executor ${e.executor}`;
      seen.add(key);
      let row = rows.get(key);
      if (!row) {
        // Sizes are set for worker processes: Offload's own (ISOLATED) and each program's.
        const pool = e.executor === "ISOLATED" ? "" : e.executor;
        const input = el("input", { type: "number", min: "1", max: "256", value: String(e.size), "aria-label": `Workers of ${e.executor}` });
        const set = e.executor === "POOL"
          ? "threads: --pool-threads"
          : el("span", {}, input, " ", el("button", { type: "button", class: "secondary", onclick: () => resize(pool, input) }, `Set ${e.executor}`));
        row = el("tr", { "data-executor": e.executor }, el("td"), el("td"), el("td"), el("td"), el("td", {}, set));
        rows.set(key, row);
      }
      cells(row, [e.executor, e.queued, e.busy, e.size].map(String));
      place(sizes, row, index);
    });
    for (const [key, row] of rows) {
      if (!seen.has(key)) {
        row.remove();
        rows.delete(key);
      }
    }
  }
  show(el("h2", {}, "Workers"), status, table, pools);
  await draw();
  // Redrawn while shown; a failed refresh says why and tries again.
  every(1000, () => draw().catch((err) => status.replaceChildren(failed(err))));
}

const when = (ts) => (ts ? timestampDate(ts).toLocaleString() : "");

/** #/jobs: jobs newest first, by state, a page at a time; refreshed every 2 s. */
async function jobsView(api, filter) {
  const state = Number(new URLSearchParams(filter ?? "").get("state") ?? 0);
  const pageTokens = [""];
  const body = el("tbody");
  const status = el("p", { class: "muted", "aria-live": "polite" });
  const picker = el(
    "select",
    { id: "state", onchange: (e) => (location.hash = e.target.value === "0" ? "#/jobs" : `#/jobs?state=${e.target.value}`) },
    el("option", { value: "0" }, "every state"),
    api.states.map(([n, name]) => el("option", { value: String(n), selected: n === state }, name)),
  );
  const older = el("button", { type: "button", class: "secondary", onclick: () => draw(pageTokens.length) }, "Older");
  const newer = el("button", { type: "button", class: "secondary", onclick: () => draw(pageTokens.length - 2) }, "Newer");
  let page = 0;
  async function draw(at = page) {
    page = Math.max(0, at);
    const answer = await api.jobs.list({ state, pageSize: 20, pageToken: pageTokens[page] ?? "" });
    pageTokens.length = page + 1;
    if (answer.nextPageToken) pageTokens.push(answer.nextPageToken);
    older.disabled = !answer.nextPageToken;
    newer.disabled = page === 0;
    body.replaceChildren(
      ...answer.jobs.map((j) =>
        el(
          "tr",
          { "data-job": j.id },
          el("td", {}, el("a", { href: `#/jobs/${j.id}` }, j.id.slice(0, 12))),
          el("td", {}, j.task),
          el("td", { class: "state" }, api.stateName(j.state)),
          el("td", {}, `${Math.round(j.progress * 100)}%`),
          el("td", {}, String(j.attempts)),
          el("td", {}, when(j.createTime)),
        ),
      ),
    );
    status.textContent = answer.jobs.length ? "" : "No job here.";
  }
  show(
    el("h2", {}, "Jobs"),
    el("p", {}, el("label", { for: "state" }, "State "), picker),
    el(
      "table",
      { id: "jobs" },
      el("thead", {}, el("tr", {}, ["Job", "Task", "State", "Progress", "Attempts", "Submitted"].map((h) => el("th", { scope: "col" }, h)))),
      body,
    ),
    status,
    el("p", { class: "actions" }, newer, older),
  );
  await draw();
  every(2000, () => draw().catch((err) => status.replaceChildren(failed(err))));
}

/** #/jobs/ID: one job, live (Wait), with Cancel and its output. */
async function jobView(api, id) {
  const state = el("p", { id: "job-state", class: "status-ok" });
  const bar = el("progress", { max: "1", value: "0", "aria-label": "progress" });
  const facts = el("dl");
  const outcome = el("section", { id: "job-outcome", "aria-live": "polite" });
  const cancel = el("button", { type: "button", id: "cancel", onclick: () => api.jobs.cancel({ id }).catch((err) => outcome.replaceChildren(failed(err))) }, "Cancel");
  // The same work as a new job (of whoever resubmits it), then its page.
  const resubmit = el(
    "button",
    {
      type: "button",
      class: "secondary",
      id: "resubmit",
      onclick: () => api.jobs.resubmit({ id }).then((job) => (location.hash = `#/jobs/${job.id}`), (err) => outcome.replaceChildren(failed(err))),
    },
    "Resubmit",
  );
  show(el("h2", {}, `Job ${id}`), state, bar, facts, el("p", { class: "actions" }, cancel, resubmit), outcome);
  const draw = (job) => {
    const name = api.stateName(job.state);
    state.textContent = name;
    state.className = ["FAILED", "CANCELLED"].includes(name) ? "status-bad" : "status-ok";
    bar.value = job.progress;
    const fact = (term, value) => [el("dt", {}, term), el("dd", {}, value)];
    facts.replaceChildren(
      ...fact("Task", job.task),
      ...fact("Progress", `${Math.round(job.progress * 100)}% ${job.progressMessage}`),
      ...fact("Attempts", String(job.attempts)),
      ...fact("Submitted", when(job.createTime)),
      ...fact("Started", when(job.startTime)),
      ...fact("Finished", when(job.finishTime)),
    );
    const done = ["SUCCEEDED", "FAILED", "CANCELLED"].includes(name);
    cancel.disabled = done;
    if (job.error) outcome.replaceChildren(el("p", { class: "status-bad", role: "alert" }, `${statusName(job.error.code)}: ${job.error.message}`));
    else if (name === "SUCCEEDED") outcome.replaceChildren(...outputView(job.task, job.output));
  };
  const stream = new AbortController();
  window.addEventListener("hashchange", () => stream.abort(), { once: true });
  try {
    for await (const job of api.jobs.wait({ id }, { signal: stream.signal })) draw(job);
  } catch (err) {
    if (!stream.signal.aborted) outcome.replaceChildren(failed(err));
  }
}

async function route(api) {
  clearInterval(refresh);
  const [, view, arg] = location.hash.split("/");
  const name = view || "overview";
  const current = name.split("?")[0];
  for (const link of document.querySelectorAll("nav a")) {
    link.toggleAttribute("aria-current", link.dataset.view === current);
    if (link.dataset.view === current) link.setAttribute("aria-current", "page");
  }
  try {
    if (name === "try") await tryView(api, arg && decodeURIComponent(arg));
    else if (name === "workers") await workersView(api);
    else if (name === "overview") await overviewView(api);
    else if (name.startsWith("jobs") && arg) await jobView(api, decodeURIComponent(arg));
    else if (name.startsWith("jobs")) await jobsView(api, name.split("?")[1]);
    else await tasksView(api);
  } catch (err) {
    if (err instanceof ConnectError && err.code === Code.Unauthenticated) show(el("h2", {}, "A token is needed"), tokenForm(err));
    else show(el("h2", {}, "The server refused"), failed(err));
  }
}

connect().then(
  (api) => {
    window.addEventListener("hashchange", () => route(api));
    route(api);
  },
  (err) => show(failed(err)),
);
