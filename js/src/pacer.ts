/**
 * Pacing: token buckets that keep a client under the node's limits (`connected.limits`):
 * every frame counts against `frameRate`/`frameBurst` (beyond them the node closes the
 * connection with 4004), every publish against `publishRate`/`publishBurst` (or its
 * namespace's). The client runs at 90 % of each rate with half of each burst, as the Rust
 * SDK does, so that network bunching does not push it over.
 * @module
 */

/** A token bucket: `capacity` at once, then `rate` per second. */
export class Bucket {
  private tokens: number;
  private at: number;

  constructor(
    readonly rate: number,
    readonly capacity: number,
    now: number,
  ) {
    this.tokens = capacity;
    this.at = now;
  }

  /** A bucket at 90 % of `rate` with half of `burst` (at least 1 of each). */
  static paced(rate: number, burst: number, now: number): Bucket {
    return new Bucket(Math.max(1, rate * 0.9), Math.max(1, Math.floor(burst / 2)), now);
  }

  private refill(now: number): void {
    this.tokens = Math.min(this.capacity, this.tokens + ((now - this.at) / 1000) * this.rate);
    this.at = now;
  }

  /** Milliseconds until a token is there (0: now). */
  wait(now: number): number {
    this.refill(now);
    return this.tokens >= 1 ? 0 : Math.ceil(((1 - this.tokens) / this.rate) * 1000);
  }

  /** Takes a token (call when `wait` said 0). */
  take(now: number): void {
    this.refill(now);
    this.tokens -= 1;
  }
}
