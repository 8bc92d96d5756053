// Shared by the end-to-end tests: real `tern edge` processes (a two-region cluster joined by
// the QUIC backbone, or one node), headless Chromium from Debian, a proxy that refuses
// WebSocket upgrades, HS256 tokens. Everything listens on 127.0.0.1.
//
// Needs the `tern` binary (TERN_BIN, else $CARGO_TARGET_DIR/debug/tern, else
// <repo>/target/debug/tern) and Chromium (CHROMIUM_BIN, else /usr/bin/chromium);
// scripts/test-js.sh provides both.
import { spawn, execFileSync } from 'node:child_process';
import { once } from 'node:events';
import { createHmac } from 'node:crypto';
import dgram from 'node:dgram';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
export const TERN_BIN =
  process.env.TERN_BIN ||
  (process.env.CARGO_TARGET_DIR
    ? path.resolve(REPO, process.env.CARGO_TARGET_DIR, 'debug', 'tern')
    : path.join(REPO, 'target', 'debug', 'tern'));
export const CHROMIUM_BIN = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
];

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Rejects after `ms` with a message naming what was awaited. */
export function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Polls `f` every 50 ms until it returns a truthy value; rejects after `ms` naming `what`. */
export async function until(f, ms, what) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms: ${what}`);
    await sleep(50);
  }
}

async function freeTcp() {
  const s = net.createServer().listen(0, '127.0.0.1');
  await once(s, 'listening');
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

async function freeUdp() {
  const s = dgram.createSocket('udp4');
  s.bind(0, '127.0.0.1');
  await once(s, 'listening');
  const { port } = s.address();
  s.close();
  return port;
}

/** A plain HTTP GET from Node (no Origin header): { status, body }. */
export function get(url) {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { timeout: 5000 }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${url}: no answer`)));
    req.on('error', reject);
  });
}

/** A temporary directory, removed by `cleanup()`. */
export async function tempDir(prefix) {
  return mkdtemp(path.join(tmpdir(), prefix));
}

/**
 * A `tern edge` process for `config` (a TOML file). `start()` resolves once it listens and
 * /readyz is 200; `kill(signal)` ends it.
 */
export class Node {
  constructor(name, config, port) {
    this.name = name;
    this.config = config;
    this.port = port;
    this.log = [];
    this.child = undefined;
  }

  get http() {
    return `http://127.0.0.1:${this.port}`;
  }

  get ws() {
    return `ws://127.0.0.1:${this.port}`;
  }

  async start() {
    const child = spawn(TERN_BIN, ['edge', '--config', this.config], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, NO_COLOR: '1', RUST_LOG: process.env.RUST_LOG || 'info' },
    });
    this.child = child;
    this.exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
    const keep = (stream) => (chunk) => {
      this.log.push(`[${this.name} ${stream}] ${chunk}`);
      if (this.log.length > 2000) this.log.splice(0, 1000);
    };
    child.stdout.on('data', keep('stdout'));
    child.stderr.on('data', keep('stderr'));
    let exited = null;
    this.exited.then((e) => (exited = e));
    await until(
      async () => {
        if (exited) throw new Error(`${this.name} exited at start: ${JSON.stringify(exited)}\n${this.log.join('')}`);
        const r = await get(`${this.http}/readyz`).catch(() => ({ status: 0 }));
        return r.status === 200;
      },
      30_000,
      `${this.name} ready`,
    );
  }

  /** Ends the process with `signal` and waits for it (SIGKILL after 10 s). */
  async stop(signal = 'SIGTERM') {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    child.kill(signal);
    try {
      await withTimeout(this.exited, 10_000, `${this.name} exit`);
    } catch {
      child.kill('SIGKILL');
      await withTimeout(this.exited, 5_000, `${this.name} exit after SIGKILL`).catch(() => {});
    }
  }
}

const COMMON = `
[heartbeat]
interval = "1s"
idle_timeout = "5s"
[limits]
publish_rate = 10000
publish_burst = 10000
[cors]
allowed_origins = ["*"]
[history]
sync = "interval"
[[history.namespaces]]
name = "chat"
max_messages = 10000
max_age = "1h"
`;

/**
 * A two-region cluster (eu-west, us-east), each node with a durable log for the `chat`
 * namespace, joined by the QUIC backbone with mutual TLS, both listed in `[[regions]]`.
 * `extra(region)` adds TOML. Returns { nodes: [eu, us], dir, stop() }.
 */
