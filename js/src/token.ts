/**
 * Tokens: reading a JWT's expiry (the SDK does not verify it: the node does) and choosing
 * when to renew it.
 * @module
 */

import { fromBase64 } from './codec.js';

/** The token's `exp` in unix milliseconds, or undefined when it has none or is not a JWT. */
export function tokenExpiryMs(token: string): number | undefined {
  const part = token.split('.')[1];
  if (!part) return undefined;
  try {
    const claims = JSON.parse(new TextDecoder().decode(fromBase64(part))) as { exp?: unknown };
    return typeof claims.exp === 'number' ? claims.exp * 1000 : undefined;
  } catch {
    return undefined;
  }
}

/**
 * How long to wait before renewing a token that expires at `expiresAtMs`: a third of its
 * remaining life before it ends, at most `leadMs` (default 30 s) before, and never less than
 * 0. A node accepts a token until `exp` plus its leeway (5 s by default), so renewing
 * before `exp` always has time in hand.
 */
export function renewDelay(expiresAtMs: number, nowMs: number, leadMs = 30_000): number {
  const left = expiresAtMs - nowMs;
  if (left <= 0) return 0;
  return Math.max(0, left - Math.min(leadMs, left / 3));
}
