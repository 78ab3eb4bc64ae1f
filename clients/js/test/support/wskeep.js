// The real binary: `$WSKEEP_BIN run --config FILE`, listening on 127.0.0.1 port 0 (proxy and
// admin), its addresses read from its `bound` log line, as tests/common does.
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const repo = join(dirname(fileURLToPath(import.meta.url)), "../../../..");

export function wskeepBin() {
  const bin = process.env.WSKEEP_BIN ?? join(repo, "target/debug/wskeep");
  if (!existsSync(bin)) {
    throw new Error(`no wskeep binary at ${bin}: build it (cargo build) or set WSKEEP_BIN`);
  }
  return bin;
}

/**
 * Starts wskeep in front of `upstreamPort` with `[resume]` settings `resume` (TOML lines) and
 * any further sections in `extra`.
 */
export async function startWskeep(upstreamPort, resume = 'enabled = true\ngrace = "30s"\n', extra = "") {
  const dir = mkdtempSync(join(tmpdir(), "wskeep-js-"));
  const config = join(dir, "wskeep.toml");
  writeFileSync(config, [
    "[listen]", 'addr = "127.0.0.1:0"',
    "[admin]", 'addr = "127.0.0.1:0"',
    "[upstream]", `url = "ws://127.0.0.1:${upstreamPort}"`,
    "[resume]", resume,
    "[log]", 'format = "json"', 'level = "info"', extra, "",
  ].join("\n"));
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("WSKEEP_")));
  const child = spawn(wskeepBin(), ["run", "--config", config], { env, stdio: ["ignore", "ignore", "pipe"] });
  let log = "";
  let exited = null;
  child.on("exit", (code, signal) => { exited = signal ?? code; });
  const bound = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`wskeep never logged "bound":\n${log}`)), 15000);
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (chunk) => {
      log += chunk;
      for (const line of log.split("\n")) {
        if (!line.includes('"bound"')) continue;
        try {
          const entry = JSON.parse(line);
          clearTimeout(timer);
          resolve(entry);
          return;
        } catch { /* a partial line: wait for the rest */ }
      }
    });
    child.on("exit", () => { clearTimeout(timer); reject(new Error(`wskeep exited at start (${exited}):\n${log}`)); });
  });
  return {
    port: Number(bound.addr.split(":").pop()),
    admin: bound.admin,
    log: () => log,
    async metrics() {
      const response = await fetch(`http://${bound.admin}/metrics`);
      return response.text();
    },
    async stop() {
      if (exited === null) {
        const gone = new Promise((resolve) => child.once("exit", resolve));
        child.kill("SIGKILL");
        await gone;
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** A metric's value in a Prometheus text scrape (0 when absent). */
export function metric(text, series) {
  const line = text.split("\n").find((l) => l.startsWith(series + " "));
  return line ? Number(line.slice(series.length + 1)) : 0;
}
