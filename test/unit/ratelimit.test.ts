/**
 * The ratelimit rule with the real MemoryStore on a virtual clock: each kind of limit at its stage
 * with its reply, the keys, per-message and per-recipient costs, refunds of refused events
 * (Rule.refused) and of successful logins, concurrency slots given back at the end of a session,
 * and store failures (the rule's error: the runner applies the file's `onError`).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ratelimitRule } from '../../src/rules/ratelimit.js';
import type { SessionEvent, SessionSnapshot } from '../../src/pipeline/events.js';
import { stagesOf, type Finding, type Rule, type RuleDeps } from '../../src/pipeline/rule.js';
import { createMetrics } from '../../src/metrics/registry.js';
import { MemoryStore, type Store } from '../../src/store/store.js';
import { checkRule, endSession, liveStates, noDns, pathOf, clock, refuseRule, ruleDeps, snapshot } from '../helpers/rule-fixtures.js';

interface Sess {
  id?: string;
  ip?: string;
  login?: string;
  from?: string;
  txn?: number;
  ended?: AbortSignal;
}
const snap = (o: Sess = {}): SessionSnapshot =>
  snapshot({
    id: o.id ?? 's1', ip: o.ip ?? '192.0.2.5', helo: 'mail.example.org', esmtp: true, auth: o.login ? { mechanism: 'PLAIN', login: o.login } : null,
    transaction: o.txn ?? 0, sender: o.from === undefined ? null : pathOf(o.from), ended: o.ended ?? new AbortController().signal,
  });
let sessions = 0;
/** A new session (its own id) unless one is named. */
const connect = (o: Sess = {}): SessionEvent => ({ stage: 'connect', session: snap({ id: `c${++sessions}`, ...o }) });
/** An AUTH attempt, each in a session of its own unless one is named. */
const auth = (login: string | null, o: Sess = {}): SessionEvent => ({ stage: 'auth', session: snap({ id: `a${++sessions}`, ...o }), mechanism: 'PLAIN', login });
const mail = (o: Sess = {}): SessionEvent => ({ stage: 'mail', session: snap({ from: 'alice@example.org', txn: 1, ...o }), sender: pathOf(o.from ?? 'alice@example.org'), params: [] });
const rcpt = (to: string, o: Sess = {}): SessionEvent => ({ stage: 'rcpt', session: snap({ from: 'alice@example.org', txn: 1, ...o }), recipient: pathOf(to), params: [] });
const quit = (o: Sess = {}): SessionEvent => ({ stage: 'quit', session: snap(o), reason: 'QUIT' });

function setup(settings: Record<string, unknown>, store?: Store, onError?: 'pass' | 'tempfail') {
  const c = clock();
  const st = store ?? new MemoryStore(c.now);
  const d: RuleDeps = { ownNames: ['mx.test'], ownAddresses: [], resolver: noDns, store: st, metrics: createMetrics({ version: 't', defaults: false }), log: { warn: () => undefined, info: () => undefined }, now: c.now, ...(onError ? { onError } : {}) };
  const rule = ratelimitRule.create('rl', ratelimitRule.settings.parse(settings), d);
  /** An event as the runner takes it; quit: the session's end (the rule's end hook), its releases landed. */
  const check = async (ev: SessionEvent): Promise<Finding> => {
    if (ev.stage !== 'quit') return checkRule(rule, ev) as Finding | Promise<Finding>;
    endSession(rule, ev.session);
    await settle();
    return { kind: 'pass' };
  };
  const kinds = async (evs: SessionEvent[]) => {
    const out: string[] = [];
    for (const ev of evs) out.push((await check(ev)).kind);
    return out;
  };
  return { c, rule, check, kinds, store: st, metrics: d.metrics };
}

/** Lets fire-and-forget refunds (a store call not awaited by the rule) land. */
const settle = () => new Promise((r) => setImmediate(r));

const TOO_MANY_CONN = { code: 421, enhanced: '4.7.0', text: 'Error: too many connections, try again later' };
const TOO_MUCH_MAIL = { code: 450, enhanced: '4.7.1', text: 'Error: too much mail, try again later' };
const AUTH_OVER = { code: 454, enhanced: '4.7.0', text: 'Temporary authentication failure, try again later' };

