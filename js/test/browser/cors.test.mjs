// Acceptance test: a real browser (headless Chromium from Debian, driven by playwright-core)
// on another origin publishes over HTTP and reads history when its origin is allowed, and is
// refused — by the browser's CORS check and by the node itself — when it is not
// (docs/protocol.md, "Browser origins (CORS)", "HTTP publish", "History").
//
// Needs: the `tern` binary (TERN_BIN, else $CARGO_TARGET_DIR/debug/tern, else
// <repo>/target/debug/tern; `cargo build` or `cargo test --workspace` makes it) and
// Chromium (CHROMIUM_BIN, else /usr/bin/chromium). scripts/test-js.sh installs the rest.
//
// Everything listens on 127.0.0.1 on ports the kernel picks: the node (its config asks for
// port 0 and the test reads the address it prints), page server A (allowed origin) and page
// server B (another port, so another origin, not allowed).

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import http from 'node:http';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { randomUUID } from 'node:crypto';
import { chromium } from 'playwright-core';
import { CHROMIUM_ARGS, CHROMIUM_BIN, TERN_BIN, sleep, withTimeout } from '../e2e/harness.mjs';


const HISTORY_NAMESPACE = 'corslog';
const CHANNEL = `${HISTORY_NAMESPACE}:browser-${randomUUID().slice(0, 8)}`;
const MESSAGES_PATH = `/v1/channels/${encodeURIComponent(CHANNEL)}/messages`;

// Bounds on every wait.
const START_TIMEOUT_MS = 20_000;
const REQUEST_TIMEOUT_MS = 10_000;
const BROWSER_TIMEOUT_MS = 30_000;
const TEST_TIMEOUT_MS = 60_000;

/**
 * One HTTP request from Node with exactly the headers given (node:http adds no Origin).
 * Resolves to { status, headers, body } (body as a string).
 */
function request(port, { method = 'GET', path: p, headers = {}, body }) {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host: '127.0.0.1', port, method, path: p, headers, timeout: REQUEST_TIMEOUT_MS },
      (res) => {
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () =>
          resolve({
            status: res.statusCode,
            headers: res.headers,
            body: Buffer.concat(chunks).toString('utf8'),
          }),
        );
        res.on('error', reject);
      },
    );
    req.on('timeout', () => req.destroy(new Error(`${method} ${p}: no answer in ${REQUEST_TIMEOUT_MS} ms`)));
    req.on('error', reject);
    req.end(body);
  });
}

/** A static server on 127.0.0.1 (kernel-chosen port) serving one HTML page at `/`. */
async function startPageServer(title) {
  const html = `<!doctype html><html><head><meta charset="utf-8"><title>${title}</title></head>` +
    `<body><h1>${title}</h1></body></html>`;
  const server = http.createServer((req, res) => {
    if (req.method === 'GET' && (req.url === '/' || req.url === '/index.html')) {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
      res.end(html);
    } else {
      res.writeHead(404, { 'content-type': 'text/plain' });
      res.end('not found');
    }
  });
  server.listen(0, '127.0.0.1');
  await withTimeout(once(server, 'listening'), START_TIMEOUT_MS, `page server ${title} listening`);
  const { port } = server.address();
  return { server, port, origin: `http://127.0.0.1:${port}`, url: `http://127.0.0.1:${port}/` };
}

async function stopPageServer(s) {
  if (!s) return;
  s.server.closeAllConnections?.();
  await withTimeout(new Promise((resolve) => s.server.close(() => resolve())), 5_000, 'page server close').catch(
    () => {},
  );
}

