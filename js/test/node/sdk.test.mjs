// The TypeScript SDK (its built ES module, dist/tern.js) in Node against a real `tern edge`:
// the protocol suite's happy paths (docs/protocol.md) — connect, subscribe, publish and ack,
// idempotent retry, rewind, history pages, presence, errors, unsubscribe — and a network
// drop resumed on the same node with every message once, in order.
//
// Node 20 needs --experimental-websocket (scripts/test-js.sh passes it); Node 22+ has a
// global WebSocket.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { rm } from 'node:fs/promises';
import { Client, TernError } from '../../dist/tern.js';
import { jwt, startCutter, startDevNode, startTokenNode, until } from '../e2e/harness.mjs';

const WAIT = 15_000;
let node;
let dir;
const clients = [];

/** A connected client; closed after the suite. */
async function connect(options) {
  const c = new Client({ url: node.ws, ...options });
  clients.push(c);
  await c.connect();
  return c;
}

/** Collects a subscription's messages as texts. */
function collect(sub) {
  const got = [];
  sub.on('message', (m) => got.push(typeof m.data === 'string' ? m.data : m.data));
  return got;
}

describe('the TypeScript SDK in Node', { timeout: 120_000 }, () => {
  before(async () => {
    ({ node, dir } = await startDevNode());
  });

  after(async () => {
    await Promise.all(clients.map((c) => c.close()));
    await node?.stop();
    if (dir) await rm(dir, { recursive: true, force: true });
    if (process.env.TERN_JS_VERBOSE) console.log(node.log.join(''));
  });

  test('connect: states connecting then connected, and what connected says', async () => {
    const c = new Client({ url: node.ws, clientId: 'alice' });
    clients.push(c);
    const states = [];
    c.on('state', (s) => states.push(s.state));
    await c.connect();
    assert.deepEqual(states, ['connecting', 'connected']);
    assert.equal(c.connection.clientId, 'alice');
    assert.equal(c.connection.node, 'local/edge-1');
    assert.equal(c.connection.region, 'local');
    assert.equal(c.connection.transport, 'websocket');
    assert.ok(c.connection.heartbeatIntervalMs > 0);
  });

  test('publish and subscribe: text, binary and names arrive in order; acks identify each message', async () => {
    const a = await connect({ clientId: 'sub' });
    const b = await connect({ clientId: 'pub' });
    const sub = await a.subscribe('plain:room-1');
    const got = [];
    sub.on('message', (m) => got.push(m));
    const ack1 = await b.publish('plain:room-1', 'hello', { name: 'greeting' });
    const ack2 = await b.publish('plain:room-1', new Uint8Array([0, 1, 255]));
    assert.equal(ack1.origin, 'local/edge-1');
    assert.equal(BigInt(ack2.originSeq), BigInt(ack1.originSeq) + 1n);
    assert.equal(ack1.duplicate, false);
    await until(() => got.length === 2, WAIT, 'two deliveries');
    assert.equal(got[0].data, 'hello');
    assert.equal(got[0].name, 'greeting');
    assert.equal(got[0].clientId, 'pub');
    assert.equal(got[0].id, ack1.messageId);
    assert.deepEqual([...got[1].data], [0, 1, 255]);
  });

  test('a publish retried with its id is acknowledged as a duplicate and delivered once', async () => {
    const a = await connect();
    const sub = await a.subscribe('plain:idem');
    const got = collect(sub);
    const first = await a.publish('plain:idem', 'once', { id: 'order-17' });
    const again = await a.publish('plain:idem', 'once', { id: 'order-17' });
    assert.equal(again.duplicate, true);
    assert.equal(again.originSeq, first.originSeq);
    await a.publish('plain:idem', 'marker');
    await until(() => got.includes('marker'), WAIT, 'marker');
    assert.deepEqual(got, ['once', 'marker']);
  });

  test('rewind starts with the last N messages, then the live stream, with no gap or repeat', async () => {
    const a = await connect();
    for (let i = 1; i <= 5; i++) await a.publish('chat:rewind', `r${i}`);
    const b = await connect();
    const sub = await b.subscribe('chat:rewind', { rewind: { count: 3 } });
    const got = collect(sub);
    await a.publish('chat:rewind', 'r6');
    await until(() => got.length === 4, WAIT, 'rewind and live');
    assert.deepEqual(got, ['r3', 'r4', 'r5', 'r6']);
  });

  test('history: pages newest first, next() follows them to the end; forwards too', async () => {
    const a = await connect();
    for (let i = 1; i <= 25; i++) await a.publish('chat:hist', `h${i}`);
    const texts = [];
    let page = await a.history('chat:hist', { limit: 10 });
    const sizes = [];
    while (page) {
      sizes.push(page.messages.length);
      texts.push(...page.messages.map((m) => m.data));
      page = await page.next();
    }
    assert.deepEqual(sizes, [10, 10, 5]);
    assert.deepEqual(texts, Array.from({ length: 25 }, (_, i) => `h${25 - i}`));
    const fwd = await a.history('chat:hist', { limit: 3, forwards: true });
    assert.deepEqual(
      fwd.messages.map((m) => m.data),
      ['h1', 'h2', 'h3'],
    );
  });

  test('presence: enter with data, the roster and events of a presence subscription, get, leave', async () => {
    const alice = await connect({ clientId: 'alice' });
    const bob = await connect({ clientId: 'bob' });
    await alice.presence.enter('chat:lobby', '{"name":"Alice"}');
    const watch = await bob.subscribe('chat:lobby', { presence: true });
    const events = [];
    watch.on('presence', (e) => events.push(`${e.action}:${e.member.clientId}`));
    await until(() => watch.members().some((m) => m.clientId === 'alice'), WAIT, 'alice in the snapshot');
    assert.equal(watch.members().find((m) => m.clientId === 'alice').data, '{"name":"Alice"}');
    const carol = await connect({ clientId: 'carol' });
    await carol.presence.enter('chat:lobby');
    await until(() => events.includes('enter:carol'), WAIT, 'carol enters');
    const members = await bob.presence.get('chat:lobby');
    assert.deepEqual(members.map((m) => m.clientId).sort(), ['alice', 'carol']);
    await alice.presence.leave('chat:lobby');
    await until(() => events.includes('leave:alice'), WAIT, 'alice leaves');
    assert.deepEqual(
      watch.members().map((m) => m.clientId),
      ['carol'],
    );
  });

  test('refusals come as TernError with the protocol code; the connection stays usable', async () => {
    const a = await connect();
    await assert.rejects(a.publish('bad channel', 'x'), (e) => e instanceof TernError && e.code === 'ERROR_CODE_INVALID_CHANNEL');
    await assert.rejects(a.subscribe('no spaces'), (e) => e instanceof TernError && e.code === 'ERROR_CODE_INVALID_CHANNEL');
    await assert.rejects(a.history('plain:nohistory'), (e) => e.code === 'ERROR_CODE_UNSUPPORTED');
    assert.equal((await a.publish('plain:ok', 'fine')).duplicate, false);
  });

  test('unsubscribe: nothing of the channel is delivered afterwards', async () => {
    const a = await connect();
    const sub = await a.subscribe('plain:unsub');
    const got = collect(sub);
    await a.publish('plain:unsub', 'before');
    await until(() => got.length === 1, WAIT, 'before');
    await sub.unsubscribe();
    await a.publish('plain:unsub', 'after');
    const probe = await a.subscribe('plain:probe');
    const seen = collect(probe);
    await a.publish('plain:probe', 'marker');
    await until(() => seen.length === 1, WAIT, 'marker');
    assert.deepEqual(got, ['before']);
  });

  test('a network drop: the client reconnects and resumes, every message once, in order', async () => {
    const cutter = await startCutter(node.port);
    try {
      const sub1 = new Client({ url: `ws://127.0.0.1:${cutter.port}`, backoff: { baseMs: 50, capMs: 500 } });
      clients.push(sub1);
      const states = [];
      sub1.on('state', (s) => states.push(s.state));
      await sub1.connect();
      const sub = await sub1.subscribe('chat:drop');
      const got = collect(sub);
      const pub = await connect();
      const N = 300;
      for (let i = 1; i <= N; i++) {
        await pub.publish('chat:drop', `d${i}`);
        if (i === 100 || i === 200) cutter.cut();
      }
      await until(() => got.length >= N, 30_000, `all ${N} messages (have ${got.length})`);
      await pub.publish('chat:drop', 'end');
      await until(() => got.includes('end'), WAIT, 'end');
      assert.deepEqual(got, [...Array.from({ length: N }, (_, i) => `d${i + 1}`), 'end']);
      assert.ok(states.includes('disconnected'), `states: ${states}`);
      assert.equal(sub1.state, 'connected');
    } finally {
      await cutter.close();
    }
  });

  test('what cannot be replayed is a discontinuity event, and delivery goes on after it', async () => {
    const cutter = await startCutter(node.port);
    try {
      const c = new Client({ url: `ws://127.0.0.1:${cutter.port}`, backoff: { baseMs: 50, capMs: 200 } });
      clients.push(c);
      await c.connect();
      const sub = await c.subscribe('plain:gap'); // no history: nothing to replay from
      const got = collect(sub);
      const gaps = [];
      sub.on('discontinuity', (d) => gaps.push(d));
      const pub = await connect();
      await pub.publish('plain:gap', 'before');
      await until(() => got.length === 1, WAIT, 'before');
      cutter.hold(true);
      cutter.cut();
      await until(() => c.state !== 'connected', WAIT, 'the drop noticed');
      for (let i = 1; i <= 3; i++) await pub.publish('plain:gap', `missed ${i}`);
      cutter.hold(false);
      await until(() => gaps.length === 1 && c.state === 'connected', WAIT, 'a discontinuity after the reconnect');
      assert.match(gaps[0].reason, /./);
      await pub.publish('plain:gap', 'after');
      await until(() => got.includes('after'), WAIT, 'after');
      assert.deepEqual(got, ['before', 'after']);
    } finally {
      await cutter.close();
    }
  });

  test('a link that goes silent without closing is detected by the idle timeout, then resumed', async () => {
    const cutter = await startCutter(node.port);
    try {
      const c = new Client({ url: `ws://127.0.0.1:${cutter.port}`, backoff: { baseMs: 50, capMs: 200 } });
      clients.push(c);
      const changes = [];
      c.on('state', (s) => changes.push(s));
      await c.connect();
      const idle = c.connection.idleTimeoutMs;
      const sub = await c.subscribe('chat:silent');
      const got = collect(sub);
      const pub = await connect();
      await pub.publish('chat:silent', 's1');
      await until(() => got.length === 1, WAIT, 's1');
      cutter.stall(); // no close, no reset: only the client's own idle check can tell
      await pub.publish('chat:silent', 's2');
      await until(() => changes.some((x) => x.state === 'disconnected'), idle + WAIT, 'the idle link dropped');
      const drop = changes.find((x) => x.state === 'disconnected');
      assert.equal(drop.code, 4000, JSON.stringify(drop));
      await until(() => c.state === 'connected' && got.length === 2, WAIT, 'resumed');
      await pub.publish('chat:silent', 's3');
      await until(() => got.length === 3, WAIT, 's3');
      assert.deepEqual(got, ['s1', 's2', 's3']);
    } finally {
      await cutter.close();
    }
  });

  test("a burst of publishes beyond the node's frame burst is paced, not cut off (4004)", async () => {
    const a = await connect();
    const { frameBurst, frameRate } = a.connection.limits;
    const n = frameBurst + frameRate; // more than the node lets through in the first second
    const states = [];
    a.on('state', (x) => states.push(x.state));
    const sub = await a.subscribe('plain:burst');
    const got = collect(sub);
    const acks = await Promise.all(Array.from({ length: n }, (_, i) => a.publish('plain:burst', `b${i}`)));
    assert.equal(acks.length, n);
    await until(() => got.length === n, WAIT, `all ${n} delivered`);
    assert.deepEqual(
      got,
      Array.from({ length: n }, (_, i) => `b${i}`),
    );
    assert.deepEqual(states, [], 'never dropped');
  });

  test('a payload over the limit is refused before it is sent, with its id', async () => {
    const a = await connect();
    const big = 'x'.repeat(a.connection.limits.maxMessageBytes + 1);
    await assert.rejects(
      a.publish('plain:big', big, { id: 'big-1' }),
      (e) => e.code === 'ERROR_CODE_MESSAGE_TOO_LARGE' && e.messageId === 'big-1',
    );
    assert.equal(a.state, 'connected');
  });

  test('a replicated publish on a node without a backbone is refused as unsupported', async () => {
    const a = await connect();
    await assert.rejects(
      a.publish('plain:r', 'x', { durability: 'replicated' }),
      (e) => e.code === 'ERROR_CODE_UNSUPPORTED',
    );
  });

  test('a subscribe overtaken by its unsubscribe is settled, and subscribing again starts afresh', async () => {
    const a = await connect();
    const first = a.subscribe('plain:race'); // not awaited: the unsubscribe overtakes it
    const gone = a.unsubscribe('plain:race');
    await assert.rejects(first, (e) => e.code === 'unsubscribed');
    await gone;
    await a.publish('plain:race', 'while away');
    const sub = await a.subscribe('plain:race');
    const got = collect(sub);
    await a.publish('plain:race', 'after');
    await until(() => got.includes('after'), WAIT, 'after');
    assert.deepEqual(got, ['after']);
  });

  test('close: the client ends, and later requests are refused at once', async () => {
    const a = await connect();
    await a.close();
    assert.equal(a.state, 'closed');
    await assert.rejects(a.publish('plain:x', 'y'), (e) => e.code === 'closed');
  });
});

