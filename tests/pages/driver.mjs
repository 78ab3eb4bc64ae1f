// Drives Debian's Chromium for tests/pages.rs: reads one JSON command per line on stdin, runs
// it on the page with playwright-core, and answers one JSON line on stdout ({ok, value} or
// {ok: false, error}). The test's logic stays in Rust; this only moves the browser.
//
//   {"cmd":"goto","url":...}            {"cmd":"wait","selector":...,"timeout_ms":...}
//   {"cmd":"text","selector":...}       {"cmd":"fill","selector":...,"value":...}
//   {"cmd":"click","selector":...}      {"cmd":"attr","selector":...,"name":...}
//   {"cmd":"eval","expr":...}           {"cmd":"until","expr":...,"timeout_ms":...} (until it is truthy)
//   {"cmd":"screenshot","path":...}
//   {"cmd":"errors"}                    (console errors and page errors so far, CSP reports included)
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const profile = mkdtempSync(join(tmpdir(), "wskeep-pages-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath,
  headless: true,
  viewport: { width: 1280, height: 900 },
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const page = context.pages()[0] || (await context.newPage());
const errors = [];
page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
page.on("pageerror", (e) => errors.push(String(e)));

// Polls an expression with page.evaluate (the DevTools protocol, which the page's CSP allows;
// waitForFunction's string form would need 'unsafe-eval').
async function until(expr, timeout) {
  const give_up = Date.now() + timeout;
  for (;;) {
    const value = await page.evaluate(expr);
    if (value) return value;
    if (Date.now() > give_up) throw new Error(`still false after ${timeout} ms: ${expr}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

async function run(c) {
  const timeout = c.timeout_ms ?? 10000;
  switch (c.cmd) {
    case "goto": await page.goto(c.url, { waitUntil: "load" }); return null;
    case "wait": await page.waitForSelector(c.selector, { timeout, state: c.state ?? "attached" }); return null;
    case "text": return await page.locator(c.selector).first().innerText({ timeout });
    case "fill": await page.fill(c.selector, c.value, { timeout }); return null;
    case "click": await page.click(c.selector, { timeout }); return null;
    case "attr": return await page.locator(c.selector).first().getAttribute(c.name, { timeout });
    case "eval": return await page.evaluate(c.expr);
    case "until": return await until(c.expr, timeout);
    case "screenshot": await page.screenshot({ path: c.path, fullPage: true }); return c.path;
    case "errors": return errors.splice(0);
    default: throw new Error("unknown command " + c.cmd);
  }
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let answer;
  try {
    answer = { ok: true, value: await run(JSON.parse(line)) };
  } catch (e) {
    answer = { ok: false, error: String(e && e.message ? e.message : e) };
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
}
await context.close();
rmSync(profile, { recursive: true, force: true });
