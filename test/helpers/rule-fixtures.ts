/**
 * What a rule's unit test needs, once: a resolver that must not be used, RuleDeps with test
 * defaults, a parsed path, a session snapshot with test defaults, and a virtual clock for the
 * MemoryStore.
 */
import type { DnsResolver } from '../../src/net/dns.js';
import { parseAddress } from '../../src/net/ip.js';
import type { SessionSnapshot } from '../../src/pipeline/events.js';
import type { RuleDeps } from '../../src/pipeline/rule.js';
import { createMetrics } from '../../src/metrics/registry.js';
import { parsePath, type ParsedPath } from '../../src/protocol/address.js';
import { MemoryStore } from '../../src/store/store.js';

/** A resolver for rules that must not look anything up: every call rejects. */
export const noDns: DnsResolver = {
  servers: [],
  resolve: () => Promise.reject(new Error('unused')),
  resolveA: () => Promise.reject(new Error('unused')),
  resolveAAAA: () => Promise.reject(new Error('unused')),
  reverse: () => Promise.reject(new Error('unused')),
};

/** RuleDeps for a unit test: no DNS, a fresh MemoryStore, a fresh registry, a silent log, time 0. */
export function ruleDeps(over: Partial<RuleDeps> = {}): RuleDeps {
  return {
    ownNames: ['mx.test'],
    ownAddresses: [],
    resolver: noDns,
    store: new MemoryStore(),
    metrics: createMetrics({ version: 't', defaults: false }),
    log: { warn: () => undefined, info: () => undefined },
    now: () => 0,
    checkOnly: true,
    ...over,
  };
}

/** A path as the session parses it (throws on bad syntax: a test's own mistake). */
export function pathOf(raw: string): ParsedPath {
  const r = parsePath(raw);
  if (!r.ok) throw new Error(`${raw}: ${r.reason}`);
  return r.path;
}

/** A session snapshot: an outside client on port 25, nothing said yet, unless `over` says so. */
export function snapshot(over: Partial<Omit<SessionSnapshot, 'client'>> & { ip?: string } = {}): SessionSnapshot {
  const { ip, ...rest } = over;
  return {
    id: 's',
    client: parseAddress(ip ?? '192.0.2.5'),
    clientPort: 1,
    listener: { name: 'l', role: 'smtp' },
    localAddress: '127.0.0.1',
    tls: false,
    helo: null,
    esmtp: false,
    auth: null,
    transaction: 0,
    sender: null,
    recipients: [],
    recipientsForwarded: 0,
    acceptedBy: null,
    ended: new AbortController().signal,
    ...rest,
  };
}

/**
 * A virtual clock for the store. MemoryStore's LRU cache memoises its clock for 1 ms of real time
 * (lru-cache ttlResolution), so each step also lets 2 real ms pass before the next read.
 */
export function clock(start = 1_000_000_000) {
  let t = start;
  return {
    now: () => t,
    advance: async (ms: number) => {
      t += ms;
      await new Promise((r) => setTimeout(r, 2));
    },
  };
}
