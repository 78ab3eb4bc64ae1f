// `npm test`: `node --test` on the shim's tests (`npm run test:browser`: the Chromium proof),
// with --experimental-websocket on Node 20.10-21, where the global WebSocket needs it.
import { spawnSync } from "node:child_process";
import { readdirSync } from "node:fs";

const [major] = process.versions.node.split(".").map(Number);
const flags = major >= 22 ? [] : ["--experimental-websocket"];
const files = process.argv[2] === "browser"
  ? ["test/browser/chromium.proof.js"]
  : readdirSync(new URL("test/", import.meta.url)).filter((f) => f.endsWith(".test.js")).map((f) => `test/${f}`);
const run = spawnSync(process.execPath, [...flags, "--test", ...files], {
  stdio: "inherit",
  cwd: new URL(".", import.meta.url),
});
process.exit(run.status ?? 1);
