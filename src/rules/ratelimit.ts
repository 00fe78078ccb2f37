/**
 * ratelimit — rate and concurrency limits with defined semantics, shared by every doorman
 * instance through the store (Redis), or per instance in memory (the default).
 *
 * Each entry of `limits` counts one thing per one key:
 *   count: connections   new sessions per window, checked at connect        → 421 4.7.0
 *          concurrency   sessions open at once, taken at connect and given
 *                        back at the end of the session (slots expire if an
 *                        instance dies)                                      → 421 4.7.0
 *          messages      mail per window, checked at RCPT so nothing is
 *                        accepted over the limit; `cost: message` counts one
 *                        per transaction (at its first recipient; every MAIL
 *                        starts a new one), `cost: recipient` one per
 *                        recipient                                           → 450 4.7.1
 *          auth_failures failed logins per window, checked at AUTH before the
 *                        backend sees it: each attempt takes a token, one that
 *                        succeeds gets it back (key client or login)         → 454 4.7.0
 *   key:   client (the client network: IPv6 by `ipv6Prefix`, default /64; IPv4 by `ipv4Prefix`,
 *          default /32), sender (the envelope sender, `<>` for bounces), sender_domain,
 *          recipient, login (authenticated sessions only; at AUTH the login an AUTH PLAIN
 *          initial response names).
 * A limit of N per window W is a token bucket of N tokens refilling at N/W (GCRA, one atomic Lua
 * script per check, keys that always expire): N events pass in a burst, then one every W/N. A
 * refused event costs nothing: neither one this rule refuses nor one another rule of the stage
 * refuses (greylisted, a DNSBL listing) — its tokens are refunded (Rule.refused). Replies are 4xx
 * only (never 5xx) and name no internal detail.
 * Store failure: the rule's error (thrown to the runner), so the rule file's `onError` decides:
 * pass (default; counted in doorman_store_fail_open_total) or tempfail, 451 4.3.0 (421 at
 * connect; counted in doorman_store_fail_closed_total). Checks never wait longer than the store's
 * command timeout. A concurrency slot is given back when the session ends, also one the store granted
 * after the rule's deadline or after the client left (SessionSnapshot.ended).
 * Bypassable: allowlisted sessions are not limited.
 * Metrics: doorman_ratelimit_exceeded_total{rule,limit}, doorman_rejections_total.
 */
import { z } from 'zod';
import { defineRuleType, onStages, PASS, type Finding, type ReplySpec } from '../pipeline/rule.js';
import type { SessionEvent, SessionSnapshot } from '../pipeline/events.js';
import { parseAddress } from '../net/ip.js';
import { clientKey } from './shared.js';
import type { ParsedPath } from '../protocol/address.js';
import type { LimitSpec } from '../store/store.js';

const limitSchema = z.strictObject({
  /** Name in logs, metrics and `doorman limits show`. */
  name: z.string().regex(/^[a-z0-9_-]+$/i),
  count: z.enum(['connections', 'concurrency', 'messages', 'auth_failures']),
  key: z.enum(['client', 'sender', 'sender_domain', 'recipient', 'login']).default('client'),
  limit: z.number().int().positive(),
  /** Window in ms (not used by concurrency). */
  window: z.number().int().positive().default(60_000),
  /** For messages: what one event costs. */
  cost: z.enum(['message', 'recipient']).default('message'),
}).refine((l) => l.count !== 'auth_failures' || l.key === 'client' || l.key === 'login', {
  message: 'auth_failures counts per client or login',
  path: ['key'],
});

const settings = z.strictObject({
  limits: z.array(limitSchema).min(1),
  ipv6Prefix: z.number().int().min(1).max(128).default(64),
  ipv4Prefix: z.number().int().min(1).max(32).default(32),
  /** Concurrency slots expire after this many ms unless the session refreshes them (at MAIL). */
  slotLifetime: z.number().int().positive().default(900_000),
});

type LimitCfg = z.output<typeof limitSchema>;
type Counted = 'connect' | 'auth' | 'rcpt';

