/**
 * dns-cache.ts — answers kept for the next session, and lookups in flight shared.
 *
 * Every session of a client asks the same questions: its PTR and the A records of that name
 * (fcrdns), the sender domain's SPF and DMARC records (spf, dmarc), for every message. A local
 * recursive resolver answers them from its cache too, but each still costs doorman a UDP round
 * trip, a c-ares callback and a Promise. Answers are kept here, bounded in count (least recently
 * used out) and in time:
 *   - A and AAAA for their own TTL (the smallest of the set), at most `maxTtl`, handed out with
 *     the TTLs that are left (a rule with a cache of its own, dnsbl, keeps them no longer);
 *   - other types (TXT, PTR, MX, …) for `maxTtl`: Node's resolver does not report their TTL, so
 *     the bound is what an operator accepts as the delay before a changed record is seen;
 *   - "no such name" and "no such record" (ENOTFOUND, ENODATA) as the other types (RFC 2308);
 *   - never a failure (timeout, SERVFAIL, refused): the next session asks again.
 * Identical lookups in flight share one query. Hits are counted in doorman_dns_cache_hits_total.
 */
import { LRUCache } from 'lru-cache';
import { isNoRecord, type DnsResolver } from './dns.js';

export interface DnsCacheOptions {
  /** Answers kept at most (0: no cache, nothing shared). */
  size: number;
  /** Longest time an answer is kept, seconds. */
  maxTtl: number;
  /** Called for each answer served from the cache or shared with a lookup in flight. */
  onHit?: () => void;
  /** The clock, ms (tests). */
  now?: () => number;
}

/** An answer and when it came (the clock's ms), or a "no such name/record". */
type Entry = { value: unknown; at: number } | { error: unknown };

export function cachingResolver(inner: DnsResolver, opts: DnsCacheOptions): DnsResolver {
  if (opts.size <= 0 || opts.maxTtl <= 0) return inner;
  const maxMs = opts.maxTtl * 1000;
  // ttlResolution 0: each read asks the clock (lru-cache otherwise reuses a recent reading).
  const now = opts.now;
  const clock = now ?? (() => performance.now());
  const answers = new LRUCache<string, Entry>({ max: opts.size, ttlAutopurge: false, ...(now ? { ttlResolution: 0, perf: { now } } : {}) });
  const inFlight = new Map<string, Promise<unknown>>();

  /** `copy` gets the answer and its age, ms (0 for a lookup in flight), and makes the caller's copy. */
  function cached<T>(key: string, ask: () => Promise<T>, ttlOf: (value: T) => number, copy: (value: T, ageMs: number) => T): Promise<T> {
    const hit = answers.get(key);
    if (hit) {
      opts.onHit?.();
      return 'value' in hit ? Promise.resolve(copy(hit.value as T, clock() - hit.at)) : Promise.reject(hit.error);
    }
    const flying = inFlight.get(key) as Promise<T> | undefined;
    if (flying) {
      opts.onHit?.();
      return flying.then((v) => copy(v, 0));
    }
    const p = ask().then(
      (value) => {
        inFlight.delete(key);
        const ttl = Math.min(ttlOf(value), maxMs);
        if (ttl > 0) answers.set(key, { value, at: clock() }, { ttl });
        return value;
      },
      (error: unknown) => {
        inFlight.delete(key);
        if (isNoRecord(error)) answers.set(key, { error }, { ttl: maxMs });
        throw error;
      },
    );
    inFlight.set(key, p);
    return p.then((v) => copy(v, 0));
  }

  const whole = () => maxMs;
  const byRecords = (rs: { ttl: number }[]) => (rs.length ? Math.min(...rs.map((r) => r.ttl)) * 1000 : maxMs);
  const list = <T>(v: T[]): T[] => v.slice();
  const aged = (rs: { address: string; ttl: number }[], ageMs: number) => rs.map((r) => ({ address: r.address, ttl: Math.max(0, r.ttl - Math.floor(ageMs / 1000)) }));
  return {
    servers: inner.servers,
    resolve: (name, rrtype) => cached(`${rrtype} ${name.toLowerCase()}`, () => inner.resolve(name, rrtype), whole, list as (v: string[] | string[][]) => string[] | string[][]),
    resolveA: (name) => cached(`A+ttl ${name.toLowerCase()}`, () => inner.resolveA(name), byRecords, aged),
    resolveAAAA: (name) => cached(`AAAA+ttl ${name.toLowerCase()}`, () => inner.resolveAAAA(name), byRecords, aged),
    reverse: (ip) => cached(`PTR ${ip}`, () => inner.reverse(ip), whole, list),
  };
}
