/**
 * Resume bookkeeping for one subscription (docs/protocol.md, "Resume"): the node that
 * delivered the last message and its position there, the per-origin vector, and the ids
 * delivered recently. What the vector covers is a repeat and is dropped.
 * @module
 */

import type { Message, OriginPosition, Position } from './codec.js';

interface Entry {
  epoch: bigint;
  seq: bigint;
}

/** The `resume` field of a `subscribe`. */
export interface ResumeRequest {
  node: string;
  position: Position;
  origins: OriginPosition[];
}

/** The most origins a vector may list (more is `ERROR_CODE_INVALID_ARGUMENT`). */
export const MAX_ORIGINS = 256;

/** Where a subscription stands: enough to resume it on any node. */
export class Cursor {
  /** The node that delivered the last message (or confirmed the subscription). */
  node = '';
  /** That message's position on `node`. */
  position: Position | undefined;
  private readonly origins = new Map<string, Entry>();
  /** Whether the subscription was confirmed at least once (the vector is known). */
  known = false;

  /** A fresh (not resumed) `subscribed`: the stream starts at the node's vector. */
  start(node: string, position: Position, origins: OriginPosition[]): void {
    this.node = node;
    this.position = position;
    this.origins.clear();
    for (const o of origins) this.origins.set(o.origin, { epoch: BigInt(o.epoch), seq: BigInt(o.seq) });
    this.known = true;
  }

  /** Whether the client already had `m` (a repeat after a resume or failover). */
  covers(m: Message): boolean {
    const e = this.origins.get(m.origin);
    if (!e) return false;
    const epoch = BigInt(m.originEpoch);
    return epoch < e.epoch || (epoch === e.epoch && BigInt(m.originSeq) <= e.seq);
  }

  /**
   * Records `m`, delivered by `node`. Returns false (and records nothing) when the vector
   * covers it: drop it.
   */
  advance(node: string, m: Message): boolean {
    if (this.covers(m)) return false;
    this.origins.set(m.origin, { epoch: BigInt(m.originEpoch), seq: BigInt(m.originSeq) });
    this.node = node;
    this.position = m.position;
    return true;
  }

  /** The vector, as a `resume` lists it (at most MAX_ORIGINS: the most recent epochs). */
  vector(): OriginPosition[] {
    const all = [...this.origins].map(([origin, e]) => ({ origin, epoch: e.epoch.toString(), seq: e.seq.toString() }));
    if (all.length <= MAX_ORIGINS) return all;
    return all.sort((a, b) => (BigInt(b.epoch) > BigInt(a.epoch) ? 1 : -1)).slice(0, MAX_ORIGINS);
  }

  /** The `resume` to send after a reconnect, or undefined before the first confirmation. */
  resume(): ResumeRequest | undefined {
    if (!this.known || !this.position) return undefined;
    return { node: this.node, position: this.position, origins: this.vector() };
  }
}

/**
 * Message ids delivered recently, so that a publish retried after a failover that comes
 * again as a new message (its first copy delivered, its ack lost) is dropped. Bounded by
 * count and age.
 */
export class RecentIds {
  private readonly seen = new Map<string, number>();

  constructor(
    private readonly max = 10_000,
    private readonly windowMs = 120_000,
  ) {}

  /** Remembers `id`; false when it was seen within the window. Empty ids are always new. */
  insert(id: string, now: number): boolean {
    if (id === '') return true;
    for (const [old, at] of this.seen) {
      if (this.seen.size < this.max && now - at < this.windowMs) break;
      this.seen.delete(old);
    }
    if (this.seen.has(id)) return false;
    this.seen.set(id, now);
    return true;
  }

  get size(): number {
    return this.seen.size;
  }
}
