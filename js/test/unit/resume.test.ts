import { describe, expect, test } from 'vitest';
import type { Message } from '../../src/codec.js';
import { Cursor, MAX_ORIGINS, RecentIds } from '../../src/resume.js';

const msg = (origin: string, epoch: string, seq: string, offset = seq, id = `${origin}-${epoch}-${seq}`): Message => ({
  channel: 'c',
  id,
  name: '',
  data: '',
  clientId: '',
  origin,
  originEpoch: epoch,
  originSeq: seq,
  position: { epoch: '7', offset },
  timestampMs: 0,
});

describe('resume bookkeeping', () => {
  test('nothing to resume before the first subscribed', () => {
    expect(new Cursor().resume()).toBeUndefined();
  });

  test('the vector starts at subscribed.origins and moves with each message', () => {
    const c = new Cursor();
    c.start('eu/e1', { epoch: '7', offset: '10' }, [{ origin: 'eu/e1', epoch: '100', seq: '10' }]);
    expect(c.resume()).toEqual({
      node: 'eu/e1',
      position: { epoch: '7', offset: '10' },
      origins: [{ origin: 'eu/e1', epoch: '100', seq: '10' }],
    });
    expect(c.advance('eu/e1', msg('eu/e1', '100', '11'))).toBe(true);
    expect(c.advance('eu/e1', msg('us/e1', '200', '1', '12'))).toBe(true);
    expect(c.resume()).toEqual({
      node: 'eu/e1',
      position: { epoch: '7', offset: '12' },
      origins: [
        { origin: 'eu/e1', epoch: '100', seq: '11' },
        { origin: 'us/e1', epoch: '200', seq: '1' },
      ],
    });
  });

  test('a repeat is what the vector covers: same epoch up to seq, and every older epoch', () => {
    const c = new Cursor();
    c.start('eu/e1', { epoch: '7', offset: '0' }, [{ origin: 'eu/e1', epoch: '100', seq: '5' }]);
    expect(c.advance('us/e1', msg('eu/e1', '100', '5'))).toBe(false);
    expect(c.advance('us/e1', msg('eu/e1', '100', '3'))).toBe(false);
    expect(c.advance('us/e1', msg('eu/e1', '99', '900'))).toBe(false); // an earlier epoch
    expect(c.advance('us/e1', msg('eu/e1', '101', '1'))).toBe(true); // a new epoch starts at 1
    expect(c.advance('us/e1', msg('eu/e1', '100', '6'))).toBe(false); // older epoch now
    // 64-bit values compare as numbers, not strings ("9" > "10" as text)
    c.start('eu/e1', { epoch: '7', offset: '0' }, [{ origin: 'o', epoch: '9', seq: '9' }]);
    expect(c.advance('x', msg('o', '10', '1'))).toBe(true);
    c.start('eu/e1', { epoch: '7', offset: '0' }, [{ origin: 'o', epoch: '18446744073709551614', seq: '1' }]);
    expect(c.advance('x', msg('o', '18446744073709551615', '1'))).toBe(true);
  });

  test('a dropped repeat moves neither the node nor the position', () => {
    const c = new Cursor();
    c.start('eu/e1', { epoch: '7', offset: '4' }, [{ origin: 'eu/e1', epoch: '1', seq: '4' }]);
    c.advance('us/e1', msg('eu/e1', '1', '2', '99'));
    expect(c.resume()?.node).toBe('eu/e1');
    expect(c.resume()?.position.offset).toBe('4');
  });

  test('a vector is cut to the newest MAX_ORIGINS epochs', () => {
    const c = new Cursor();
    const origins = Array.from({ length: MAX_ORIGINS + 10 }, (_, i) => ({
      origin: `r/n${i}`,
      epoch: String(1000 + i),
      seq: '1',
    }));
    c.start('r/n0', { epoch: '1', offset: '1' }, origins);
    const v = c.resume()?.origins ?? [];
    expect(v).toHaveLength(MAX_ORIGINS);
    expect(v.some((o) => o.origin === 'r/n0')).toBe(false);
    expect(v.some((o) => o.origin === `r/n${MAX_ORIGINS + 9}`)).toBe(true);
  });
});

describe('dedupe by message id', () => {
  test('an id seen within the window is a repeat; empty ids never are', () => {
    const r = new RecentIds(100, 1000);
    expect(r.insert('a', 0)).toBe(true);
    expect(r.insert('a', 999)).toBe(false);
    expect(r.insert('', 0)).toBe(true);
    expect(r.insert('', 0)).toBe(true);
    expect(r.insert('a', 1001)).toBe(true); // forgotten after the window
  });

  test('memory is bounded by count', () => {
    const r = new RecentIds(50, 1e12);
    for (let i = 0; i < 1000; i++) r.insert(`id-${i}`, i);
    expect(r.size).toBeLessThanOrEqual(50);
    expect(r.insert('id-999', 1000)).toBe(false); // the newest are kept
    expect(r.insert('id-0', 1000)).toBe(true);
  });
});
