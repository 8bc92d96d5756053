import { describe, expect, test } from 'vitest';
import {
  decode,
  DecodeError,
  encode,
  errorCode,
  fromBase64,
  message,
  member,
  payloadFields,
  presenceEvent,
  toBase64,
} from '../../src/codec.js';

describe('codec', () => {
  test('a publish encodes as the JSON mapping: one key, text or base64 binary', () => {
    const text = encode({ publish: { requestId: 3, channel: 'chat:a', ...payloadFields('héllo') } });
    expect(JSON.parse(text)).toEqual({ publish: { requestId: 3, channel: 'chat:a', text: 'héllo' } });
    const bin = encode({
      publish: { requestId: 4, channel: 'chat:a', ...payloadFields(new Uint8Array([0, 1, 2, 3])) },
    });
    expect(JSON.parse(bin)).toEqual({ publish: { requestId: 4, channel: 'chat:a', binary: 'AAECAw==' } });
  });

  test('base64 round-trips every byte value, beyond the chunk size too', () => {
    const bytes = new Uint8Array(70_000).map((_, i) => (i * 7) % 256);
    expect(fromBase64(toBase64(bytes))).toEqual(bytes);
    expect(fromBase64('AAEC-_8')).toEqual(new Uint8Array([0, 1, 2, 251, 255])); // URL-safe, unpadded
  });

  test('a deliver decodes with 64-bit fields as strings and defaults filled in', () => {
    const f = decode(
      '{"deliver":{"messages":[{"channel":"c","id":"x","binary":"AAE=","clientId":"a","origin":"eu/e1",' +
        '"originEpoch":"18446744073709551615","originSeq":"9007199254740993","position":{"offset":"5"},"timestampMs":"1795849177313"}]}}',
    );
    expect(f.type).toBe('deliver');
    const m = message((f.body['messages'] as unknown[])[0]);
    expect(m.originEpoch).toBe('18446744073709551615');
    expect(m.originSeq).toBe('9007199254740993'); // above 2^53: kept exact
    expect(m.position).toEqual({ epoch: '0', offset: '5' });
    expect(m.data).toEqual(new Uint8Array([0, 1]));
    expect(m.name).toBe('');
    expect(m.timestampMs).toBe(1795849177313);
  });

  test('frames that are not protocol frames are refused with a DecodeError', () => {
    for (const bad of ['nope', '[]', '{}', '{"a":{},"b":{}}', '{"deliver":3}', 'null']) {
      expect(() => decode(bad)).toThrow(DecodeError);
    }
  });

  test('an unknown error code reads as UNSPECIFIED, known ones as themselves', () => {
    expect(errorCode('ERROR_CODE_CHANNEL_FULL')).toBe('ERROR_CODE_CHANNEL_FULL');
    expect(errorCode('ERROR_CODE_FROM_THE_FUTURE')).toBe('ERROR_CODE_UNSPECIFIED');
    expect(errorCode(7)).toBe('ERROR_CODE_UNSPECIFIED');
  });

  test('presence members and events decode; an unknown action is skipped', () => {
    expect(member({ clientId: 'a', connectionId: '1', node: 'n', text: 'x' })).toEqual({
      clientId: 'a',
      connectionId: '1',
      node: 'n',
      data: 'x',
    });
    expect(member({ clientId: 'a' })).not.toHaveProperty('data');
    expect(presenceEvent({ action: 'PRESENCE_ACTION_LEAVE', member: { clientId: 'b' } })?.action).toBe('leave');
    expect(presenceEvent({ action: 'PRESENCE_ACTION_DANCE', member: {} })).toBeUndefined();
  });
});
