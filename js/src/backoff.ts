/**
 * Reconnect back-off (docs/protocol.md, "Reconnecting"): exponential with full jitter, so a
 * restarted node is not hit by every client at once.
 * @module
 */

/** Back-off settings, in milliseconds. */
export interface Backoff {
  /** The first delay's ceiling (default 100 ms, as the Rust SDK). */
  baseMs: number;
  /** The largest ceiling (default 10 s). */
  capMs: number;
}

export const DEFAULT_BACKOFF: Backoff = { baseMs: 100, capMs: 10_000 };

/** The delay before attempt `attempt` (0 = the first retry): uniform in [0, min(cap, base·2^attempt)]. */
export function backoffDelay(
  attempt: number,
  b: Backoff = DEFAULT_BACKOFF,
  random: () => number = Math.random,
): number {
  const ceiling = Math.min(b.capMs, b.baseMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}
