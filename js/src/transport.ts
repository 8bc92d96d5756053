/**
 * Transports: a WebSocket, or an HTTP session (docs/protocol.md, "HTTP transports") over
 * streaming (`stream`: one long response of JSON lines) or long polling (`poll`). Each
 * carries the same frames; the client does not see which.
 * @module
 */

import { decode, encode, field, type ClientFrame, type ServerFrame } from './codec.js';

/** How frames travel. */
export type TransportKind = 'websocket' | 'stream' | 'poll';

/** What a link reports to its client. */
export interface LinkHandlers {
  /** The link is open: frames may be sent. */
  open(): void;
  /** A frame arrived. */
  frame(f: ServerFrame): void;
  /** Something arrived (a frame or a keep-alive): the link is alive. */
  alive(): void;
  /** The link ended, with a WebSocket close code (1006: no code, e.g. a network error). */
  closed(code: number, reason: string): void;
}

/** One connection to a node, over one transport. */
export interface Link {
  readonly kind: TransportKind;
  send(frames: ClientFrame[]): void;
  /** Ends the link (no `closed` report follows). */
  close(): void;
}

/** A WebSocket constructor (the global one, or e.g. the `ws` package's in older Node). */
export type WebSocketCtor = new (url: string, protocols?: string | string[]) => WebSocket;

/** Opens a link of `kind` to the node at `base` (an http(s) URL without path). */
export function openLink(kind: TransportKind, base: string, h: LinkHandlers, ws?: WebSocketCtor): Link {
  if (kind === 'websocket') return new WsLink(base, h, ws);
  return new HttpLink(kind, base, h);
}

class WsLink implements Link {
  readonly kind = 'websocket' as const;
  private readonly ws: WebSocket;
  private done = false;

  constructor(base: string, h: LinkHandlers, ctor?: WebSocketCtor) {
    const Ctor = ctor ?? (globalThis as { WebSocket?: WebSocketCtor }).WebSocket;
    if (!Ctor)
      throw new Error(
        'no WebSocket in this runtime: pass options.WebSocket (Node 20: --experimental-websocket, or the ws package)',
      );
    this.ws = new Ctor(base.replace(/^http/, 'ws') + '/v1/ws?format=json');
    this.ws.onopen = () => h.open();
    this.ws.onmessage = (e: MessageEvent) => {
      if (this.done) return;
      h.alive();
      if (typeof e.data !== 'string') return;
      let f: ServerFrame;
      try {
        f = decode(e.data);
      } catch (err) {
        // Not a protocol frame: the link cannot be trusted any more.
        this.close();
        h.closed(1002, `bad frame from the node: ${String(err)}`);
        return;
      }
      h.frame(f);
    };
    this.ws.onclose = (e: CloseEvent) => {
      if (this.done) return;
      this.done = true;
      h.closed(e.code || 1006, e.reason || 'connection closed');
    };
    this.ws.onerror = () => {
      /* onclose follows */
    };
  }

  send(frames: ClientFrame[]): void {
    if (this.ws.readyState !== 1) return;
    for (const f of frames) this.ws.send(encode(f));
  }

  close(): void {
    this.done = true;
    try {
      this.ws.close(1000);
    } catch {
      /* already closed */
    }
  }
}

/** Most frames in one POST (the node refuses more than 256). */
const POST_FRAMES = 256;
/**
 * Most bytes in one POST (the node refuses a body over 4 × `maxFrameBytes`, 1.6 MB by
 * default, and never runs below 6 × its message limit); one frame always goes, alone.
 */
const POST_BYTES = 256 * 1024;

class HttpLink implements Link {
  private readonly abort = new AbortController();
  private id = '';
  private secret = '';
  private done = false;
  private readonly queue: ClientFrame[] = [];
  private posting = false;
  private batch = 0;

  constructor(
    readonly kind: 'stream' | 'poll',
    private readonly base: string,
    private readonly h: LinkHandlers,
  ) {
    void this.run();
  }

  private headers(): Record<string, string> {
    return { 'x-tern-session-secret': this.secret };
  }

  private end(code: number, reason: string): void {
    if (this.done) return;
    this.done = true;
    this.leave();
    this.abort.abort();
    this.h.closed(code, reason);
  }

