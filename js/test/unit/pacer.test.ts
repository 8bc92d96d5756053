import { describe, expect, test } from 'vitest';
import { Bucket } from '../../src/pacer.js';

describe('pacing', () => {
  test('a paced bucket allows half the burst at once, then 90 % of the rate', () => {
    const b = Bucket.paced(100, 40, 0);
    let sent = 0;
    while (b.wait(0) === 0) {
      b.take(0);
      sent++;
    }
    expect(sent).toBe(20);
    expect(b.wait(0)).toBe(12); // 1 / 90 per ms, rounded up
    // One second later: 90 more, never above the (half) burst at once.
    let later = 0;
    for (let t = 0; t <= 1000; t += 1) {
      while (b.wait(t) === 0) {
        b.take(t);
        later++;
      }
    }
    expect(later).toBeGreaterThanOrEqual(89);
    expect(later).toBeLessThanOrEqual(91);
  });

  test('over any window a paced client stays under the node limit (rate + burst)', () => {
    const rate = 50;
    const burst = 100;
    const b = Bucket.paced(rate, burst, 0);
    const times: number[] = [];
    for (let t = 0; t < 10_000; t += 5) {
      while (b.wait(t) === 0) {
        b.take(t);
        times.push(t);
      }
    }
    for (let i = 0; i < times.length; i++) {
      const start = times[i] as number;
      const inWindow = times.filter((x) => x >= start && x < start + 1000).length;
      expect(inWindow).toBeLessThanOrEqual(rate + burst);
    }
  });

  test('tiny limits still let one through', () => {
    const b = Bucket.paced(0, 0, 0);
    expect(b.wait(0)).toBe(0);
  });
});
