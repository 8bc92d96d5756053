import { describe, expect, test } from 'vitest';
import { backoffDelay, DEFAULT_BACKOFF } from '../../src/backoff.js';

describe('back-off', () => {
  test('full jitter: uniform between 0 and the doubling ceiling', () => {
    expect(backoffDelay(0, DEFAULT_BACKOFF, () => 0)).toBe(0);
    expect(backoffDelay(0, DEFAULT_BACKOFF, () => 0.999999)).toBe(99);
    expect(backoffDelay(3, DEFAULT_BACKOFF, () => 0.5)).toBe(400); // ceiling 800
  });

  test('the ceiling stops at the cap, however many attempts', () => {
    for (const attempt of [7, 8, 50, 10_000]) {
      expect(backoffDelay(attempt, DEFAULT_BACKOFF, () => 0.999999)).toBe(9999);
    }
  });

  test('delays spread: many clients do not come back at once', () => {
    const delays = Array.from({ length: 1000 }, () => backoffDelay(6));
    const buckets = new Set(delays.map((d) => Math.floor(d / 640)));
    expect(Math.min(...delays)).toBeGreaterThanOrEqual(0);
    expect(Math.max(...delays)).toBeLessThan(6400);
    expect(buckets.size).toBe(10); // every tenth of the range is used
  });
});