/** Starts `tern edge --config FILE`, resolves once it printed its address and /readyz is 200. */
async function startNode(configPath, log) {
  const child = spawn(TERN_BIN, ['edge', '--config', configPath], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, NO_COLOR: '1', RUST_LOG: process.env.RUST_LOG || 'info' },
  });
  let exited = null;
  const exitedPromise = new Promise((resolve) => child.once('exit', (code, signal) => {
    exited = { code, signal };
    resolve(exited);
  }));
  const port = await withTimeout(
    new Promise((resolve, reject) => {
      const onData = (stream) => (chunk) => {
        const text = chunk.toString('utf8');
        log.push(`[${stream}] ${text}`);
        const m = /listening on 127\.0\.0\.1:(\d+)/.exec(log.join(''));
        if (m) resolve(Number(m[1]));
      };
      child.stdout.on('data', onData('stdout'));
      child.stderr.on('data', onData('stderr'));
      child.once('error', reject);
      exitedPromise.then((e) => reject(new Error(`tern edge exited before listening: ${JSON.stringify(e)}`)));
    }),
    START_TIMEOUT_MS,
    'tern edge printing its listen address',
  );
  const deadline = Date.now() + START_TIMEOUT_MS;
  for (;;) {
    if (exited) throw new Error(`tern edge exited: ${JSON.stringify(exited)}`);
    const r = await request(port, { path: '/readyz' }).catch((e) => ({ status: 0, body: String(e) }));
    if (r.status === 200) break;
    if (Date.now() > deadline) throw new Error(`tern edge not ready in ${START_TIMEOUT_MS} ms: ${r.status} ${r.body}`);
    await sleep(100);
  }
  return { child, port, exitedPromise, isExited: () => exited !== null };
}

async function stopNode(node) {
  if (!node || node.isExited()) return;
  node.child.kill('SIGTERM');
  try {
    await withTimeout(node.exitedPromise, 12_000, 'tern edge exit after SIGTERM');
  } catch {
    node.child.kill('SIGKILL');
    await withTimeout(node.exitedPromise, 5_000, 'tern edge exit after SIGKILL').catch(() => {});
  }
}

/** Reads the channel's history from Node (no Origin header): the messages, oldest first. */
async function readHistoryFromNode(port) {
  const r = await request(port, { path: `${MESSAGES_PATH}?direction=forwards&limit=1000` });
  assert.equal(r.status, 200, `history read without Origin: ${r.status} ${r.body}`);
  return JSON.parse(r.body).messages;
}

/**
 * Records the page's requests through the DevTools protocol, preflights included (Playwright's
 * own request events do not show them): [{ method, url, status, error, corsError }] — status
 * once an answer reached the page, error and corsError when the browser failed the request.
 */
async function recordNetwork(page) {
  const cdp = await page.context().newCDPSession(page);
  const requests = [];
  const byId = new Map(); // requestId -> the latest request with it
  cdp.on('Network.requestWillBeSent', (e) => {
    const r = { id: e.requestId, method: e.request.method, url: e.request.url, status: null, error: null, corsError: null };
    requests.push(r);
    byId.set(e.requestId, r);
  });
  cdp.on('Network.responseReceived', (e) => {
    const r = byId.get(e.requestId);
    if (r) r.status = e.response.status;
  });
  cdp.on('Network.loadingFailed', (e) => {
    const r = byId.get(e.requestId);
    if (r) {
      r.error = e.errorText;
      r.corsError = e.corsErrorStatus?.corsError ?? null;
    }
  });
  await cdp.send('Network.enable');
  return () => requests.map((r) => ({ ...r }));
}

/** Polls `get()` until `done(value)` or `ms` passed; returns the last value either way. */
async function settle(get, done, ms = 5_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = get();
    if (done(v) || Date.now() > deadline) return v;
    await sleep(50);
  }
}

/** Runs `fn(arg)` in the page, bounded (fetches inside also carry their own timeout). */
function inPage(page, fn, arg, what) {
  return withTimeout(page.evaluate(fn, arg), BROWSER_TIMEOUT_MS, what);
}

