/**
 * Nearest region: the regions a node lists at `/v1/regions`, ranked by the round trip of
 * `/v1/ping` probes (a node that answers 503, still catching up, comes last).
 * @module
 */

/** A region and its public URL, as `/v1/regions` lists them. */
export interface Region {
  region: string;
  url: string;
}

/** A probed region: its median round trip in ms (Infinity: did not answer 204). */
export interface Probe extends Region {
  rttMs: number;
}

/** The http(s) base of a ws(s) or http(s) URL, without path or trailing slash. */
export function httpBase(url: string): string {
  const u = new URL(url.replace(/^ws/, 'http'));
  return `${u.protocol}//${u.host}`;
}

async function timed<T>(ms: number, f: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const c = new AbortController();
  const t = setTimeout(() => c.abort(), ms);
  try {
    return await f(c.signal);
  } finally {
    clearTimeout(t);
  }
}

/** Reads the regions a node lists (`seed`: any node's URL). */
export async function regions(seed: string, timeoutMs = 5000): Promise<Region[]> {
  return timed(timeoutMs, async (signal) => {
    const r = await fetch(`${httpBase(seed)}/v1/regions`, { signal, cache: 'no-store' });
    if (!r.ok) throw new Error(`${seed}/v1/regions answered ${r.status}`);
    const body = (await r.json()) as { regions?: Region[] };
    return (body.regions ?? []).filter((x) => typeof x.url === 'string');
  });
}

/** One probe's round trip in ms, or Infinity. */
export async function ping(url: string, timeoutMs = 2000): Promise<number> {
  const start = performance.now();
  try {
    const r = await timed(timeoutMs, (signal) => fetch(`${httpBase(url)}/v1/ping`, { signal, cache: 'no-store' }));
    return r.status === 204 ? performance.now() - start : Infinity;
  } catch {
    return Infinity;
  }
}

/** Ranks regions by the median of `probes` round trips each, fastest first. */
export async function rank(list: Region[], probes = 3, timeoutMs = 2000): Promise<Probe[]> {
  const probed = await Promise.all(
    list.map(async (r) => {
      const rtts: number[] = [];
      for (let i = 0; i < probes; i++) rtts.push(await ping(r.url, timeoutMs));
      rtts.sort((a, b) => a - b);
      return { ...r, rttMs: rtts[Math.floor(rtts.length / 2)] ?? Infinity };
    }),
  );
  return probed.sort((a, b) => a.rttMs - b.rttMs);
}
