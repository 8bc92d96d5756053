/**
 * The Tern client: one connection to the nearest region, kept up across drops, failovers
 * and token expiry, with every subscription resumed where it left off.
 * @module
 */

import { backoffDelay, DEFAULT_BACKOFF, type Backoff } from './backoff.js';
import {
  errorCode,
  field,
  int64,
  member,
  message,
  originPosition,
  payloadFields,
  position,
  presenceEvent,
  type ClientFrame,
  type ErrorCode,
  type Int64,
  type Member,
  type Message,
  type OriginPosition,
  type Payload,
  type Position,
  type PresenceEvent,
  type ServerFrame,
} from './codec.js';
import { rank, regions, httpBase, ping } from './nearest.js';
import { Cursor, RecentIds } from './resume.js';
import { renewDelay, tokenExpiryMs } from './token.js';
import { Bucket } from './pacer.js';
import { openLink, type Link, type TransportKind, type WebSocketCtor } from './transport.js';

/** The connection's state (see js/README.md, "States"). */
export type ConnectionState =
  'initialized' | 'connecting' | 'connected' | 'disconnected' | 'suspended' | 'failed' | 'closed';

/** A state change, with why. */
export interface StateChange {
  state: ConnectionState;
  previous: ConnectionState;
  reason?: string;
  /** The close code that ended the previous connection, if one did. */
  code?: number;
}

/** Options of a {@link Client}. */
export interface ClientOptions {
  /** A node's URL (ws, wss, http or https), or several ranked: failover goes down the list. */
  url?: string | string[];
  /** Any node's URL: the client reads `/v1/regions` there and ranks the regions by `/v1/ping`. */
  nearest?: string;
  /** A token (token mode). */
  token?: string;
  /** Returns a fresh token: called at connect, before the token expires, and after a 4003. */
  authCallback?: () => Promise<string>;
  /** The self-declared client id (dev mode). */
  clientId?: string;
  /** `auto` (default): a WebSocket, falling back to HTTP streaming then long polling. */
  transport?: 'auto' | TransportKind;
  /** Reconnect back-off (default 100 ms doubling to 10 s, full jitter). */
  backoff?: Partial<Backoff>;
  /** How long a request (publish, history, presence) waits for its answer, across reconnects (default 15 s). */
  requestTimeoutMs?: number;
  /** How long an attempt may take to reach `connected` (default 10 s). */
  connectTimeoutMs?: number;
  /** Names the SDK in the node's logs. */
  agent?: string;
  /** A WebSocket constructor where the runtime has none (Node 20 without --experimental-websocket). */
  WebSocket?: WebSocketCtor;
}

/** What `connected` told about this connection. */
export interface ConnectionInfo {
  connectionId: string;
  node: string;
  region: string;
  clientId: string;
  heartbeatIntervalMs: number;
  idleTimeoutMs: number;
  resumeWindowMs: number;
  /** This connection's limits; the client paces its frames and publishes below them. */
  limits: Limits;
  transport: TransportKind;
  url: string;
}

/** A publish's acknowledgement. */
export interface Ack {
  channel: string;
  messageId: string;
  origin: string;
  originEpoch: Int64;
  originSeq: Int64;
  position: Position;
  timestampMs: number;
  /** The id was already sequenced: nothing was delivered again. */
  duplicate: boolean;
}

/** Options of a publish. */
export interface PublishOptions {
  /** The idempotency key (default: generated, and kept across retries). */
  id?: string;
  /** An event name. */
  name?: string;
  /** `replicated`: the ack waits for another region (default `local`). */
  durability?: 'local' | 'replicated';
}

/** A history query (docs/protocol.md, "History"). */
export interface HistoryQuery {
  limit?: number;
  forwards?: boolean;
  from?: Int64;
  to?: Int64;
  sinceMs?: number;
  untilMs?: number;
}

/** A page of history; `next()` reads the following one. */
export interface HistoryPage {
  messages: Message[];
  nextFrom?: Int64;
  next(): Promise<HistoryPage | undefined>;
}

/** Options of a subscription. */
export interface SubscribeOptions {
  /** Start with recent messages: the last `count`, or those of the last `sinceMs`. */
  rewind?: { count: number } | { sinceMs: number };
  /** Also follow the channel's presence (roster and events). */
  presence?: boolean;
}

/** A gap the node could not replay. */
export interface Discontinuity {
  reason: string;
  origins: OriginPosition[];
}

/** A refused request or a failed operation. */
export class TernError extends Error {
  /** A publish's idempotency key: retry with it (`PublishOptions.id`) so it is never doubled. */
  messageId?: string;

  constructor(
    /**
     * A protocol error code, or the client's own: `timeout` (no answer within
     * `requestTimeoutMs`), `closed` (the client was closed or failed), `disconnected` (a
     * request that cannot be carried to another connection: a history read), `unsubscribed`
     * (a subscribe overtaken by an unsubscribe).
     */
    readonly code: ErrorCode | 'timeout' | 'closed' | 'disconnected' | 'unsubscribed',
    readonly reason: string,
    /** For RATE_LIMITED and UNAVAILABLE: when to retry. */
    readonly retryAfterMs?: number,
  ) {
    super(`${code}: ${reason}`);
    this.name = 'TernError';
  }
}

/** An event listener. */
export type Listener<T> = (value: T) => void;