test('stages follow the limits: connect/auth/rcpt, mail for slots and logins, always an end hook (quit)', () => {
  const conn = setup({ limits: [{ name: 'c', count: 'connections', limit: 1 }] }).rule;
  assert.deepEqual([...stagesOf(conn)].sort(), ['connect', 'quit']);
  assert.deepEqual(Object.keys(conn.checks), ['connect'], 'no quit check: the end hook gives back');
  const all = setup({ limits: [{ name: 'cc', count: 'concurrency', limit: 1 }, { name: 'm', count: 'messages', limit: 1 }, { name: 'a', count: 'auth_failures', limit: 1 }] }).rule;
  assert.deepEqual([...stagesOf(all)].sort(), ['auth', 'connect', 'mail', 'quit', 'rcpt']);
  assert.equal(all.bypassable, true);
});

test('settings: auth_failures counts only per client or login; limits must not be empty', () => {
  assert.equal(ratelimitRule.settings.safeParse({ limits: [] }).success, false);
  assert.equal(ratelimitRule.settings.safeParse({ limits: [{ name: 'a', count: 'auth_failures', key: 'sender', limit: 1 }] }).success, false);
  assert.equal(ratelimitRule.settings.safeParse({ limits: [{ name: 'a', count: 'auth_failures', key: 'login', limit: 1 }] }).success, true);
});

test('connections: N per window in a burst, then one every window/N; 421 4.7.0 over the limit', async () => {
  const { c, check, kinds, metrics } = setup({ limits: [{ name: 'conn', count: 'connections', limit: 3, window: 60_000 }] });
  assert.deepEqual(await kinds([connect(), connect(), connect()]), ['pass', 'pass', 'pass']);
  assert.deepEqual(await check(connect()), { kind: 'tempfail', reason: 'conn exceeded', reply: TOO_MANY_CONN });
  assert.equal((await metrics.rateLimited.get()).values.find((v) => v.labels.limit === 'conn')?.value, 1);
  await c.advance(19_999);
  assert.equal((await check(connect())).kind, 'tempfail');
  await c.advance(1);
  assert.deepEqual(await kinds([connect(), connect()]), ['pass', 'tempfail'], 'one token back after window/limit');
  assert.equal((await check(connect({ ip: '192.0.2.6' }))).kind, 'pass', 'another client has its own bucket');
});

test('client key: IPv6 by ipv6Prefix (default /64), IPv4 by ipv4Prefix (default /32)', async () => {
  const def = setup({ limits: [{ name: 'conn', count: 'connections', limit: 1 }] });
  assert.deepEqual(await def.kinds([connect({ ip: '2001:db8:1:2::1' }), connect({ ip: '2001:db8:1:2:ffff::9' }), connect({ ip: '2001:db8:1:3::1' })]), ['pass', 'tempfail', 'pass']);
  assert.deepEqual(await def.kinds([connect({ ip: '192.0.2.1' }), connect({ ip: '192.0.2.2' })]), ['pass', 'pass']);
  const wide = setup({ limits: [{ name: 'conn', count: 'connections', limit: 1 }], ipv4Prefix: 24, ipv6Prefix: 128 });
  assert.deepEqual(await wide.kinds([connect({ ip: '192.0.2.1' }), connect({ ip: '192.0.2.2' }), connect({ ip: '192.0.3.1' })]), ['pass', 'tempfail', 'pass']);
  assert.deepEqual(await wide.kinds([connect({ ip: '2001:db8::1' }), connect({ ip: '2001:db8::2' })]), ['pass', 'pass']);
});

test('concurrency: slots taken at connect, given back at quit; 421 4.7.0 when all are taken', async () => {
  const { check, store } = setup({ limits: [{ name: 'cc', count: 'concurrency', limit: 2 }] });
  assert.equal((await check(connect({ id: 'a' }))).kind, 'pass');
  assert.equal((await check(connect({ id: 'b' }))).kind, 'pass');
  assert.deepEqual(await check(connect({ id: 'c' })), { kind: 'tempfail', reason: 'cc exceeded', reply: TOO_MANY_CONN });
  assert.equal((await check(mail({ id: 'a' }))).kind, 'pass', 'MAIL refreshes a slot, never refuses');
  assert.deepEqual((await store.inspect('rl:{rl:cc:192.0.2.5}')).state, { type: 'slots', tokens: ['a', 'b'], ttlMs: 900_000 });
  await check(quit({ id: 'a' }));
  assert.deepEqual((await store.inspect('rl:{rl:cc:192.0.2.5}')).state, { type: 'slots', tokens: ['b'], ttlMs: 900_000 });
  assert.equal((await check(connect({ id: 'd' }))).kind, 'pass');
});