describe('the TypeScript SDK in Node, token mode', { timeout: 60_000 }, () => {
  const secret = 'node-sdk-test-secret-of-at-least-32-bytes';
  let tnode;
  let tdir;
  const tclients = [];
  before(async () => {
    ({ node: tnode, dir: tdir } = await startTokenNode(secret));
  });
  after(async () => {
    await Promise.all(tclients.map((c) => c.close()));
    await tnode?.stop();
    if (tdir) await rm(tdir, { recursive: true, force: true });
  });

  test('a refused presence upgrade rejects, and the subscription keeps its messages', async () => {
    const exp = Math.floor(Date.now() / 1000) + 600;
    const token = jwt(secret, { sub: 'dana', exp, capability: { 'chat:*': ['subscribe', 'publish'] } });
    const c = new Client({ url: tnode.ws, token });
    tclients.push(c);
    await c.connect();
    const sub = await c.subscribe('chat:upgrade');
    const got = collect(sub);
    await assert.rejects(
      c.subscribe('chat:upgrade', { presence: true }),
      (e) => e.code === 'ERROR_CODE_FORBIDDEN',
    );
    await c.publish('chat:upgrade', 'still here');
    await until(() => got.includes('still here'), WAIT, 'messages after the refusal');
    assert.deepEqual(got, ['still here']);
  });
});