/** A minimal typed event emitter. */
class Emitter<E extends Record<string, unknown>> {
  private readonly listeners = new Map<keyof E, Set<Listener<never>>>();
  /** Adds a listener; returns a function that removes it. */
  on<K extends keyof E>(event: K, f: Listener<E[K]>): () => void {
    let set = this.listeners.get(event);
    if (!set) this.listeners.set(event, (set = new Set()));
    set.add(f);
    return () => set.delete(f);
  }
  /** Whether `event` has a listener. */
  protected heard(event: keyof E): boolean {
    return (this.listeners.get(event)?.size ?? 0) > 0;
  }
  protected emit<K extends keyof E>(event: K, value: E[K]): void {
    for (const f of this.listeners.get(event) ?? []) {
      try {
        (f as Listener<E[K]>)(value);
      } catch (e) {
        console.error('tern: a listener threw', e);
      }
    }
  }
}

/** Events of a {@link Subscription}. */
export interface SubscriptionEvents extends Record<string, unknown> {
  /** A message, once, in the channel's order. */
  message: Message;
  /** Messages were missed and cannot be replayed: fetch history or resynchronise. */
  discontinuity: Discontinuity;
  /** A presence change (presence subscriptions). */
  presence: PresenceEvent;
  /** The subscription ended by the node (e.g. a renewed token no longer allows it). */
  error: TernError;
}

/** Most events a subscription keeps for a listener not yet attached. */
export const EARLY_EVENTS = 10_000;

const memberKey = (m: Member): string => `${m.clientId}\u001f${m.connectionId}\u001f${m.node}`;

/** A subscription to one channel. Messages come in order, each once, across reconnects. */
export class Subscription extends Emitter<SubscriptionEvents> {
  /** @internal */ readonly cursor = new Cursor();
  /** @internal */ readonly recent = new RecentIds();
  /** @internal */ confirmed = false;
  /** @internal */ ended = false;
  /** @internal */ roster = new Map<string, Member>();
  /** @internal */ snapshot: Member[] | undefined;
  /** @internal */ waiters: { resolve: (s: Subscription) => void; reject: (e: TernError) => void }[] = [];
  /** @internal A presence upgrade waits for its confirmation (a refusal keeps the messages). */
  upgrading = false;
  /** Messages dropped as repeats (the vector or a recent id covered them). */
  repeats = 0;

  /** @internal */
  constructor(
    private readonly client: Client,
    readonly channel: string,
    /** @internal */ public options: SubscribeOptions,
  ) {
    super();
  }

  /** The channel's members (presence subscriptions), as the node's snapshot and events say. */
  members(): Member[] {
    return [...this.roster.values()];
  }

  /** Ends the subscription: no message follows. */
  unsubscribe(): Promise<void> {
    return this.client.unsubscribe(this.channel);
  }

  /**
   * Events that came before their first listener (a rewind's messages can arrive in the
   * same turn as the confirmation): kept, up to {@link EARLY_EVENTS}, and handed to it.
   */
  private early: [keyof SubscriptionEvents, unknown][] = [];

  override on<K extends keyof SubscriptionEvents>(event: K, f: Listener<SubscriptionEvents[K]>): () => void {
    const off = super.on(event, f);
    const mine = this.early.filter(([e]) => e === event);
    if (mine.length > 0) {
      this.early = this.early.filter(([e]) => e !== event);
      for (const [, v] of mine) f(v);
    }
    return off;
  }

  /** @internal */ fire<K extends keyof SubscriptionEvents>(event: K, value: SubscriptionEvents[K]): void {
    if (this.heard(event)) this.emit(event, value);
    else if (this.early.length < EARLY_EVENTS) this.early.push([event, value]);
  }

  /** @internal A complete snapshot: the roster becomes it, and the differences are events. */
  replaceRoster(members: Member[]): void {
    const next = new Map(members.map((m) => [memberKey(m), m]));
    for (const [k, m] of this.roster) if (!next.has(k)) this.fire('presence', { action: 'leave', member: m });
    for (const [k, m] of next) {
      const old = this.roster.get(k);
      if (!old) this.fire('presence', { action: 'enter', member: m });
      else if (!sameData(old.data, m.data)) this.fire('presence', { action: 'update', member: m });
    }
    this.roster = next;
  }

  /** @internal */ applyPresence(e: PresenceEvent): void {
    const k = memberKey(e.member);
    if (e.action === 'leave') this.roster.delete(k);
    else this.roster.set(k, e.member);
    this.fire('presence', e);
  }
}

