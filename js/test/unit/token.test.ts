import { describe, expect, test } from 'vitest';
import { renewDelay, tokenExpiryMs } from '../../src/token.js';

const jwt = (claims: object): string => {
  const b64url = (s: string) => btoa(s).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
  return `${b64url('{"alg":"HS256"}')}.${b64url(JSON.stringify(claims))}.sig`;
};

describe('token renewal', () => {
  test("a JWT's exp is read in milliseconds; anything else has none", () => {
    expect(tokenExpiryMs(jwt({ sub: 'alice', exp: 1_800_000_000 }))).toBe(1_800_000_000_000);
    expect(tokenExpiryMs(jwt({ sub: 'alice' }))).toBeUndefined();
    expect(tokenExpiryMs('not-a-jwt')).toBeUndefined();
    expect(tokenExpiryMs('a.%%%.c')).toBeUndefined();
  });

  test('renewal comes before expiry: 30 s early for long tokens, a third of the life for short ones', () => {
    expect(renewDelay(3_600_000, 0)).toBe(3_570_000);
    expect(renewDelay(6_000, 0)).toBe(4_000);
    expect(renewDelay(1_000, 1_000)).toBe(0); // expired: at once
    expect(renewDelay(0, 5_000)).toBe(0);
  });
});