  /** Ends the session on the node (best effort): its subscriptions and members go at once. */
  private leave(): void {
    if (this.id === '') return;
    void fetch(`${this.base}/v1/sessions/${this.id}`, { method: 'DELETE', headers: this.headers() }).catch(() => {});
  }

  /** Hands the frames of one body (JSON lines) to the client; false after a `close`. */
  private lines(text: string): boolean {
    for (const line of text.split('\n')) {
      if (this.done) return false;
      if (line.trim() === '') continue;
      const f = decode(line);
      if (f.type === 'session') {
        this.id = field.str(f.body['id']);
        this.secret = field.str(f.body['secret']);
        this.h.open();
      } else if (f.type === 'close') {
        this.end(Number(f.body['code'] ?? 1006), field.str(f.body['reason']) || 'session closed');
        return false;
      } else {
        this.h.frame(f);
      }
    }
    return true;
  }

  private async run(): Promise<void> {
    try {
      const res = await fetch(`${this.base}/v1/sessions?transport=${this.kind}`, {
        signal: this.abort.signal,
        cache: 'no-store',
      });
      if (!res.ok) {
        this.end(res.status === 503 ? 1013 : 1002, `session open answered ${res.status}`);
        return;
      }
      if (this.kind === 'stream') {
        if (!res.body) {
          this.end(1002, 'no response body');
          return;
        }
        const reader = res.body.getReader();
        const utf8 = new TextDecoder();
        let buf = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          this.h.alive();
          buf += utf8.decode(value, { stream: true });
          const cut = buf.lastIndexOf('\n');
          if (cut >= 0) {
            const whole = buf.slice(0, cut);
            buf = buf.slice(cut + 1);
            if (!this.lines(whole)) return;
          }
        }
        this.end(1006, 'stream ended');
        return;
      }
      // Long polling: the open answer is batch 0.
      this.batch = Number(res.headers.get('x-tern-batch') ?? 0);
      this.h.alive();
      if (!this.lines(await res.text())) return;
      let failures = 0;
      while (!this.done) {
        let r: Response;
        try {
          r = await fetch(`${this.base}/v1/sessions/${this.id}/poll?ack=${this.batch}`, {
            headers: this.headers(),
            signal: this.abort.signal,
            cache: 'no-store',
          });
        } catch (e) {
          // The same ack again gets the lost answer again.
          if (this.done || ++failures > 2) throw e;
          continue;
        }
        failures = 0;
        if (r.status === 404) {
          this.end(1006, 'session ended');
          return;
        }
        if (!r.ok) {
          this.end(1002, `poll answered ${r.status}`);
          return;
        }
        this.batch = Number(r.headers.get('x-tern-batch') ?? this.batch + 1);
        this.h.alive();
        if (!this.lines(await r.text())) return;
      }
    } catch (e) {
      this.end(1006, `network: ${String(e)}`);
    }
  }

  send(frames: ClientFrame[]): void {
    if (this.done) return;
    this.queue.push(...frames);
    void this.post();
  }

  /** One POST at a time, so the node handles frames in order. */
  private async post(): Promise<void> {
    if (this.posting || this.id === '') return;
    this.posting = true;
    try {
      while (this.queue.length > 0 && !this.done) {
        const lines: string[] = [];
        let bytes = 0;
        for (const f of this.queue.slice(0, POST_FRAMES)) {
          const line = encode(f);
          if (lines.length > 0 && bytes + line.length > POST_BYTES) break;
          lines.push(line);
          bytes += line.length + 1;
        }
        const batch = lines;
        const r = await fetch(`${this.base}/v1/sessions/${this.id}`, {
          method: 'POST',
          headers: { ...this.headers(), 'content-type': 'application/json' },
          body: lines.join('\n') + '\n',
          signal: this.abort.signal,
        });
        if (r.status === 429) {
          await new Promise((resolve) => setTimeout(resolve, 1000 * Number(r.headers.get('retry-after') ?? 1)));
          continue;
        }
        if (r.status !== 202) {
          this.end(r.status === 404 ? 1006 : 1002, `POST answered ${r.status}`);
          return;
        }
        this.queue.splice(0, batch.length);
      }
    } catch (e) {
      this.end(1006, `network: ${String(e)}`);
    } finally {
      this.posting = false;
    }
  }

  close(): void {
    if (this.done) return;
    this.done = true;
    this.leave();
    this.abort.abort();
  }
}