/** The stage each kind of limit is checked and charged at. */
const STAGE_OF: Record<LimitCfg['count'], Counted> = { connections: 'connect', concurrency: 'connect', messages: 'rcpt', auth_failures: 'auth' };

/** Per session (runner-owned). */
interface State {
  readonly id: string;
  /**
   * Concurrency slots the session may hold — taken, being taken, or asked for by a command that
   * failed after it may have reached the store. All are given back at its end.
   */
  held: Set<string>;
  /**
   * Per-message charges of the current transaction: its number (SessionSnapshot.transaction) and
   * the keys charged for it. Keyed on the number, not on the stages this rule hears: each MAIL
   * starts a new transaction whatever the rule subscribes to.
   */
  charged: { txn: number; keys: Set<string> } | null;
  /**
   * The last AUTH attempt's tokens. Every attempt costs a token before it reaches the backend;
   * the one that succeeded (snapshot.auth set) is given back at the next event this rule hears
   * (MAIL, or the end of the session): only failures stay counted.
   */
  authAttempt: Spent | null;
}

/** Tokens one event took: given back when the event is refused (or, at AUTH, succeeds). */
interface Spent {
  refunded: boolean;
  charges: { l: LimitCfg; key: string }[];
}

const addr = (p: ParsedPath | null) => (!p || p.isNull ? '<>' : `${p.local.toLowerCase()}@${p.domain}`);

