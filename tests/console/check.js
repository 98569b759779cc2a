// Drives Debian's Chromium (headless) through the console served at
// argv[2], against a real server: the overview updating as calls run, the
// task list, a hash.sha256 run from the
// form (its digest shown), an image.thumbnail that renders, a failing call
// showing its status, the workers view (a recycle replaces a pid, Set
// resizes the pool), and a job submitted from outside (argv[6]) listed,
// progressing, cancelled and resubmitted from its page. Screenshots go to argv[3]. Prints "console: ok".
const { chromium } = require("playwright-core");
const crypto = require("crypto");
const fs = require("fs");
const path = require("path");

const [console_url, shots, chromiumPath, imageFile, jobId] = process.argv.slice(2);

async function main() {
  const browser = await chromium.launch({ executablePath: chromiumPath, args: ["--no-sandbox"] });
  const page = await browser.newPage({ viewport: { width: 1280, height: 720 } });
  const errors = [];
  page.on("pageerror", (err) => errors.push(String(err)));
  try {
    // The overview, while calls of debug.echo run: its row's total grows and
    // its rate shows, redrawn without a reload.
    await page.goto(`${console_url}#/overview`);
    const echo = '#overview tr[data-task="debug.echo POOL"]';
    await page.locator(`${echo} td.calls`).waitFor({ timeout: 15000 });
    const seen = Number(await page.locator(`${echo} td.calls`).innerText());
    await page.waitForFunction(
      ([row, n]) => Number(document.querySelector(`${row} td.calls`)?.textContent) > n && Number(document.querySelector(`${row} td.rate`)?.textContent) > 0,
      [echo, seen],
      { timeout: 15000 },
    );
    if (!(Number(await page.locator("#memory").getAttribute("value")) >= 0)) throw new Error("no memory gauge");
    await page.screenshot({ path: path.join(shots, "console-overview.png"), fullPage: true });

    // The task list, from ListTasks through gRPC-Web.
    await page.goto(`${console_url}#/tasks`);
    await page.getByRole("link", { name: "hash.sha256" }).waitFor({ timeout: 15000 });
    await page.screenshot({ path: path.join(shots, "console-tasks.png"), fullPage: true });

    // hash.sha256 of a text input: the digest, as hex.
    await page.getByRole("link", { name: "hash.sha256" }).click();
    await page.waitForURL(/#\/try\/hash\.sha256$/);
    await page.locator("#input-text").fill("hello console");
    await page.getByRole("button", { name: "Run" }).click();
    await page.locator("#status.status-ok").waitFor({ timeout: 15000 });
    const digest = crypto.createHash("sha256").update("hello console").digest("hex");
    const shown = await page.locator("pre.output").innerText();
    if (shown.trim() !== digest) throw new Error(`digest shown ${shown}, expected ${digest}`);
    await page.screenshot({ path: path.join(shots, "console-try-hash.png"), fullPage: true });

    // image.thumbnail from a file: an image that renders.
    await page.goto(`${console_url}#/try/image.thumbnail`);
    await page.locator("#param-width").fill("64");
    await page.locator("#param-height").fill("64");
    await page.locator("#input-file").setInputFiles(imageFile);
    await page.getByRole("button", { name: "Run" }).click();
    const image = page.locator("img.output");
    await image.waitFor({ timeout: 15000 });
    const width = await image.evaluate((img) => img.decode().then(() => img.naturalWidth));
    if (!(width > 0 && width <= 64)) throw new Error(`the thumbnail rendered ${width} pixels wide`);
    await page.screenshot({ path: path.join(shots, "console-try-thumbnail.png"), fullPage: true });

    // A failing call: its status and message.
    await page.goto(`${console_url}#/try/primes.count`);
    await page.locator("#param-limit").fill("ten");
    await page.getByRole("button", { name: "Run" }).click();
    const status = page.locator("#status.status-bad");
    await status.waitFor({ timeout: 15000 });
    const said = await status.innerText();
    if (!said.startsWith("INVALID_ARGUMENT") || !said.includes("limit")) throw new Error(`failure shown: ${said}`);
    await page.screenshot({ path: path.join(shots, "console-failed.png"), fullPage: true });

    // Workers: Recycle replaces a worker's pid; Set resizes the pool.
    await page.goto(`${console_url}#/workers`);
    const rows = page.locator("#workers tbody tr");
    await page.waitForFunction(() => document.querySelectorAll("#workers tbody tr").length === 2, null, { timeout: 15000 });
    const pid = await rows.first().getAttribute("data-pid");
    await page.getByRole("button", { name: `Recycle worker ${pid}` }).click();
    await page.locator(`#workers tr[data-pid="${pid}"]`).waitFor({ state: "detached", timeout: 15000 });
    await page.waitForFunction(() => document.querySelectorAll("#workers tbody tr").length === 2, null, { timeout: 15000 });
    await page.screenshot({ path: path.join(shots, "console-workers.png"), fullPage: true });
    await page.getByLabel("Workers of ISOLATED").fill("1");
    await page.getByRole("button", { name: "Set ISOLATED" }).click();
    await page.waitForFunction(() => document.querySelectorAll("#workers tbody tr").length === 1, null, { timeout: 15000 });

    // Jobs: one submitted from outside is listed, progresses on its page,
    // and is cancelled from there.
    await page.goto(`${console_url}#/jobs`);
    await page.locator(`#jobs tr[data-job="${jobId}"]`).waitFor({ timeout: 15000 });
    await page.screenshot({ path: path.join(shots, "console-jobs.png"), fullPage: true });
    await page.locator(`#jobs tr[data-job="${jobId}"] a`).click();
    await page.waitForURL(new RegExp(`#/jobs/${jobId}$`));
    await page.waitForFunction(() => document.querySelector("#job-state")?.textContent === "RUNNING", null, { timeout: 15000 });
    await page.waitForFunction(() => Number(document.querySelector("progress")?.value) > 0, null, { timeout: 15000 });
    await page.screenshot({ path: path.join(shots, "console-job.png"), fullPage: true });
    await page.getByRole("button", { name: "Cancel" }).click();
    await page.waitForFunction(() => document.querySelector("#job-state")?.textContent === "CANCELLED", null, { timeout: 15000 });
    const why = await page.locator("#job-outcome").innerText();
    if (!why.startsWith("CANCELLED")) throw new Error(`a cancelled job shows ${why}`);
    // Resubmit: the same work as a new job, whose page opens; cancelled too.
    await page.getByRole("button", { name: "Resubmit" }).click();
    await page.waitForURL((url) => /#\/jobs\/[0-9a-f]{32}$/.test(url.hash) && !url.hash.endsWith(jobId), { timeout: 15000 });
    await page.waitForFunction(() => ["QUEUED", "RUNNING"].includes(document.querySelector("#job-state")?.textContent), null, { timeout: 15000 });
    await page.getByRole("button", { name: "Cancel" }).click();
    await page.waitForFunction(() => document.querySelector("#job-state")?.textContent === "CANCELLED", null, { timeout: 15000 });

    if (errors.length) throw new Error(`errors in the page: ${errors.join("; ")}`);
    console.log("console: ok");
  } finally {
    await browser.close();
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
