// Acceptance tests of the TypeScript SDK and the demo chat in headless Chromium (Debian's,
// driven by playwright-core; no browser download) against real `tern edge` processes:
//   - two pages on two regions chat and see each other in the roster (the demo's screenshot
//     is taken here: TERN_SCREENSHOT=PATH writes it there, e.g. docs/demo.png);
//   - with WebSocket upgrades refused by a proxy the chat works over HTTP streaming (found
//     by the SDK itself) and over long polling;
//   - a page whose node is SIGKILLed fails over to the other region and ends with every
//     message once, in order;
//   - a token that expires mid-session is renewed through the callback without a lost
//     message and without a reconnect.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFile, rm } from 'node:fs/promises';
import http from 'node:http';
import { once } from 'node:events';
import path from 'node:path';
import { tmpdir } from 'node:os';
import { chromium } from 'playwright-core';
import { Client } from '../../dist/tern.js';
import {
  CHROMIUM_ARGS,
  CHROMIUM_BIN,
  REPO,
  jwt,
  startCluster,
  startTokenNode,
  startUpgradeRefusingProxy,
  until,
} from '../e2e/harness.mjs';

const WAIT = 20_000;
let browser;
let cluster;
const nodeClients = [];

/** A Node-side SDK client (the other end of a chat). */
async function nodeClient(options) {
  const c = new Client(options);
  nodeClients.push(c);
  await c.connect();
  return c;
}

/** The demo's state in `page`. */
const demo = (page, f, arg) => page.evaluate(f, arg);
const texts = (page, room) =>
  demo(page, (r) => window.ternDemo.messages.filter((m) => m.room === r).map((m) => m.text), room);

async function openDemo(url) {
  const page = await browser.newPage();
  page.on('pageerror', (e) => console.error('page error:', e));
  await page.goto(url);
  return page;
}