export async function startCluster(extra = () => '') {
  const dir = await tempDir('tern-e2e-');
  execFileSync(TERN_BIN, ['certs', 'init', '--dir', dir]);
  const regions = ['eu-west', 'us-east'];
  for (const r of regions) execFileSync(TERN_BIN, ['certs', 'node', `${r}/edge-1`, '--dir', dir]);
  const client = [await freeTcp(), await freeTcp()];
  const backbone = [await freeUdp(), await freeUdp()];
  const nodes = [];
  for (const [i, r] of regions.entries()) {
    const j = 1 - i;
    const toml =
      `[node]\nregion = "${r}"\nname = "edge-1"\n[listen]\nclient = "127.0.0.1:${client[i]}"\n` +
      COMMON.replace('[history]\n', `[history]\ndata_dir = "${dir}/data-${r}"\n`) +
      `[backbone]\nlisten = "127.0.0.1:${backbone[i]}"\nca = "${dir}/ca.pem"\n` +
      `cert = "${dir}/${r}-edge-1.pem"\nkey = "${dir}/${r}-edge-1.key"\n` +
      `[[backbone.peers]]\nid = "${regions[j]}/edge-1"\naddr = "127.0.0.1:${backbone[j]}"\n` +
      regions.map((x, k) => `[[regions]]\nname = "${x}"\nurl = "ws://127.0.0.1:${client[k]}"\n`).join('') +
      extra(r);
    const file = path.join(dir, `${r}.toml`);
    await writeFile(file, toml);
    nodes.push(new Node(r, file, client[i]));
  }
  // Both at once: each waits for the other to be ready.
  await Promise.all(nodes.map((n) => n.start()));
  return {
    nodes,
    dir,
    async stop() {
      await Promise.all(nodes.map((n) => n.stop()));
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/** One token-mode node (HS256 `secret`), no backbone. Returns a started Node and its dir. */
export async function startTokenNode(secret) {
  const dir = await tempDir('tern-e2e-token-');
  const port = await freeTcp();
  const toml =
    `[node]\nregion = "local"\nname = "edge-1"\n[listen]\nclient = "127.0.0.1:${port}"\n` +
    COMMON.replace('[history]\n', `[history]\ndata_dir = "${dir}/data"\n`) +
    `[auth]\nmode = "token"\nhs256_secret = "${secret}"\nleeway = "0s"\n`;
  const file = path.join(dir, 'node.toml');
  await writeFile(file, toml);
  const node = new Node('token-node', file, port);
  await node.start();
  return { node, dir };
}

/** Signs an HS256 JWT. */
export function jwt(secret, claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${head}.${createHmac('sha256', secret).update(head).digest('base64url')}`;
}

/**
 * An HTTP proxy to `target` (a node's port) that refuses every WebSocket upgrade with 403,
 * as some corporate proxies do, and forwards plain HTTP (streamed responses included).
 */
export async function startUpgradeRefusingProxy(targetPort) {
  const server = http.createServer((req, res) => {
    const up = http.request(
      { host: '127.0.0.1', port: targetPort, method: req.method, path: req.url, headers: req.headers },
      (r) => {
        res.writeHead(r.statusCode, r.headers);
        r.pipe(res);
      },
    );
    up.on('error', () => res.destroy());
    req.pipe(up);
  });
  let refused = 0;
  server.on('upgrade', (_req, socket) => {
    refused++;
    socket.end('HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n');
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    port: server.address().port,
    refused: () => refused,
    close: () =>
      new Promise((r) => {
        server.closeAllConnections();
        server.close(r);
      }),
  };
}

/** One dev-mode node with a durable `chat` namespace, no backbone. Returns a started Node and its dir. */
export async function startDevNode() {
  const dir = await tempDir('tern-e2e-dev-');
  const port = await freeTcp();
  const toml =
    `[node]\nregion = "local"\nname = "edge-1"\n[listen]\nclient = "127.0.0.1:${port}"\n` +
    COMMON.replace('[history]\n', `[history]\ndata_dir = "${dir}/data"\n`);
  const file = path.join(dir, 'node.toml');
  await writeFile(file, toml);
  const node = new Node('dev-node', file, port);
  await node.start();
  return { node, dir };
}

/**
 * A TCP relay to `targetPort` whose connections can all be cut at once (`cut()`), as a
 * network drop does: the client sees its connection reset and reconnects through it;
 * `hold(true)` keeps it down until `hold(false)`.
 */
export async function startCutter(targetPort) {
  const sockets = new Set();
  let held = false;
  const pairs = [];
  const server = net.createServer((a) => {
    if (held) {
      a.destroy();
      return;
    }
    const b = net.connect(targetPort, '127.0.0.1');
    for (const s of [a, b]) {
      sockets.add(s);
      s.on('close', () => sockets.delete(s));
      s.on('error', () => {});
    }
    a.pipe(b);
    b.pipe(a);
    pairs.push([a, b]);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    port: server.address().port,
    cut() {
      for (const s of sockets) s.destroy();
    },
    /** Stops forwarding on every open connection without closing it: a silent dead link. */
    stall() {
      for (const [a, b] of pairs.splice(0)) {
        a.unpipe(b);
        b.unpipe(a);
        a.pause();
        b.pause();
      }
    },
    /** While held, new connections are reset at once (the network is down). */
    hold(on) {
      held = on;
    },
    close: () =>
      new Promise((r) => {
        for (const s of sockets) s.destroy();
        server.close(r);
      }),
  };
}
