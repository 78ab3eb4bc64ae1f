// Waiting without fixed sleeps: poll a condition every few milliseconds, up to a limit.
export async function eventually(predicate, ms = 10000, what = "condition") {
  const giveUp = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > giveUp) throw new Error(`no ${what} within ${ms} ms`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

/** `u0`..`u{n-1}` (or another prefix): what a numbered stream must be, exactly. */
export function numbered(prefix, n) {
  return Array.from({ length: n }, (_, i) => `${prefix}${i}`);
}
