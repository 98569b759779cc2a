// With declared clients, the console refuses to work without a token:
// it asks for one, refuses a wrong one, and with a right one lists the
// tasks that client may run (only those). Args: console URL, screenshot
// folder, Chromium, the token. Prints "console token: ok".
const { chromium } = require("playwright-core");
const path = require("path");

const [console_url, shots, chromiumPath, token] = process.argv.slice(2);

async function main() {
  const browser = await chromium.launch({ executablePath: chromiumPath, args: ["--no-sandbox"] });
  const page = await browser.newPage({ viewport: { width: 1280, height: 720 } });
  try {
    await page.goto(`${console_url}#/tasks`);
    await page.locator("#token-form").waitFor({ timeout: 15000 });
    if (await page.locator("table").count()) throw new Error("tasks shown without a token");
    await page.screenshot({ path: path.join(shots, "console-token.png"), fullPage: true });
    await page.locator("#token").fill("not-the-token-0123456789");
    await page.getByRole("button", { name: "Use this token" }).click();
    // A new form (the first one says no token was given yet) saying so.
    await page.locator("#token-why").filter({ hasText: "was refused" }).waitFor({ timeout: 15000 });
    await page.locator("#token-form .status-bad").filter({ hasText: "UNAUTHENTICATED" }).waitFor({ timeout: 15000 });
    await page.locator("#token").fill(token);
    await page.getByRole("button", { name: "Use this token" }).click();
    await page.getByRole("link", { name: "hash.sha256" }).waitFor({ timeout: 15000 });
    if (await page.getByRole("link", { name: "image.thumbnail" }).count()) {
      throw new Error("a task this client may not run is listed");
    }
    console.log("console token: ok");
  } finally {
    await browser.close();
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