describe('the TypeScript SDK in Chromium', { timeout: 240_000 }, () => {
  before(async () => {
    browser = await chromium.launch({ executablePath: CHROMIUM_BIN, args: CHROMIUM_ARGS });
    cluster = await startCluster();
  });

  after(async () => {
    await Promise.all(nodeClients.map((c) => c.close()));
    await browser?.close();
    if (process.env.TERN_JS_VERBOSE) for (const n of cluster?.nodes ?? []) console.log(n.log.join(''));
    await cluster?.stop();
  });

  test('two pages on two regions chat and see each other in the roster', async () => {
    const [eu, us] = cluster.nodes;
    const alice = await openDemo(`${eu.http}/demo/?name=alice&room=lobby&url=${eu.ws}`);
    const bob = await openDemo(`${us.http}/demo/?name=bob&room=lobby&url=${us.ws}`);
    for (const page of [alice, bob]) {
      await until(() => demo(page, () => window.ternDemo.joined === 'lobby'), WAIT, 'joined the lobby');
      await until(
        () => demo(page, () => ['alice', 'bob'].every((n) => window.ternDemo.roster.includes(n))),
        WAIT,
        'both in the roster',
      );
    }
    assert.equal(await alice.textContent('#region'), 'eu-west');
    assert.equal(await bob.textContent('#region'), 'us-east');
    assert.equal(await alice.textContent('#state'), 'connected');
    await alice.fill('#text', 'hello from eu-west');
    await alice.press('#text', 'Enter');
    await until(async () => (await texts(bob, 'lobby')).includes('hello from eu-west'), WAIT, 'bob hears alice');
    await bob.fill('#text', 'hi from us-east');
    await bob.press('#text', 'Enter');
    await until(async () => (await texts(alice, 'lobby')).includes('hi from us-east'), WAIT, 'alice hears bob');
    assert.deepEqual(await texts(alice, 'lobby'), ['hello from eu-west', 'hi from us-east']);
    assert.deepEqual(await texts(bob, 'lobby'), ['hello from eu-west', 'hi from us-east']);
    // The roster shows each member's node; the message list each message's latency.
    assert.match(await alice.textContent('#roster'), /bob\s*us-east\/edge-1/);
    assert.match(await alice.textContent('#list'), /\d+ ms · from us-east\/edge-1/);
    const shot = process.env.TERN_SCREENSHOT || path.join(tmpdir(), 'tern-demo.png');
    await alice.screenshot({ path: path.resolve(REPO, shot) });
    await alice.close();
    await bob.close();
  });

  test('without a URL the demo ranks the regions the node lists and connects to one', async () => {
    const [eu, us] = cluster.nodes;
    const page = await openDemo(`${eu.http}/demo/?name=ines&room=nearest`);
    await until(() => demo(page, () => window.ternDemo.joined === 'nearest'), WAIT, 'joined');
    assert.ok(['eu-west', 'us-east'].includes(await page.textContent('#region')));
    const ranked = await page.evaluate(async () => {
      const { rank, regions } = await import('/demo/tern.min.js');
      return rank(await regions(location.origin));
    });
    assert.deepEqual(ranked.map((r) => r.region).sort(), ['eu-west', 'us-east']);
    assert.deepEqual(
      ranked.map((r) => r.url).sort(),
      [eu.ws, us.ws].sort(),
    );
    assert.ok(ranked.every((r) => Number.isFinite(r.rttMs)), JSON.stringify(ranked));
    await page.close();
  });

  test('with WebSocket upgrades refused by a proxy, the chat works over HTTP streaming and long polling', async () => {
    const [eu, us] = cluster.nodes;
    const proxy = await startUpgradeRefusingProxy(us.port);
    try {
      const base = `http://127.0.0.1:${proxy.port}`;
      const dave = await openDemo(`${base}/demo/?name=dave&room=fallback&url=${base}`);
      const erin = await openDemo(`${base}/demo/?name=erin&room=fallback&url=${base}&transport=poll`);
      for (const page of [dave, erin]) {
        await until(() => demo(page, () => window.ternDemo.joined === 'fallback'), WAIT, 'joined over HTTP');
      }
      assert.equal(await dave.textContent('#transport'), 'stream');
      assert.equal(await erin.textContent('#transport'), 'poll');
      assert.ok(proxy.refused() >= 1, 'the SDK tried a WebSocket first');
      const frank = await nodeClient({ url: eu.ws, clientId: 'frank' });
      const heard = [];
      (await frank.subscribe('chat:fallback')).on('message', (m) => heard.push(m.data));
      const ack = await frank.publish('chat:fallback', 'from frank on eu-west', { durability: 'replicated' });
      assert.equal(ack.origin, 'eu-west/edge-1');
      for (const page of [dave, erin]) {
        await until(async () => (await texts(page, 'fallback')).includes('from frank on eu-west'), WAIT, 'over HTTP');
      }
      await dave.fill('#text', 'from dave over streaming');
      await dave.press('#text', 'Enter');
      await erin.fill('#text', 'from erin over polling');
      await erin.press('#text', 'Enter');
      await until(() => heard.length === 3, WAIT, 'frank hears both');
      assert.deepEqual(heard.slice(1).sort(), ['from dave over streaming', 'from erin over polling']);
      await until(() => demo(dave, () => window.ternDemo.roster.includes('erin')), WAIT, 'erin in dave roster');
      await dave.close();
      await erin.close();
    } finally {
      await proxy.close();
    }
  });

  test("a page whose node is SIGKILLed fails over to the other region: every message once, in order", async () => {
    const [eu, us] = cluster.nodes;
    const page = await openDemo(`${eu.http}/demo/?name=gina&room=failover&url=${eu.ws},${us.ws}`);
    await until(() => demo(page, () => window.ternDemo.joined === 'failover'), WAIT, 'joined');
    assert.equal(await page.textContent('#region'), 'eu-west');
    const pub = await nodeClient({ url: us.ws, clientId: 'publisher' });
    const N = 200;
    for (let i = 1; i <= N; i++) {
      await pub.publish('chat:failover', `f${i}`);
      if (i === 80) {
        // Let the page have some on eu-west first.
        await until(async () => (await texts(page, 'failover')).length >= 40, WAIT, 'page has some');
        await eu.stop('SIGKILL');
      }
      if (i % 10 === 0) await new Promise((r) => setTimeout(r, 10));
    }
    await until(async () => (await texts(page, 'failover')).length >= N, 60_000, `page has all ${N}`);
    await pub.publish('chat:failover', 'end');
    await until(async () => (await texts(page, 'failover')).includes('end'), WAIT, 'end');
    assert.deepEqual(await texts(page, 'failover'), [...Array.from({ length: N }, (_, i) => `f${i + 1}`), 'end']);
    assert.equal(await page.textContent('#region'), 'us-east');
    // Its presence member was entered again on the new node.
    await until(() => demo(page, () => window.ternDemo.roster.includes('gina')), WAIT, 'gina re-entered');
    const states = await demo(page, () => window.ternDemo.states);
    assert.ok(states.includes('disconnected'), `states: ${states}`);
    await page.close();
  });

  test('a token that expires mid-session is renewed through the callback: no message lost, no reconnect', async () => {
    const secret = 'e2e-secret-that-is-at-least-32-bytes-long';
    const { node, dir } = await startTokenNode(secret);
    const bundle = await readFile(path.join(REPO, 'js', 'dist', 'tern.min.js'));
    // The app's server: a page, the SDK, and a token endpoint (tokens live 3 s).
    const minted = { count: 0 };
    const mint = (sub) => {
      minted.count++;
      const caps = { 'chat:*': ['subscribe', 'publish', 'presence', 'history'] };
      return jwt(secret, { sub, exp: Math.floor(Date.now() / 1000) + 3, capability: caps });
    };
    const app = http.createServer((req, res) => {
      if (req.url === '/tern.min.js') {
        res.writeHead(200, { 'content-type': 'text/javascript' }).end(bundle);
      } else if (req.url === '/token') {
        res.writeHead(200, { 'content-type': 'text/plain', 'cache-control': 'no-store' }).end(mint('page'));
      } else {
        res.writeHead(200, { 'content-type': 'text/html' }).end('<!doctype html><title>renewal</title>');
      }
    });
    app.listen(0, '127.0.0.1');
    await once(app, 'listening');
    const page = await browser.newPage();
    try {
      await page.goto(`http://127.0.0.1:${app.address().port}/`);
      await page.evaluate(async (url) => {
        const { Client } = await import('/tern.min.js');
        const r = (window.renewal = { texts: [], states: [], calls: 0, errors: [] });
        const client = new Client({
          url,
          authCallback: async () => {
            r.calls++;
            return (await fetch('/token', { cache: 'no-store' })).text();
          },
        });
        client.on('state', (s) => r.states.push(s.state));
        client.on('error', (e) => r.errors.push(e.message));
        await client.connect();
        const sub = await client.subscribe('chat:renew');
        sub.on('message', (m) => r.texts.push(m.data));
      }, node.ws);
      const pub = await nodeClient({ url: node.ws, authCallback: async () => mint('publisher') });
      const N = 160; // ~8 s at 50 ms: a few token lifetimes
      for (let i = 1; i <= N; i++) {
        await pub.publish('chat:renew', `t${i}`);
        await new Promise((r) => setTimeout(r, 50));
      }
      await until(() => page.evaluate((n) => window.renewal.texts.length >= n, N), WAIT, 'page has all');
      const r = await page.evaluate(() => window.renewal);
      assert.deepEqual(
        r.texts,
        Array.from({ length: N }, (_, i) => `t${i + 1}`),
      );
      assert.ok(r.calls >= 3, `the callback was called ${r.calls} times`);
      assert.deepEqual(r.states, ['connecting', 'connected'], 'renewed in band, never reconnected');
      assert.equal(pub.state, 'connected');
    } finally {
      await page.close();
      await new Promise((r) => app.close(r));
      await node.stop();
      await rm(dir, { recursive: true, force: true });
    }
  });
});