test('concurrency: slots expire after slotLifetime unless refreshed at MAIL', async () => {
  const { c, check } = setup({ limits: [{ name: 'cc', count: 'concurrency', limit: 1 }], slotLifetime: 10_000 });
  assert.equal((await check(connect({ id: 'a' }))).kind, 'pass');
  await c.advance(8_000);
  await check(mail({ id: 'a' }));
  await c.advance(8_000);
  assert.equal((await check(connect({ id: 'b' }))).kind, 'tempfail', 'refreshed at MAIL');
  await c.advance(2_001);
  assert.equal((await check(connect({ id: 'b' }))).kind, 'pass', 'a dead instance\'s slot expires');
});

test('concurrency: a slot granted after the session ended is given back at once', async () => {
  const { check, store } = setup({ limits: [{ name: 'cc', count: 'concurrency', limit: 1 }] });
  const gone = new AbortController();
  const p = check(connect({ id: 'a', ended: gone.signal }));
  gone.abort();
  await p;
  await settle();
  assert.equal((await store.inspect('rl:{rl:cc:192.0.2.5}')).state, null);
  assert.equal((await check(connect({ id: 'b' }))).kind, 'pass');
});

test('messages, cost message: one token per transaction at its first recipient; 450 4.7.1', async () => {
  const { check, kinds } = setup({ limits: [{ name: 'msg', count: 'messages', limit: 2 }] });
  assert.deepEqual(await kinds([rcpt('a@x.test'), rcpt('b@x.test'), rcpt('c@x.test')]), ['pass', 'pass', 'pass'], 'one transaction, one token');
  assert.equal((await check(rcpt('a@x.test', { txn: 2 }))).kind, 'pass');
  assert.deepEqual(await check(rcpt('a@x.test', { txn: 3 })), { kind: 'tempfail', reason: 'msg exceeded', reply: TOO_MUCH_MAIL });
});

test('messages, cost recipient: one token per recipient', async () => {
  const { kinds } = setup({ limits: [{ name: 'msg', count: 'messages', limit: 2, cost: 'recipient' }] });
  assert.deepEqual(await kinds([rcpt('a@x.test'), rcpt('b@x.test'), rcpt('c@x.test')]), ['pass', 'pass', 'tempfail']);
});

test('keys: sender, sender_domain (<> for bounces) and recipient', async () => {
  const sender = setup({ limits: [{ name: 'm', count: 'messages', key: 'sender', limit: 1, cost: 'recipient' }] });
  assert.deepEqual(
    await sender.kinds([rcpt('a@x.test', { from: 'Alice@example.org' }), rcpt('a@x.test', { from: 'alice@example.org' }), rcpt('a@x.test', { from: 'bob@example.org' }), rcpt('a@x.test', { from: '' }), rcpt('b@x.test', { from: '' })]),
    ['pass', 'tempfail', 'pass', 'pass', 'tempfail'],
  );
  const dom = setup({ limits: [{ name: 'm', count: 'messages', key: 'sender_domain', limit: 1, cost: 'recipient' }] });
  assert.deepEqual(await dom.kinds([rcpt('a@x.test', { from: 'a@example.org' }), rcpt('a@x.test', { from: 'b@example.org' }), rcpt('a@x.test', { from: 'a@example.com' })]), ['pass', 'tempfail', 'pass']);
  assert.equal(await dom.store.inspect('rl:{rl:m:example.org}').then((e) => e.state?.type), 'bucket');
  const to = setup({ limits: [{ name: 'm', count: 'messages', key: 'recipient', limit: 1, cost: 'recipient' }] });
  assert.deepEqual(await to.kinds([rcpt('a@x.test', { ip: '192.0.2.1' }), rcpt('A@x.test', { ip: '192.0.2.2' }), rcpt('b@x.test')]), ['pass', 'tempfail', 'pass']);
});