function sameData(a: Payload | undefined, b: Payload | undefined): boolean {
  if (a === undefined || b === undefined || typeof a === 'string' || typeof b === 'string') return a === b;
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

/** Events of a {@link Client}. */
export interface ClientEvents extends Record<string, unknown> {
  state: StateChange;
  /** Every `connected`, first and after each reconnect. */
  connected: ConnectionInfo;
  /** An `error` frame that answers no request. */
  error: TernError;
}

interface Pending {
  /** The frame to (re)send, given its request id. */
  frame: (requestId: number) => ClientFrame;
  kind: 'publish' | 'history' | 'presence' | 'auth' | 'unsubscribe';
  resolve: (body: Record<string, unknown>) => void;
  reject: (e: TernError) => void;
  deadline: number;
  /** Sent on this connection (publishes: and not nacked for a retry). */
  sent: boolean;
  /** Publishes: the channel (for `after` and the namespace's rate) and the id. */
  channel?: string;
  messageId?: string;
}

/** Channels whose last ack's identity is kept for `after` (least recently acked forgotten first). */
const ACKED_CHANNELS = 10_000;
/** Most frames a client queues while it waits for the node's rates (beyond: refused). */
const OUTBOX_FRAMES = 10_000;
/** A connection that lasted this long resets the back-off. */
const STABLE_MS = 10_000;
/** Attempts that failed to open while the node answered `/v1/ping` before the client falls back. */
const FALLBACK_AFTER = 2;

let instances = 0;

/** A connection to Tern. */
export class Client extends Emitter<ClientEvents> {
  private readonly options: Required<Pick<ClientOptions, 'requestTimeoutMs' | 'connectTimeoutMs'>> & ClientOptions;
  private readonly backoff: Backoff;
  private urls: string[] = [];
  private urlIndex = 0;
  private link: Link | undefined;
  private linkUrl = '';
  private attempt = 0;
  private st: ConnectionState = 'initialized';
  private info: ConnectionInfo | undefined;
  private token: string | undefined;
  private nextRequest = 0;
  private readonly pending = new Map<number, Pending>();
  private readonly subs = new Map<string, Subscription>();
  /** Subscribe request ids on this connection, to their subscription (snapshot pages too). */
  private readonly subRequests = new Map<number, Subscription>();
  private readonly entered = new Map<string, Payload | undefined>();
  private readonly acked = new Map<string, OriginPosition>();
  private readonly timers = new Set<ReturnType<typeof setTimeout>>();
  private readonly transports = new Map<string, { kind: TransportKind; until: number; failures: number }>();
  private lastReceived = 0;
  private heartbeatTimer: ReturnType<typeof setInterval> | undefined;
  private renewTimer: ReturnType<typeof setTimeout> | undefined;
  private sweepTimer: ReturnType<typeof setInterval> | undefined;
  private stableTimer: ReturnType<typeof setTimeout> | undefined;
  private holdUntil = 0;
  private disconnectedAt = 0;
  private everConnected = false;
  private previousConnection: { node: string; connectionId: string } | undefined;
  private readonly idPrefix = `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}${(instances++).toString(36)}`;
  private nextId = 0;
  private firstConnect: Promise<void> | undefined;
  private settleFirst: { resolve: () => void; reject: (e: TernError) => void } | undefined;
  private nonce = 0;
  /** Frames waiting for the node's rates (pacing), in order. */
  private outbox: ClientFrame[] = [];
  private frameBucket: Bucket | undefined;
  private publishBuckets = new Map<string, Bucket>();
  private pumpTimer: ReturnType<typeof setTimeout> | undefined;

  constructor(options: ClientOptions) {
    super();
    const urls = ([] as string[]).concat(options.url ?? [], options.nearest ?? []);
    if (urls.length === 0) throw new TypeError('tern: options.url or options.nearest is required');
    for (const u of urls) {
      try {
        httpBase(u);
      } catch {
        throw new TypeError(`tern: ${JSON.stringify(u)} is not a URL (ws, wss, http or https)`);
      }
    }
    this.options = { requestTimeoutMs: 15_000, connectTimeoutMs: 10_000, ...options };
    this.backoff = { ...DEFAULT_BACKOFF, ...options.backoff };
    this.token = options.token;
  }

  /** The current state. */
  get state(): ConnectionState {
    return this.st;
  }

  /** The live connection's details, while connected. */
  get connection(): ConnectionInfo | undefined {
    return this.st === 'connected' ? this.info : undefined;
  }

  /**
   * Connects (ranking regions first with `nearest`); resolves at the first `connected`,
   * rejects if the client fails or is closed before. Calling it again returns the same promise.
   */
  connect(): Promise<void> {
    if (this.firstConnect) return this.firstConnect;
    if (this.stopped()) return Promise.reject(new TernError('closed', `the client is ${this.st}`));
    this.firstConnect = new Promise<void>((resolve, reject) => (this.settleFirst = { resolve, reject }));
    this.sweepTimer = setInterval(() => this.sweep(), 250);
    this.setState('connecting');
    void (async () => {
      if (this.options.nearest) {
        try {
          const ranked = await rank(await regions(this.options.nearest));
          this.urls = ranked.map((r) => r.url);
        } catch {
          /* the seed itself, below */
        }
        if (this.urls.length === 0) this.urls = [this.options.nearest];
      } else {
        this.urls = ([] as string[]).concat(this.options.url ?? []);
      }
      await this.dial();
    })();
    return this.firstConnect;
  }

  /** Closed or failed: nothing more to do. */
  private stopped(): boolean {
    return this.st === 'closed' || this.st === 'failed';
  }

  private setState(state: ConnectionState, reason?: string, code?: number): void {
    if (state === this.st) return;
    const previous = this.st;
    this.st = state;
    const change: StateChange = { state, previous };
    if (reason !== undefined) change.reason = reason;
    if (code !== undefined) change.code = code;
    this.emit('state', change);
  }

  private later(ms: number, f: () => void): ReturnType<typeof setTimeout> {
    const t = setTimeout(() => {
      this.timers.delete(t);
      f();
    }, ms);
    this.timers.add(t);
    return t;
  }

  private transportFor(url: string): TransportKind {
    const pinned = this.options.transport;
    if (pinned && pinned !== 'auto') return pinned;
    const kept = this.transports.get(url);
    return kept && kept.until > Date.now() ? kept.kind : 'websocket';
  }

  /** One connection attempt to the current URL. */
  private async dial(): Promise<void> {
    if (this.stopped()) return;
    if (this.options.authCallback && (!this.token || (tokenExpiryMs(this.token) ?? Infinity) < Date.now() + 1000)) {
      try {
        this.token = await this.options.authCallback();
      } catch (e) {
        this.retry(`auth callback failed: ${String(e)}`);
        return;
      }
    }
    if (this.stopped()) return;
    const url = this.urls[this.urlIndex % this.urls.length] as string;
    const base = httpBase(url);
    const kind = this.transportFor(url);
    let opened = false;
    let settled = false;
    const connectTimer = this.later(this.options.connectTimeoutMs, () => {
      if (!settled) fail(1006, `no connected within ${this.options.connectTimeoutMs} ms`);
    });
    const fail = (code: number, reason: string): void => {
      if (settled) return;
      settled = true;
      clearTimeout(connectTimer);
      this.timers.delete(connectTimer);
      this.link?.close();
      this.link = undefined;
      void this.attemptFailed(url, kind, opened, code, reason);
    };
    let link: Link;
    try {
      link = openLink(
        kind,
        base,
        {
          open: () => {
            opened = true;
            this.lastReceived = Date.now();
            const connect: Record<string, unknown> = { protocol: 1, agent: this.options.agent ?? 'tern-js/0.1' };
            if (this.token) connect['token'] = this.token;
            if (this.options.clientId) connect['clientId'] = this.options.clientId;
            if (this.previousConnection && url === this.linkUrl)
              connect['recover'] = this.previousConnection.connectionId;
            link.send([{ connect }]);
          },
          alive: () => {
            this.lastReceived = Date.now();
          },
          frame: (f) => {
            if (!settled) {
              if (f.type === 'connected') {
                settled = true;
                clearTimeout(connectTimer);
                this.timers.delete(connectTimer);
                this.onConnected(link, url, kind, f.body);
              }
              return;
            }
            if (this.link === link) this.onFrame(f);
          },
          closed: (code, reason) => {
            if (!settled) return fail(code, reason);
            if (this.link === link) this.onDrop(code, reason);
          },
        },
        this.options.WebSocket,
      );
    } catch (e) {
      fail(1006, String(e));
      return;
    }
    this.link = link;
  }

  /** An attempt failed before `connected`: fall back to another transport, or move on. */
  private async attemptFailed(
    url: string,
    kind: TransportKind,
    opened: boolean,
    code: number,
    reason: string,
  ): Promise<void> {
    if (this.stopped()) return;
    if (code === 4003) {
      this.unauthorized(reason);
      return;
    }
    if (!opened && (this.options.transport ?? 'auto') === 'auto' && kind !== 'poll') {
      // The transport did not open. If the node answers plain HTTP, the transport itself may
      // be blocked on the way (a proxy refusing upgrades, a middlebox buffering streams):
      // after FALLBACK_AFTER such attempts in a row (one before the first connection), fall
      // back to the next transport for this URL.
      if ((await ping(url)) < Infinity) {
        const kept = this.transports.get(url);
        const failures = (kept?.kind === kind ? kept.failures : 0) + 1;
        if (failures >= (this.everConnected ? FALLBACK_AFTER : 1)) {
          const next = kind === 'websocket' ? 'stream' : 'poll';
          this.transports.set(url, { kind: next, until: Date.now() + 5 * 60_000, failures: 0 });
          return this.dial();
        }
        this.transports.set(url, { kind, until: Date.now() + 5 * 60_000, failures });
        this.retry(reason, code);
        return;
      }
    }
    this.urlIndex++;
    this.retry(reason, code);
  }

  private retry(reason: string, code?: number): void {
    if (this.stopped()) return;
    if (this.disconnectedAt === 0) this.disconnectedAt = Date.now();
    const window = this.info?.resumeWindowMs || 120_000;
    const state =
      this.info && Date.now() - this.disconnectedAt > window ? 'suspended' : this.info ? 'disconnected' : 'connecting';
    this.setState(state, reason, code);
    const delay = backoffDelay(this.attempt++, this.backoff);
    this.later(delay, () => {
      if (this.st === 'disconnected') this.setState('connecting');
      void this.dial();
    });
  }

  private unauthorized(reason: string): void {
    if (this.options.authCallback) {
      // A fresh token from the callback, then again.
      this.token = undefined;
      this.retry(`unauthorized: ${reason}`, 4003);
      return;
    }
    this.fail(new TernError('ERROR_CODE_UNAUTHORIZED', reason), 4003);
  }

  private fail(e: TernError, code?: number): void {
    this.stopTimers();
    this.link?.close();
    this.link = undefined;
    this.setState('failed', e.reason, code);
    this.rejectAll(e);
  }

  private rejectAll(e: TernError): void {
    this.settleFirst?.reject(e);
    this.settleFirst = undefined;
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
    for (const s of this.subs.values()) for (const w of s.waiters.splice(0)) w.reject(e);
  }

  private onConnected(link: Link, url: string, kind: TransportKind, b: Record<string, unknown>): void {
    this.link = link;
    this.linkUrl = url;
    this.everConnected = true;
    this.disconnectedAt = 0;
    this.holdUntil = 0;
    const kept = this.transports.get(url);
    if (kept) kept.failures = 0;
    this.info = {
      connectionId: field.str(b['connectionId']),
      node: field.str(b['node']),
      region: field.str(b['region']),
      clientId: field.str(b['clientId']),
      heartbeatIntervalMs: field.num(b['heartbeatIntervalMs']) || 20_000,
      idleTimeoutMs: field.num(b['idleTimeoutMs']) || 45_000,
      resumeWindowMs: field.num(b['resumeWindowMs']) || 120_000,
      limits: limitsOf(b['limits']),
      transport: kind,
      url,
    };
    this.previousConnection = { node: this.info.node, connectionId: this.info.connectionId };
    // The back-off resets only once a connection has proved stable: a node that closes
    // every connection at once is not hammered.
    clearTimeout(this.stableTimer);
    this.stableTimer = setTimeout(() => (this.attempt = 0), STABLE_MS);
    // Pacing by this connection's limits.
    const now = Date.now();
    const l = this.info.limits;
    this.frameBucket = Bucket.paced(l.frameRate, l.frameBurst, now);
    this.publishBuckets = new Map([['', Bucket.paced(l.publishRate, l.publishBurst, now)]]);
    for (const ns of l.namespaces) {
      if (ns.publishRate > 0) this.publishBuckets.set(ns.namespace, Bucket.paced(ns.publishRate, ns.publishBurst, now));
    }
    this.outbox = [];
    // Heartbeats: browsers cannot see pings, so the client sends frames and watches for any.
    clearInterval(this.heartbeatTimer);
    const every = Math.min(this.info.heartbeatIntervalMs, this.info.idleTimeoutMs / 3);
    this.heartbeatTimer = setInterval(() => {
      const idle = Date.now() - this.lastReceived;
      if (this.info && idle > this.info.idleTimeoutMs) {
        this.drop(4000, `nothing arrived for ${idle} ms`);
        return;
      }
      this.send([{ heartbeat: { nonce: String(++this.nonce) } }]);
    }, every);
    this.scheduleRenewal(this.token ? tokenExpiryMs(this.token) : undefined);
    // Everything the client holds, in order: subscriptions (resumed), members, requests.
    const frames: ClientFrame[] = [];
    for (const sub of this.subs.values()) frames.push(this.subscribeFrame(sub));
    for (const [channel, data] of this.entered) {
      frames.push({
        presence: { requestId: this.requestId(), channel, action: 'PRESENCE_ACTION_ENTER', ...payloadFields(data) },
      });
    }
    for (const [id, p] of [...this.pending].sort((x, y) => x[0] - y[0])) {
      if (p.kind === 'auth') {
        // The connect carried the newest token.
        this.pending.delete(id);
        p.resolve({});
        continue;
      }
      p.sent = true;
      frames.push(this.frameOf(id, p));
    }
    this.setState('connected');
    this.send(frames);
    this.emit('connected', this.info);
    this.settleFirst?.resolve();
    this.settleFirst = undefined;
  }

  private frameOf(id: number, p: Pending): ClientFrame {
    const f = p.frame(id);
    if (p.kind === 'publish' && p.channel) {
      const after = this.acked.get(p.channel);
      if (after) (f['publish'] as Record<string, unknown>)['after'] = after;
    }
    return f;
  }

  private scheduleRenewal(expiresAtMs: number | undefined): void {
    clearTimeout(this.renewTimer);
    if (!this.options.authCallback || expiresAtMs === undefined) return;
    this.renewTimer = setTimeout(() => void this.renew(), renewDelay(expiresAtMs, Date.now()));
  }

  /** In-band renewal: a fresh token from the callback, sent as `auth`; kept once accepted. */
  private async renew(): Promise<void> {
    if (!this.options.authCallback || this.st !== 'connected') return;
    let token: string;
    try {
      token = await this.options.authCallback();
    } catch (e) {
      this.emit('error', new TernError('ERROR_CODE_UNAUTHORIZED', `auth callback failed: ${String(e)}`));
      this.scheduleRenewal(Date.now() + 3000);
      return;
    }
    try {
      const b = await this.request('auth', () => ({ auth: { token } }));
      this.token = token;
      this.scheduleRenewal(field.num(b['expiresAtMs']) || tokenExpiryMs(token));
    } catch (e) {
      if (e instanceof TernError && e.code !== 'closed') {
        this.emit('error', e);
        this.scheduleRenewal(Date.now() + 3000);
      }
    }
  }

  private requestId(): number {
    this.nextRequest = (this.nextRequest % 0xffffffff) + 1;
    return this.nextRequest;
  }

  /** Queues frames for this connection; they leave as the node's rates allow, in order. */
  private send(frames: ClientFrame[]): void {
    if (frames.length === 0 || this.st !== 'connected') return;
    this.outbox.push(...frames);
    this.pump();
  }

  private pump(): void {
    if (this.pumpTimer !== undefined || !this.link) return;
    const now = Date.now();
    const ready: ClientFrame[] = [];
    let wait = 0;
    while (this.outbox.length > 0) {
      const f = this.outbox[0] as ClientFrame;
      const publish = f['publish'] as { channel?: string } | undefined;
      const bucket = publish ? this.publishBucket(String(publish.channel)) : undefined;
      wait = Math.max(this.frameBucket?.wait(now) ?? 0, bucket?.wait(now) ?? 0);
      if (wait > 0) break;
      this.frameBucket?.take(now);
      bucket?.take(now);
      ready.push(this.outbox.shift() as ClientFrame);
    }
    if (ready.length > 0) this.link.send(ready);
    if (this.outbox.length > 0) {
      this.pumpTimer = setTimeout(() => {
        this.pumpTimer = undefined;
        this.pump();
      }, wait);
    }
  }

  private publishBucket(channel: string): Bucket | undefined {
    const cut = channel.indexOf(':');
    const ns = cut > 0 ? channel.slice(0, cut) : '';
    return this.publishBuckets.get(ns) ?? this.publishBuckets.get('');
  }

  private subscribeFrame(sub: Subscription): ClientFrame {
    const requestId = this.requestId();
    this.subRequests.set(requestId, sub);
    const f: Record<string, unknown> = { requestId, channel: sub.channel };
    if (sub.options.presence) f['presence'] = true;
    const resume = sub.cursor.resume();
    if (resume) f['resume'] = resume;
    else if (sub.options.rewind && !sub.cursor.known) f['rewind'] = sub.options.rewind;
    sub.snapshot = undefined;
    return { subscribe: f };
  }

  /** Ends the current link and reconnects (the link is dead or the node asked). */
  private drop(code: number, reason: string): void {
    this.link?.close();
    this.onDrop(code, reason);
  }

  private onDrop(code: number, reason: string): void {
    this.link = undefined;
    clearInterval(this.heartbeatTimer);
    clearTimeout(this.renewTimer);
    clearTimeout(this.stableTimer);
    clearTimeout(this.pumpTimer);
    this.pumpTimer = undefined;
    this.outbox = [];
    this.subRequests.clear();
    for (const sub of this.subs.values()) {
      sub.confirmed = false;
      sub.upgrading = false;
    }
    for (const [id, p] of this.pending) {
      p.sent = false;
      if (p.kind === 'history') {
        // Offsets are one node's: a read is not carried to the next connection.
        this.pending.delete(id);
        p.reject(new TernError('disconnected', `the connection dropped (${code}: ${reason})`));
      }
    }
    if (this.stopped()) return;
    if (code === 4003) {
      this.unauthorized(reason);
      return;
    }
    // Shutting down (1001): another node at once. Otherwise the same node first: resuming
    // there is cheapest; a failed attempt moves on along the ranking.
    if (code === 1001) this.urlIndex++;
    this.retry(reason, code);
  }

  /** Expires requests past their deadline; sends publishes held by a retry hint. */
  private sweep(): void {
    const now = Date.now();
    for (const [id, p] of this.pending) {
      if (now > p.deadline) {
        this.pending.delete(id);
        const e = new TernError('timeout', `no answer within ${this.options.requestTimeoutMs} ms`);
        if (p.messageId !== undefined) e.messageId = p.messageId;
        p.reject(e);
      }
    }
    if (this.st === 'connected' && this.holdUntil !== 0 && now >= this.holdUntil) {
      this.holdUntil = 0;
      const frames: ClientFrame[] = [];
      for (const [id, p] of [...this.pending].sort((a, b) => a[0] - b[0])) {
        if (p.kind === 'publish' && !p.sent) {
          p.sent = true;
          frames.push(this.frameOf(id, p));
        }
      }
      this.send(frames);
    }
  }

  private request(
    kind: Pending['kind'],
    body: () => ClientFrame,
    extra: { channel?: string; messageId?: string } = {},
  ): Promise<Record<string, unknown>> {
    if (this.stopped()) return Promise.reject(new TernError('closed', `the client is ${this.st}`));
    if (this.outbox.length >= OUTBOX_FRAMES) {
      return Promise.reject(
        new TernError('ERROR_CODE_RATE_LIMITED', `${OUTBOX_FRAMES} frames already wait for the node's rate limits`),
      );
    }
    return new Promise((resolve, reject) => {
      const id = this.requestId();
      const p: Pending = {
        kind,
        resolve,
        reject,
        deadline: Date.now() + this.options.requestTimeoutMs,
        sent: false,
        frame: (requestId) => {
          const f = body();
          const key = Object.keys(f)[0] as string;
          (f[key] as Record<string, unknown>)['requestId'] = requestId;
          return f;
        },
      };
      if (extra.channel !== undefined) p.channel = extra.channel;
      if (extra.messageId !== undefined) p.messageId = extra.messageId;
      this.pending.set(id, p);
      if (this.st === 'connected' && (kind !== 'publish' || this.holdUntil === 0)) {
        p.sent = true;
        this.send([this.frameOf(id, p)]);
      }
    });
  }

  // ---- frames from the node ----

  private onFrame(f: ServerFrame): void {
    const b = f.body;
    const requestId = field.num(b['requestId']);
    switch (f.type) {
      case 'deliver':
        for (const raw of field.list(b['messages'])) this.deliver(message(raw));
        return;
      case 'subscribed': {
        const sub = this.subRequests.get(requestId);
        if (!sub || this.subs.get(sub.channel) !== sub) return;
        if (!field.bool(b['resumed'])) {
          sub.cursor.start(
            this.info?.node ?? '',
            position(b['position']),
            field.list(b['origins']).map(originPosition),
          );
        }
        sub.confirmed = true;
        sub.upgrading = false;
        for (const w of sub.waiters.splice(0)) w.resolve(sub);
        // The presence snapshot's pages carry the subscribe's request id.
        if (!sub.options.presence) this.subRequests.delete(requestId);
        return;
      }
      case 'presenceReply': {
        const sub = this.subRequests.get(requestId);
        if (sub) {
          sub.snapshot = (sub.snapshot ?? []).concat(field.list(b['members']).map(member));
          if (field.str(b['next']) === '') {
            sub.replaceRoster(sub.snapshot);
            sub.snapshot = undefined;
          }
          return;
        }
        this.answer(requestId, b);
        return;
      }
      case 'presence': {
        const sub = this.subs.get(field.str(b['channel']));
        if (!sub) return;
        for (const raw of field.list(b['events'])) {
          const e = presenceEvent(raw);
          if (e) sub.applyPresence(e);
        }
        return;
      }
      case 'discontinuity':
        this.subs.get(field.str(b['channel']))?.fire('discontinuity', {
          reason: field.str(b['reason']),
          origins: field.list(b['origins']).map(originPosition),
        });
        return;
      case 'ack': {
        const origin = field.str(b['origin']);
        if (origin !== '') {
          const channel = field.str(b['channel']);
          this.acked.delete(channel);
          this.acked.set(channel, { origin, epoch: int64(b['originEpoch']), seq: int64(b['originSeq']) });
          if (this.acked.size > ACKED_CHANNELS) this.acked.delete(this.acked.keys().next().value as string);
        }
        this.answer(requestId, b);
        return;
      }
      case 'nack': {
        const code = errorCode(b['code']);
        const p = this.pending.get(requestId);
        if (p && (code === 'ERROR_CODE_RATE_LIMITED' || code === 'ERROR_CODE_UNAVAILABLE')) {
          // The same publish (same id) again after the hint, in order with the later ones.
          p.sent = false;
          this.holdUntil = Math.max(this.holdUntil, Date.now() + Math.max(1, field.num(b['retryAfterMs'])));
          return;
        }
        this.refuse(requestId, code, field.str(b['reason']), field.num(b['retryAfterMs']));
        return;
      }
      case 'unsubscribed':
      case 'history':
      case 'authRenewed':
        this.answer(requestId, b);
        return;
      case 'error':
        this.onError(requestId, b);
        return;
      case 'draining':
        // The node is shutting down: to the next URL now (1001 moves along the ranking),
        // resuming there.
        this.drop(1001, `node draining: ${field.str(b['reason'])}`);
        return;
      default:
        return; // heartbeat answers and frames of later versions
    }
  }

  private onError(requestId: number, b: Record<string, unknown>): void {
    const code = errorCode(b['code']);
    const reason = field.str(b['reason']);
    const sub = this.subRequests.get(requestId);
    if (sub) {
      this.subRequests.delete(requestId);
      if (this.subs.get(sub.channel) !== sub) return;
      const e = new TernError(code, reason);
      if (sub.upgrading) {
        // A refused presence upgrade: the messages go on without presence.
        sub.upgrading = false;
        sub.options.presence = false;
        sub.confirmed = true;
        for (const w of sub.waiters.splice(0)) w.reject(e);
        return;
      }
      // A refused subscribe, first or after a reconnect (e.g. a limit on the new node): the
      // subscription ends, and says so.
      this.subs.delete(sub.channel);
      sub.ended = true;
      const waiters = sub.waiters.splice(0);
      for (const w of waiters) w.reject(e);
      if (waiters.length === 0) sub.fire('error', e);
      return;
    }
    if (requestId !== 0 && this.pending.has(requestId)) {
      this.refuse(requestId, code, reason);
      return;
    }
    const channel = field.str(b['channel']);
    const revoked = this.subs.get(channel);
    if (requestId === 0 && code === 'ERROR_CODE_FORBIDDEN' && revoked) {
      // A renewed token no longer allows the channel: the node ended it.
      this.subs.delete(channel);
      revoked.ended = true;
      revoked.fire('error', new TernError(code, reason));
      return;
    }
    this.emit('error', new TernError(code, reason));
  }

  private deliver(m: Message): void {
    const sub = this.subs.get(m.channel);
    // Before its `subscribed`, a message is an earlier subscription's (unsubscribed since).
    if (!sub || sub.ended || !sub.cursor.known) return;
    if (!sub.cursor.advance(this.info?.node ?? '', m) || !sub.recent.insert(m.id, Date.now())) {
      sub.repeats++;
      return;
    }
    sub.fire('message', m);
  }

  private answer(requestId: number, b: Record<string, unknown>): void {
    const p = this.pending.get(requestId);
    if (!p) return;
    this.pending.delete(requestId);
    p.resolve(b);
  }

  private refuse(requestId: number, code: ErrorCode, reason: string, retryAfterMs?: number): void {
    const p = this.pending.get(requestId);
    if (!p) return;
    this.pending.delete(requestId);
    const e = new TernError(code, reason, retryAfterMs || undefined);
    if (p.messageId !== undefined) e.messageId = p.messageId;
    p.reject(e);
  }

  // ---- the API ----

  /**
   * Subscribes to `channel`. Resolves once the node confirmed it; messages follow, each once
   * and in order, across reconnects. Subscribing again returns the same subscription (with
   * `presence: true`, adding presence to it).
   */
  subscribe(channel: string, options: SubscribeOptions = {}): Promise<Subscription> {
    if (this.stopped()) return Promise.reject(new TernError('closed', `the client is ${this.st}`));
    let sub = this.subs.get(channel);
    let send = false;
    if (!sub) {
      sub = new Subscription(this, channel, { ...options });
      this.subs.set(channel, sub);
      send = true;
    } else if (options.presence && !sub.options.presence) {
      sub.options.presence = true;
      sub.upgrading = true;
      send = true;
    } else if (sub.confirmed) {
      return Promise.resolve(sub);
    }
    const s = sub;
    const p = new Promise<Subscription>((resolve, reject) => s.waiters.push({ resolve, reject }));
    if (send && this.st === 'connected') this.send([this.subscribeFrame(s)]);
    return p;
  }

  /** Unsubscribes from `channel` (nothing of it is delivered afterwards). */
  async unsubscribe(channel: string): Promise<void> {
    const sub = this.subs.get(channel);
    if (!sub) return;
    this.subs.delete(channel);
    sub.ended = true;
    for (const w of sub.waiters.splice(0)) w.reject(new TernError('unsubscribed', `${channel} was unsubscribed`));
    if (this.st === 'connected')
      await this.request('unsubscribe', () => ({ unsubscribe: { channel } })).catch(() => {});
  }

  /**
   * Publishes `data` to `channel`. Resolves with the ack; a publish interrupted by a drop is
   * sent again with the same id (so it is never doubled) until `requestTimeoutMs`. A refusal
   * or timeout is a {@link TernError} carrying the `messageId` to retry with.
   */
  async publish(channel: string, data: Payload, options: PublishOptions = {}): Promise<Ack> {
    const id = options.id ?? `${this.idPrefix}-${++this.nextId}`;
    const limits = this.info?.limits;
    const cut = channel.indexOf(':');
    const ns = limits?.namespaces.find((x) => cut > 0 && x.namespace === channel.slice(0, cut));
    const max = ns?.maxMessageBytes || limits?.maxMessageBytes || 0;
    const size = typeof data === 'string' ? new TextEncoder().encode(data).length : data.length;
    if (max > 0 && size > max) {
      // Refused here: sent, it would be refused by the node (or close the connection).
      const e = new TernError('ERROR_CODE_MESSAGE_TOO_LARGE', `payload is ${size} bytes; the limit is ${max}`);
      e.messageId = id;
      throw e;
    }
    const f: Record<string, unknown> = { channel, id, ...payloadFields(data) };
    if (options.name) f['name'] = options.name;
    if (options.durability === 'replicated') f['durability'] = 'DURABILITY_REPLICATED';
    const b = await this.request('publish', () => ({ publish: { ...f } }), { channel, messageId: id });
    return {
      channel: field.str(b['channel']),
      messageId: field.str(b['messageId']),
      origin: field.str(b['origin']),
      originEpoch: int64(b['originEpoch']),
      originSeq: int64(b['originSeq']),
      position: position(b['position']),
      timestampMs: field.num(b['timestampMs']),
      duplicate: field.bool(b['duplicate']),
    };
  }

  /**
   * Reads a page of `channel`'s history (newest first unless `forwards`). Offsets are one
   * node's: a read in flight when the connection drops rejects with `disconnected`, and
   * `next()` after the client moved to another node rejects likewise (start again from the
   * first page there).
   */
  async history(channel: string, query: HistoryQuery = {}): Promise<HistoryPage> {
    const f: Record<string, unknown> = { channel };
    if (query.limit) f['limit'] = query.limit;
    if (query.forwards) f['forwards'] = true;
    if (query.from !== undefined) f['from'] = query.from;
    if (query.to !== undefined) f['to'] = query.to;
    if (query.sinceMs !== undefined) f['sinceMs'] = String(query.sinceMs);
    if (query.untilMs !== undefined) f['untilMs'] = String(query.untilMs);
    const node = this.info?.node;
    const b = await this.request('history', () => ({ history: { ...f } }));
    const nextFrom = b['nextFrom'] === undefined ? undefined : int64(b['nextFrom']);
    const page: HistoryPage = {
      messages: field.list(b['messages']).map(message),
      next: () => {
        if (nextFrom === undefined) return Promise.resolve(undefined);
        if (this.info?.node !== node) {
          return Promise.reject(
            new TernError('disconnected', `the page came from ${String(node)}; the client is now on another node`),
          );
        }
        return this.history(channel, { ...query, from: nextFrom });
      },
    };
    if (nextFrom !== undefined) page.nextFrom = nextFrom;
    return page;
  }

  /** Presence: this client's member on a channel, and the channel's members. */
  readonly presence = {
    /** Enters (or updates) this connection's member; it is entered again after every reconnect. */
    enter: (channel: string, data?: Payload): Promise<void> =>
      this.presenceAction(channel, 'PRESENCE_ACTION_ENTER', data),
    /** Changes the member's data (entering it when absent). */
    update: (channel: string, data?: Payload): Promise<void> =>
      this.presenceAction(channel, 'PRESENCE_ACTION_UPDATE', data),
    /** Leaves the channel's presence. */
    leave: (channel: string): Promise<void> => this.presenceAction(channel, 'PRESENCE_ACTION_LEAVE'),
    /** Every member of the channel, as this node knows them (all pages). */
    get: async (channel: string): Promise<Member[]> => {
      const all: Member[] = [];
      let after = '';
      for (;;) {
        const a = after;
        const b = await this.request('presence', () => ({
          presence: { channel, action: 'PRESENCE_ACTION_GET', after: a },
        }));
        all.push(...field.list(b['members']).map(member));
        after = field.str(b['next']);
        if (after === '') return all;
      }
    },
  };

  /** Enter, update or leave; the member is kept for re-entering only once the node accepted it. */
  private async presenceAction(channel: string, action: string, data?: Payload): Promise<void> {
    await this.request('presence', () => ({ presence: { channel, action, ...payloadFields(data) } }));
    if (action === 'PRESENCE_ACTION_LEAVE') this.entered.delete(channel);
    else this.entered.set(channel, data);
  }

  /** Leaves every presence member, then closes the connection for good. */
  async close(): Promise<void> {
    if (this.st === 'closed') return;
    if (this.st === 'connected' && this.entered.size > 0) {
      const leaves = [...this.entered.keys()].map((c) => this.presence.leave(c).catch(() => {}));
      let t: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([Promise.all(leaves), new Promise((r) => (t = setTimeout(r, 2000)))]);
      clearTimeout(t);
    }
    this.setState('closed', 'closed by the application');
    this.stopTimers();
    this.link?.close();
    this.link = undefined;
    this.rejectAll(new TernError('closed', 'the client was closed'));
  }

  private stopTimers(): void {
    clearInterval(this.heartbeatTimer);
    clearInterval(this.sweepTimer);
    clearTimeout(this.renewTimer);
    clearTimeout(this.stableTimer);
    clearTimeout(this.pumpTimer);
    this.pumpTimer = undefined;
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
  }
}

/** A connection's limits (docs/protocol.md, `connected`). */
export interface Limits {
  maxMessageBytes: number;
  maxFrameBytes: number;
  publishRate: number;
  publishBurst: number;
  frameRate: number;
  frameBurst: number;
  namespaces: { namespace: string; publishRate: number; publishBurst: number; maxMessageBytes: number }[];
}

function limitsOf(v: unknown): Limits {
  const o = (v ?? {}) as Record<string, unknown>;
  const n = (k: string, dflt: number): number => field.num(o[k]) || dflt;
  return {
    maxMessageBytes: n('maxMessageBytes', 0),
    maxFrameBytes: n('maxFrameBytes', 0),
    publishRate: n('publishRate', 1e9),
    publishBurst: n('publishBurst', 1e9),
    frameRate: n('frameRate', 1e9),
    frameBurst: n('frameBurst', 1e9),
    namespaces: field.list(o['namespaces']).map((x) => {
      const ns = (x ?? {}) as Record<string, unknown>;
      return {
        namespace: field.str(ns['namespace']),
        publishRate: field.num(ns['publishRate']),
        publishBurst: field.num(ns['publishBurst']) || field.num(ns['publishRate']),
        maxMessageBytes: field.num(ns['maxMessageBytes']),
      };
    }),
  };
}