export const ratelimitRule = defineRuleType({
  type: 'ratelimit',
  description: 'Connection, concurrency, message and failed-login limits per client, sender, domain, recipient or login',
  settings,
  create(name, s, deps) {
    const stages = new Set<Counted | 'mail'>();
    for (const l of s.limits) {
      stages.add(STAGE_OF[l.count]);
      // mail: slots refreshed; a login that succeeded gets its AUTH token back.
      if (l.count === 'concurrency' || l.count === 'auth_failures') stages.add('mail');
    }
    if (!deps.checkOnly) {
      deps.metrics.failOpen.inc({ rule: name }, 0);
      deps.metrics.failClosed.inc({ rule: name }, 0);
      for (const l of s.limits) deps.metrics.rateLimited.inc({ rule: name, limit: l.name }, 0);
    }
    /** What each event was charged, until the stage's verdict is known (refused → refunded). */
    const spent = new WeakMap<SessionEvent, Spent>();
    const subject = (l: LimitCfg, ev: SessionEvent): string | null => {
      const sess = ev.session;
      switch (l.key) {
        case 'client':
          return clientKey(sess.client, s.ipv4Prefix, s.ipv6Prefix);
        case 'sender':
          return addr(ev.stage === 'rcpt' ? sess.sender : null);
        case 'sender_domain':
          return sess.sender && !sess.sender.isNull ? sess.sender.domain : '<>';
        case 'recipient':
          return ev.stage === 'rcpt' ? addr(ev.recipient) : null;
        case 'login':
          // At AUTH, the login the client names (AUTH PLAIN with an initial response), if any.
          return (ev.stage === 'auth' ? ev.login : sess.auth?.login)?.toLowerCase() ?? null;
      }
    };
    const keyOf = (l: LimitCfg, subj: string) => `rl:{${name}:${l.name}:${subj}}`;
    const OVER: Record<Counted, ReplySpec> = {
      connect: { code: 421, enhanced: '4.7.0', text: 'Error: too many connections, try again later' },
      // RFC 4954 §6: 454 is AUTH's temporary failure.
      auth: { code: 454, enhanced: '4.7.0', text: 'Temporary authentication failure, try again later' },
      rcpt: { code: 450, enhanced: '4.7.1', text: 'Error: too much mail, try again later' },
    };
    const over = (l: LimitCfg, stage: Counted): Finding => {
      deps.metrics.rateLimited.inc({ rule: name, limit: l.name });
      return { kind: 'tempfail', reason: `${l.name} exceeded`, reply: OVER[stage] };
    };
    /** A store failure is the rule's error: counted here (once per check), decided by onError. */
    const storeDown = (err: unknown): never => {
      (deps.onError === 'tempfail' ? deps.metrics.failClosed : deps.metrics.failOpen).inc({ rule: name });
      throw new Error(`store unavailable: ${(err as Error).message}`, { cause: err });
    };
    const op = (o: string) => deps.metrics.storeOps.inc({ op: o, store: deps.store.kind });

    const hasConcurrency = s.limits.some((l) => l.count === 'concurrency');
    /** Stages with nothing to do here answer at once (no Promise): the runner skips its timer. */
    const check = (ev: SessionEvent, st: State): Finding | Promise<Finding> => {
      if (ev.stage === 'mail') {
        loggedIn(ev.session, st);
        return hasConcurrency ? acquireSlots(ev, st) : PASS;
      }
      if (ev.stage !== 'connect' && ev.stage !== 'auth' && ev.stage !== 'rcpt') return PASS;
      // connect: connection and concurrency limits; auth: failed logins; rcpt: message limits.
      // Each key computed once.
      const stage = ev.stage;
      const due: { l: LimitCfg; key: string }[] = [];
      for (const l of s.limits) {
        if (STAGE_OF[l.count] !== stage) continue;
        const subj = subject(l, ev);
        if (subj !== null) due.push({ l, key: keyOf(l, subj) });
      }
      return due.length ? charge(ev, st, due, stage) : PASS;
    };
    /** The session is authenticated: the token its successful AUTH attempt took is given back. */
    const loggedIn = (session: SessionSnapshot, st: State): void => {
      const attempt = session.auth ? st.authAttempt : null;
      if (!attempt) return;
      st.authAttempt = null;
      giveBack(session, st, attempt);
    };
    /** The session's end: slots given back, all at once (one round trip); a failure only delays their expiry. */
    const release = (st: State): void => {
      const keys = st.held;
      st.held = new Set();
      for (const k of keys) void deps.store.release(k, st.id).catch(() => undefined);
    };
    /**
     * Takes (or refreshes) one slot; false when the limit is reached. The key is recorded before
     * the store is asked, so that the session's end gives it back even if the answer never came (a store
     * timeout after Redis ran the script). A slot whose answer arrives after the session ended —
     * the client left, or the rule's deadline passed and the session went on and ended — is given
     * back at once: none outlives its session.
     */
    const take = async (ev: SessionEvent, st: State, l: LimitCfg, key: string): Promise<boolean> => {
      const { id, ended } = ev.session;
      if (ended.aborted) return true;
      const keys = st.held;
      const had = keys.has(key);
      keys.add(key);
      op('acquire');
      try {
        const r = await deps.store.acquire(key, id, l.limit, s.slotLifetime);
        if (!r.ok && !had) keys.delete(key);
        return r.ok;
      } finally {
        if (ended.aborted) void deps.store.release(key, id).catch(() => undefined);
      }
    };
    /** mail: the session's slots refreshed (a long session keeps them); never refuses. */
    const acquireSlots = async (ev: SessionEvent, st: State): Promise<Finding> => {
      const keys = s.limits.flatMap((l) => {
        const subj = l.count === 'concurrency' ? subject(l, ev) : null;
        return subj === null ? [] : [{ l, key: keyOf(l, subj) }];
      });
      await Promise.all(keys.map(({ l, key }) => take(ev, st, l, key).catch(() => undefined)));
      return PASS;
    };
    /** All limits of a stage at once: with Redis they go out together, one round trip. */
    const charge = async (ev: SessionEvent, st: State, due: readonly { l: LimitCfg; key: string }[], stage: Counted): Promise<Finding> => {
      const { transaction, ended } = ev.session;
      const record: Spent = { refunded: false, charges: [] };
      const failures: unknown[] = [];
      spent.set(ev, record);
      if (stage === 'auth' && !ended.aborted) st.authAttempt = record;
      const outcomes = await Promise.all(
        due.map(async ({ l, key }): Promise<Finding> => {
          try {
            if (l.count === 'concurrency') return (await take(ev, st, l, key)) ? PASS : over(l, stage);
            // One charge per transaction and key when a message costs one (message limits only:
            // `cost` defaults to message for every count, and each AUTH attempt must cost a token).
            const perMessage = l.count === 'messages' && l.cost === 'message';
            if (perMessage && st.charged?.txn === transaction && st.charged.keys.has(key)) return PASS;
            op('rate');
            const r = await deps.store.rate(key, l.window, l.limit, 1);
            if (!r.allowed) return over(l, stage);
            // Refused meanwhile by another rule (an answer after the rule's deadline): given back.
            if (record.refunded) refund(ev.session, st, l, key);
            else record.charges.push({ l, key });
            if (perMessage && !record.refunded && !ended.aborted) {
              if (st.charged?.txn !== transaction) st.charged = { txn: transaction, keys: new Set() };
              st.charged.keys.add(key);
            }
            return PASS;
          } catch (err) {
            failures.push(err);
            return PASS;
          }
        }),
      );
      // A limit the store says is reached refuses; else a store failure is the rule's error.
      const refusal = outcomes.find((f) => f.kind !== 'pass');
      if (refusal) return refusal;
      if (failures.length) storeDown(failures[0]);
      return PASS;
    };
    /** One token given back (atomically in the store), and the transaction's charge forgotten. */
    const refund = (session: SessionSnapshot, st: State, l: LimitCfg, key: string): void => {
      if (st.charged?.txn === session.transaction) st.charged.keys.delete(key);
      op('refund');
      deps.store.rate(key, l.window, l.limit, -1).catch(() => undefined);
    };
    /** The stage refused the event (greylisted, another limit, a DNSBL…): its tokens come back. */
    const refused = (ev: SessionEvent, st: State): void => {
      const record = spent.get(ev);
      if (record) giveBack(ev.session, st, record);
    };
    const giveBack = (session: SessionSnapshot, st: State, record: Spent): void => {
      if (record.refunded) return;
      record.refunded = true;
      for (const { l, key } of record.charges) refund(session, st, l, key);
      record.charges = [];
    };

    return {
      name,
      type: 'ratelimit',
      bypassable: true,
      checks: onStages([...stages], check),
      session: (snapshot): State => ({ id: snapshot.id, held: new Set(), charged: null, authAttempt: null }),
      // The session's end: a successful login's token and every slot given back.
      end(st: State, snapshot) {
        loggedIn(snapshot, st);
        release(st);
      },
      refused,
      admin: (args: readonly string[]) => adminKey(name, s.limits, args, keyOf, s.ipv4Prefix, s.ipv6Prefix),
    };
  },
});

/** `doorman limits show|reset <rule> <limit> <subject>`: the store key, or why not. */
function adminKey(
  rule: string,
  limits: readonly LimitCfg[],
  args: readonly string[],
  keyOf: (l: LimitCfg, subj: string) => string,
  v4: number,
  v6: number,
): { key: string; describe: string; spec: LimitSpec } | string {
  const [limitName, subj] = args;
  const l = limits.find((x) => x.name === limitName);
  if (!l) return `rule ${rule} has no limit "${limitName ?? ''}" (limits: ${limits.map((x) => x.name).join(', ')})`;
  if (!subj) return `usage: doorman limits show|reset ${rule} ${l.name} <${l.key}>`;
  let value = subj.toLowerCase();
  if (l.key === 'client') {
    try {
      value = clientKey(parseAddress(subj), v4, v6);
    } catch {
      return `not an IP address: ${subj}`;
    }
  }
  const spec: LimitSpec = l.count === 'concurrency' ? { kind: 'concurrency', limit: l.limit } : { kind: 'rate', limit: l.limit, windowMs: l.window };
  return { key: keyOf(l, value), describe: `${l.name}: ${l.count} per ${l.key} ${value}`, spec };
}