test('login key: only authenticated sessions are counted', async () => {
  const { kinds } = setup({ limits: [{ name: 'm', count: 'messages', key: 'login', limit: 1, cost: 'recipient' }] });
  assert.deepEqual(await kinds([rcpt('a@x.test'), rcpt('b@x.test'), rcpt('c@x.test')]), ['pass', 'pass', 'pass'], 'no login: not limited');
  assert.deepEqual(await kinds([rcpt('a@x.test', { login: 'U' }), rcpt('b@x.test', { login: 'u', ip: '198.51.100.1' })]), ['pass', 'tempfail']);
});

test('a refused event costs nothing: Rule.refused gives its tokens back', async () => {
  const { check, rule } = setup({ limits: [{ name: 'msg', count: 'messages', limit: 1 }] });
  const first = rcpt('a@x.test');
  assert.equal((await check(first)).kind, 'pass');
  refuseRule(rule, first); // say, greylisted by another rule of the stage
  refuseRule(rule, first); // once only
  await settle();
  const retry = rcpt('a@x.test', { txn: 2 });
  assert.equal((await check(retry)).kind, 'pass', 'the refunded token is spent again');
  assert.equal((await check(rcpt('a@x.test', { txn: 3 }))).kind, 'tempfail', 'a double refund never raises the limit');
});

test('a refund forgets the transaction\'s charge: its next recipient is charged again', async () => {
  const { check, rule } = setup({ limits: [{ name: 'msg', count: 'messages', limit: 2 }] });
  const first = rcpt('a@x.test');
  await check(first);
  refuseRule(rule, first);
  await settle();
  assert.equal((await check(rcpt('b@x.test'))).kind, 'pass');
  assert.equal((await check(rcpt('c@x.test', { txn: 2 }))).kind, 'pass');
  assert.equal((await check(rcpt('d@x.test', { txn: 3 }))).kind, 'tempfail', 'exactly two charged: b (txn 1) and c (txn 2)');
});

test('auth_failures: every attempt takes a token; 454 4.7.0 over the limit; a success gets it back', async () => {
  const { check, kinds } = setup({ limits: [{ name: 'af', count: 'auth_failures', limit: 2 }] });
  assert.equal((await check(auth('u', { id: 'a' }))).kind, 'pass');
  // The backend accepted it: the next event shows the login, and the token comes back.
  assert.equal((await check(mail({ id: 'a', login: 'u' }))).kind, 'pass');
  await settle();
  assert.deepEqual(await kinds([auth('u'), auth('v')]), ['pass', 'pass']);
  assert.deepEqual(await check(auth('w')), { kind: 'tempfail', reason: 'af exceeded', reply: AUTH_OVER });
});

test('auth_failures per login: the login an AUTH PLAIN initial response names; none, not counted', async () => {
  const { kinds } = setup({ limits: [{ name: 'af', count: 'auth_failures', key: 'login', limit: 1 }] });
  assert.deepEqual(await kinds([auth('Bob'), auth('bob', { ip: '198.51.100.1' }), auth('carol'), auth(null), auth(null)]), ['pass', 'tempfail', 'pass', 'pass', 'pass']);
});

test('a successful login is given back at quit too', async () => {
  const { check, kinds } = setup({ limits: [{ name: 'af', count: 'auth_failures', limit: 1 }] });
  await check(auth('u', { id: 'a' }));
  await check(quit({ id: 'a', login: 'u' }));
  await settle();
  assert.deepEqual(await kinds([auth('u'), auth('u')]), ['pass', 'tempfail']);
});

const broken = (): Store =>
  Object.assign(new MemoryStore(), {
    rate: () => Promise.reject(new Error('redis down')),
    acquire: () => Promise.reject(new Error('redis down')),
  });

test('store failure is the rule\'s error, counted in doorman_store_fail_open_total under onError: pass', async () => {
  const { check, metrics } = setup({ limits: [{ name: 'c', count: 'connections', limit: 1 }, { name: 'm', count: 'messages', limit: 1 }] }, broken());
  for (const ev of [connect(), connect(), rcpt('a@x.test'), rcpt('a@x.test', { txn: 2 })]) await assert.rejects(check(ev), /store unavailable: redis down/);
  assert.equal((await metrics.failOpen.get()).values.find((v) => v.labels.rule === 'rl')?.value, 4);
});

