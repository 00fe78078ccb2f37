/**
 * What a rule's unit test needs, once: a resolver that must not be used, RuleDeps with test
 * defaults, a parsed path, a session snapshot with test defaults, a virtual clock for the
 * MemoryStore, and a rule driven the way the runner drives it (its per-session state included).
 */
import type { DnsResolver } from '../../src/net/dns.js';
import { parseAddress } from '../../src/net/ip.js';
import type { SessionEvent, SessionSnapshot } from '../../src/pipeline/events.js';
import { PASS, type FindingResult, type Rule, type RuleDeps } from '../../src/pipeline/rule.js';
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
    authResults: [],
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

/** Per rule, per session id: the state the runner would own. */
const states = new WeakMap<Rule, Map<string, unknown>>();

function stateOf(rule: Rule, snap: SessionSnapshot): unknown {
  if (!rule.session) return undefined;
  let m = states.get(rule);
  if (!m) states.set(rule, (m = new Map()));
  if (!m.has(snap.id)) m.set(snap.id, rule.session(snap));
  return m.get(snap.id);
}

type Fn = (ev: SessionEvent, state: unknown) => FindingResult | void;

/**
 * One event through a rule as the runner takes it: the early start of its stage, then its check
 * (PASS for a stage it does not check), with the rule's state for the session (the snapshot's id),
 * created on first use.
 */
export function checkRule(rule: Rule, ev: SessionEvent): FindingResult {
  const start = (rule.starts as Record<string, Fn | undefined> | undefined)?.[ev.stage];
  if (start) start.call(rule.starts, ev, stateOf(rule, ev.session));
  const check = (rule.checks as Record<string, Fn | undefined>)[ev.stage];
  return check ? (check.call(rule.checks, ev, stateOf(rule, ev.session)) as FindingResult) : PASS;
}

/** The stage refused `ev` (Rule.refused), with the session's state. */
export function refuseRule(rule: Rule, ev: SessionEvent): void {
  rule.refused?.(ev, stateOf(rule, ev.session));
}

/** The session ended: the rule's end hook if its state was created (once), and the state dropped. */
export function endSession(rule: Rule, snap: SessionSnapshot): boolean {
  const m = states.get(rule);
  if (!m?.has(snap.id)) return false;
  const st = m.get(snap.id);
  m.delete(snap.id);
  rule.end?.(st, snap);
  return true;
}

/** Sessions of `rule` whose state is alive. */
export function liveStates(rule: Rule): number {
  return states.get(rule)?.size ?? 0;
}

/** Only the early start of the event's stage (Rule.starts), with the session's state. */
export function startRule(rule: Rule, ev: SessionEvent): void {
  const start = (rule.starts as Record<string, Fn | undefined> | undefined)?.[ev.stage];
  if (start) start.call(rule.starts, ev, stateOf(rule, ev.session));
}
