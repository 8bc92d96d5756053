// A draining node (SIGTERM) sends its clients a `draining` frame before it closes them: the
// TypeScript SDK moves to the next region at once, resumes there, and the application sees
// every message once, in order.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { Client } from '../../dist/tern.js';
import { startCluster, until } from '../e2e/harness.mjs';

const WAIT = 20_000;

describe('the TypeScript SDK and a draining node', { timeout: 120_000 }, () => {
  let cluster;
  const clients = [];
  before(async () => {
    cluster = await startCluster();
  });
  after(async () => {
    await Promise.all(clients.map((c) => c.close()));
    await cluster?.stop();
  });

  test('clients move on at the draining frame and lose nothing', async () => {
    const [eu, us] = cluster.nodes;
    const sub = new Client({ url: [eu.ws, us.ws], clientId: 'watcher' });
    clients.push(sub);
    const changes = [];
    sub.on('state', (s) => changes.push(s));
    await sub.connect();
    const s = await sub.subscribe('chat:drain');
    const got = [];
    s.on('message', (m) => got.push(m.data));
    const pub = new Client({ url: us.ws });
    clients.push(pub);
    await pub.connect();
    const N = 150;
    for (let i = 1; i <= N; i++) {
      await pub.publish('chat:drain', `d${i}`);
      if (i === 50) {
        await until(() => got.length >= 20, WAIT, 'some on eu-west');
        void eu.stop('SIGTERM'); // drains: 3 s of `draining` before the 1001
      }
      if (i % 10 === 0) await new Promise((r) => setTimeout(r, 20));
    }
    await until(() => got.length >= N, WAIT, `all ${N}`);
    assert.deepEqual(
      got,
      Array.from({ length: N }, (_, i) => `d${i + 1}`),
    );
    const drop = changes.find((c) => c.state === 'disconnected');
    assert.ok(drop, JSON.stringify(changes));
    assert.match(drop.reason, /draining/, 'moved at the draining frame, not at the close');
    assert.equal(sub.connection.region, 'us-east');
  });
});