test('store failure under onError: tempfail: the rule\'s error, counted in doorman_store_fail_closed_total', async () => {
  const { check, metrics } = setup({ limits: [{ name: 'c', count: 'concurrency', limit: 1 }, { name: 'a', count: 'auth_failures', limit: 1 }, { name: 'm', count: 'messages', limit: 1 }] }, broken(), 'tempfail');
  for (const ev of [connect(), auth('u'), rcpt('a@x.test')]) await assert.rejects(check(ev), /store unavailable: redis down/);
  assert.equal((await metrics.failClosed.get()).values.find((v) => v.labels.rule === 'rl')?.value, 3);
  assert.throws(() => ratelimitRule.settings.parse({ failMode: 'closed', limits: [{ name: 'c', count: 'connections', limit: 1 }] }), /failMode/);
});

test('stages with nothing to do answer synchronously', () => {
  const { rule } = setup({ limits: [{ name: 'a', count: 'auth_failures', limit: 1 }] });
  const r: Rule = rule;
  assert.equal(checkRule(r, { stage: 'helo', session: snap(), verb: 'EHLO', name: 'x.test' }), checkRule(r, mail()));
  assert.equal((checkRule(r, mail()) as Finding).kind, 'pass');
});

test('state: created at the session\'s first check, ended once (slots given back), then dropped', async () => {
  const { check, rule } = setup({ limits: [{ name: 'cc', count: 'concurrency', limit: 1 }] });
  assert.equal(liveStates(rule), 0);
  assert.equal((await check(connect({ id: 'a' }))).kind, 'pass');
  assert.equal(liveStates(rule), 1, 'created on first use');
  assert.equal(endSession(rule, snap({ id: 'a' })), true);
  assert.equal(endSession(rule, snap({ id: 'a' })), false, 'ended once');
  assert.equal(liveStates(rule), 0, 'dropped');
  await settle();
  assert.equal((await check(connect({ id: 'b' }))).kind, 'pass', 'the end hook gave the slot back');
});

test('admin: the store key a limit and subject name', () => {
  const { rule } = setup({ limits: [{ name: 'conn', count: 'connections', limit: 5, window: 1000 }, { name: 'snd', count: 'messages', key: 'sender', limit: 1 }] });
  assert.deepEqual(rule.admin?.(['conn', '2001:db8:1:2::7']), { key: 'rl:{rl:conn:2001:db8:1:2::/64}', describe: 'conn: connections per client 2001:db8:1:2::/64', spec: { kind: 'rate', limit: 5, windowMs: 1000 } });
  assert.deepEqual(rule.admin?.(['snd', 'Alice@Example.org']), { key: 'rl:{rl:snd:alice@example.org}', describe: 'snd: messages per sender alice@example.org', spec: { kind: 'rate', limit: 1, windowMs: 60_000 } });
  assert.match(String(rule.admin?.(['nope', 'x'])), /has no limit "nope" \(limits: conn, snd\)/);
  assert.match(String(rule.admin?.(['conn'])), /usage/);
  assert.match(String(rule.admin?.(['conn', 'not-an-ip'])), /not an IP address/);
});

test('auth_failures: every AUTH attempt of one session takes a token, not only the first', async () => {
  const deps = ruleDeps({ now: Date.now, checkOnly: false });
  const rule = ratelimitRule.create('rl', ratelimitRule.settings.parse({ limits: [{ name: 'af', count: 'auth_failures', limit: 2 }] }), deps);
  const session = snapshot({ helo: 'x.test', esmtp: true });
  const out: string[] = [];
  for (let i = 0; i < 5; i++) {
    const ev: SessionEvent = { stage: 'auth', session, mechanism: 'PLAIN', login: `guess${i}` };
    out.push(((await checkRule(rule, ev)) as Finding).kind);
  }
  assert.deepEqual(out, ['pass', 'pass', 'tempfail', 'tempfail', 'tempfail']);
});