describe('browser on another origin (headless Chromium): CORS on the HTTP API', { timeout: 4 * TEST_TIMEOUT_MS }, () => {
  const nodeLog = [];
  let failed = false;
  let tmp, pageA, pageB, node, browser, context;
  let nodeUrl;

  /** Wraps a test body so that a failure prints the node's output in after(). */
  const it = (name, fn) =>
    test(name, { timeout: TEST_TIMEOUT_MS }, async (t) => {
      try {
        await fn(t);
      } catch (e) {
        failed = true;
        throw e;
      }
    });

  before(async () => {
    try {
      assert.ok(existsSync(TERN_BIN), `tern binary not found at ${TERN_BIN}: build it (cargo build) or set TERN_BIN`);
      assert.ok(existsSync(CHROMIUM_BIN), `Chromium not found at ${CHROMIUM_BIN}: apt-get install chromium (scripts/test-js.sh does)`);
      tmp = await mkdtemp(path.join(tmpdir(), 'tern-cors-'));
      pageA = await startPageServer('origin A (allowed)');
      pageB = await startPageServer('origin B (not allowed)');
      const configPath = path.join(tmp, 'edge.toml');
      // Dev auth (the default): anonymous HTTP publish and history reads are allowed, so the
      // only thing that decides here is the origin.
      await writeFile(
        configPath,
        [
          '[node]',
          'region = "local"',
          'name = "cors-test"',
          '',
          '[listen]',
          'client = "127.0.0.1:0"',
          '',
          '[auth]',
          'mode = "dev"',
          '',
          '[cors]',
          `allowed_origins = [${JSON.stringify(pageA.origin)}]`,
          '',
          '[history]',
          `data_dir = ${JSON.stringify(path.join(tmp, 'data'))}`,
          '',
          '[[history.namespaces]]',
          `name = "${HISTORY_NAMESPACE}"`,
          '',
        ].join('\n'),
      );
      node = await startNode(configPath, nodeLog);
      nodeUrl = `http://127.0.0.1:${node.port}`;
      browser = await chromium.launch({
        executablePath: CHROMIUM_BIN,
        headless: true,
        args: CHROMIUM_ARGS,
        timeout: BROWSER_TIMEOUT_MS,
      });
      context = await browser.newContext();
      context.setDefaultTimeout(BROWSER_TIMEOUT_MS);
    } catch (e) {
      failed = true;
      throw e;
    }
  });

  after(async () => {
    if (context) await withTimeout(context.close(), 10_000, 'browser context close').catch(() => {});
    if (browser) await withTimeout(browser.close(), 10_000, 'browser close').catch(() => {});
    await stopNode(node);
    await stopPageServer(pageA);
    await stopPageServer(pageB);
    if (failed) {
      console.error(`---- tern edge output (${TERN_BIN}) ----\n${nodeLog.join('')}---- end of tern edge output ----`);
    }
    if (tmp) await rm(tmp, { recursive: true, force: true }).catch(() => {});
  });

  it('preflight from the allowed origin is answered with its CORS headers', async () => {
    const r = await request(node.port, {
      method: 'OPTIONS',
      path: MESSAGES_PATH,
      headers: {
        origin: pageA.origin,
        'access-control-request-method': 'POST',
        'access-control-request-headers': 'content-type',
      },
    });
    assert.ok(r.status >= 200 && r.status < 300, `preflight status ${r.status}: ${r.body}`);
    assert.equal(r.headers['access-control-allow-origin'], pageA.origin);
    assert.match(r.headers['vary'] ?? '', /\borigin\b/i, 'Vary: Origin');
    assert.match(r.headers['access-control-allow-methods'] ?? '', /\bPOST\b/);
    assert.match(r.headers['access-control-allow-headers'] ?? '', /\bcontent-type\b/i);
    assert.ok(r.headers['access-control-max-age'], 'Access-Control-Max-Age');
    assert.equal(r.headers['access-control-allow-credentials'], undefined, 'no Access-Control-Allow-Credentials');
  });

  it('requests and preflights from another origin get 403 ERROR_CODE_FORBIDDEN without CORS headers', async () => {
    const post = await request(node.port, {
      method: 'POST',
      path: MESSAGES_PATH,
      headers: { origin: pageB.origin, 'content-type': 'application/json' },
      body: JSON.stringify({ id: `node-as-b-${randomUUID()}`, text: 'from node posing as origin B' }),
    });
    assert.equal(post.status, 403, post.body);
    assert.equal(JSON.parse(post.body).code, 'ERROR_CODE_FORBIDDEN');
    assert.equal(post.headers['access-control-allow-origin'], undefined, 'no Access-Control-Allow-Origin');

    const preflight = await request(node.port, {
      method: 'OPTIONS',
      path: MESSAGES_PATH,
      headers: {
        origin: pageB.origin,
        'access-control-request-method': 'POST',
        'access-control-request-headers': 'content-type',
      },
    });
    assert.equal(preflight.status, 403, preflight.body);
    assert.equal(preflight.headers['access-control-allow-origin'], undefined, 'no Access-Control-Allow-Origin');
    assert.equal(preflight.headers['access-control-allow-methods'], undefined, 'no Access-Control-Allow-Methods');

    const history = await request(node.port, { path: MESSAGES_PATH, headers: { origin: pageB.origin } });
    assert.equal(history.status, 403, history.body);
    assert.equal(history.headers['access-control-allow-origin'], undefined);

    const messages = await readHistoryFromNode(node.port);
    assert.ok(
      !messages.some((m) => m.text === 'from node posing as origin B'),
      `a refused request was published: ${JSON.stringify(messages)}`,
    );
  });

  it('a page on the allowed origin publishes over HTTP (preflighted JSON) and reads history', async () => {
    const page = await context.newPage();
    try {
      const network = await recordNetwork(page);
      await page.goto(pageA.url, { timeout: BROWSER_TIMEOUT_MS });
      assert.equal(await page.evaluate(() => location.origin), pageA.origin);
      const id = `page-a-${randomUUID()}`;
      const text = `hello from ${pageA.origin}`;
      const result = await inPage(
        page,
        async ({ nodeUrl, path, id, text }) => {
          const signal = AbortSignal.timeout(10_000);
          const pub = await fetch(nodeUrl + path, {
            method: 'POST',
            headers: { 'Content-Type': 'application/json' }, // not a simple request: preflighted
            body: JSON.stringify({ id, text }),
            signal,
          });
          const pubBody = await pub.json();
          const hist = await fetch(`${nodeUrl}${path}?direction=forwards&limit=100`, { signal });
          return {
            pubStatus: pub.status,
            pubType: pub.type,
            pubBody,
            histStatus: hist.status,
            histBody: await hist.json(),
          };
        },
        { nodeUrl, path: MESSAGES_PATH, id, text },
        'page A: publish + history fetch',
      );
      assert.equal(result.pubType, 'cors');
      assert.equal(result.pubStatus, 201, JSON.stringify(result.pubBody));
      assert.equal(result.pubBody.channel, CHANNEL);
      assert.ok(result.pubBody.messageId, `ack without messageId: ${JSON.stringify(result.pubBody)}`);
      assert.equal(result.histStatus, 200, JSON.stringify(result.histBody));
      assert.equal(result.histBody.channel, CHANNEL);
      const mine = result.histBody.messages.filter((m) => m.id === id);
      assert.equal(mine.length, 1, `history read by the page: ${JSON.stringify(result.histBody)}`);
      assert.equal(mine[0].text, text);

      // The browser did send a preflight for the JSON POST, and the node let it through.
      // (DevTools events may trail the page's own result a little: wait for them, bounded.)
      const toNode = await settle(
        () => network().filter((r) => r.url.startsWith(nodeUrl + MESSAGES_PATH)),
        (rs) => rs.some((r) => r.method === 'OPTIONS' && r.status !== null),
      );
      const preflights = toNode.filter((r) => r.method === 'OPTIONS');
      assert.equal(preflights.length, 1, `one preflight expected: ${JSON.stringify(toNode)}`);
      assert.ok(preflights[0].status >= 200 && preflights[0].status < 300, `preflight: ${JSON.stringify(preflights[0])}`);
      const posts = toNode.filter((r) => r.method === 'POST');
      assert.deepEqual(posts.map((r) => r.status), [201], JSON.stringify(toNode));

      // And the node agrees, read without any Origin.
      const fromNode = await readHistoryFromNode(node.port);
      assert.equal(fromNode.filter((m) => m.id === id && m.text === text).length, 1);
    } finally {
      await page.close().catch(() => {});
    }
  });

  it('a page on another origin is refused by the browser and the node publishes nothing', async () => {
    const page = await context.newPage();
    const marker = `page-b-${randomUUID()}`;
    try {
      const network = await recordNetwork(page);
      await page.goto(pageB.url, { timeout: BROWSER_TIMEOUT_MS });
      assert.equal(await page.evaluate(() => location.origin), pageB.origin);
      const result = await inPage(
        page,
        async ({ nodeUrl, path, marker }) => {
          const attempt = async (what, url, init) => {
            try {
              const r = await fetch(url, { ...init, signal: AbortSignal.timeout(10_000) });
              return { what, ok: true, type: r.type, status: r.status };
            } catch (e) {
              return { what, ok: false, name: e.name, message: String(e.message) };
            }
          };
          return [
            // Preflighted: the node refuses the preflight, so the POST is never sent.
            await attempt('json', nodeUrl + path, {
              method: 'POST',
              headers: { 'Content-Type': 'application/json' },
              body: JSON.stringify({ id: `${marker}-json`, text: `${marker} json` }),
            }),
            // Simple request (no preflight): it reaches the node, which must refuse it.
            await attempt('text-cors', nodeUrl + path, {
              method: 'POST',
              headers: { 'Content-Type': 'text/plain' },
              body: `${marker} text-cors`,
            }),
            // no-cors: the page cannot read the answer but the request is sent all the same.
            await attempt('text-no-cors', nodeUrl + path, {
              method: 'POST',
              mode: 'no-cors',
              headers: { 'Content-Type': 'text/plain' },
              body: `${marker} text-no-cors`,
            }),
            // Reading history cross-origin is refused too.
            await attempt('history', `${nodeUrl}${path}?limit=100`, {}),
          ];
        },
        { nodeUrl, path: MESSAGES_PATH, marker },
        'page B: refused publishes + history fetch',
      );
      const byWhat = Object.fromEntries(result.map((r) => [r.what, r]));
      for (const what of ['json', 'text-cors', 'history']) {
        assert.equal(byWhat[what].ok, false, `${what} from origin B should fail in the browser: ${JSON.stringify(byWhat[what])}`);
        assert.equal(byWhat[what].name, 'TypeError', `${what}: ${JSON.stringify(byWhat[what])}`);
      }
      // An opaque answer: sent, but the page learns nothing (status 0).
      assert.deepEqual(
        { ok: byWhat['text-no-cors'].ok, type: byWhat['text-no-cors'].type, status: byWhat['text-no-cors'].status },
        { ok: true, type: 'opaque', status: 0 },
      );

      // What the browser did (DevTools, bounded wait for its events): it sent the JSON POST's
      // preflight, which the node answered 403, so the POST itself was never sent; it sent
      // both text/plain POSTs (no preflight), which the node answered 403 without CORS headers.
      const toNode = await settle(
        () => network().filter((r) => r.url.startsWith(nodeUrl + MESSAGES_PATH)),
        (rs) =>
          rs.some((r) => r.method === 'OPTIONS' && r.status !== null) &&
          rs.filter((r) => r.method === 'POST' && (r.status !== null || r.corsError !== null)).length === 3,
      );
      const seen = JSON.stringify(toNode);
      const preflights = toNode.filter((r) => r.method === 'OPTIONS');
      assert.equal(preflights.length, 1, `one preflight expected: ${seen}`);
      assert.equal(preflights[0].status, 403, `preflight: ${seen}`);
      const posts = toNode.filter((r) => r.method === 'POST');
      assert.equal(posts.length, 3, seen);
      assert.equal(posts.filter((r) => /^Preflight/.test(r.corsError ?? '')).length, 1, `JSON POST blocked after its preflight: ${seen}`);
      assert.equal(posts.filter((r) => r.corsError === 'MissingAllowOriginHeader').length, 1, `text/plain cors POST: ${seen}`);
      assert.equal(posts.filter((r) => r.status === 403).length, 1, `no-cors POST answered 403: ${seen}`);

      // Server side: publish a sentinel without Origin and read until it is there; everything
      // sent before it has been decided by then, and nothing from page B may be in the log.
      const sentinel = `sentinel-${randomUUID()}`;
      const pub = await request(node.port, {
        method: 'POST',
        path: MESSAGES_PATH,
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ id: sentinel, text: sentinel }),
      });
      assert.equal(pub.status, 201, pub.body);
      assert.equal(pub.headers['access-control-allow-origin'], undefined, 'no CORS headers without Origin');
      const messages = await readHistoryFromNode(node.port);
      assert.ok(messages.some((m) => m.id === sentinel), `sentinel missing: ${JSON.stringify(messages)}`);
      const leaked = messages.filter((m) => (m.id ?? '').includes(marker) || (m.text ?? '').includes(marker));
      assert.deepEqual(leaked, [], 'messages from the refused origin were published');
      // Only page A's message and the sentinel (test 3 ran before; the node-as-B one was refused).
      assert.ok(
        messages.every((m) => (m.id ?? '').startsWith('page-a-') || (m.id ?? '').startsWith('sentinel-')),
        `unexpected messages: ${JSON.stringify(messages)}`,
      );
    } finally {
      await page.close().catch(() => {});
    }
  });
});
