/**
 * The fcrdns rule with a resolver built from a zone literal: PTR names looked up at connect (the
 * runner's `start`), each name's A/AAAA records compared with the client address, and the
 * verdict applied at `stage` with the replies of RFC 7372 X.7.25.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fcrdnsRule } from '../../src/rules/fcrdns.js';
import type { DnsResolver } from '../../src/net/dns.js';
import type { SessionEvent, SessionSnapshot } from '../../src/pipeline/events.js';
import { stagesOf, type Finding, type Rule, type RuleDeps } from '../../src/pipeline/rule.js';
import { checkRule, endSession, liveStates, startRule } from '../helpers/rule-fixtures.js';
import { parseAddress } from '../../src/net/ip.js';
import { parsePath } from '../../src/protocol/address.js';
import { createMetrics } from '../../src/metrics/registry.js';
import { MemoryStore } from '../../src/store/store.js';

/** Records by owner name and type; a string is the error code every query of that name gets. */
type Zone = Record<string, { PTR?: string[]; A?: string[]; AAAA?: string[] } | 'ESERVFAIL' | 'ETIMEOUT' | 'SLOW'>;

function zoneResolver(zone: Zone, delay = 1): DnsResolver & { calls: string[] } {
  const calls: string[] = [];
  const lookup = (name: string, type: 'PTR' | 'A' | 'AAAA') =>
    new Promise<string[]>((resolve, reject) => {
      calls.push(`${type} ${name}`);
      const z = zone[name];
      if (z === 'SLOW') return; // never answers
      setTimeout(() => {
        if (typeof z === 'string') reject(Object.assign(new Error(`query ${z}`), { code: z }));
        else if (!z) reject(Object.assign(new Error('not found'), { code: 'ENOTFOUND' }));
        else if (!z[type]) reject(Object.assign(new Error('no data'), { code: 'ENODATA' }));
        else resolve(z[type]);
      }, delay);
    });
  const withTtl = (p: Promise<string[]>) => p.then((a) => a.map((address) => ({ address, ttl: 300 })));
  return {
    calls,
    servers: [],
    resolve: () => Promise.reject(new Error('unused')),
    resolveA: (name) => withTtl(lookup(name, 'A')),
    resolveAAAA: (name) => withTtl(lookup(name, 'AAAA')),
    reverse: (ip) => lookup(ip, 'PTR'),
  };
}

function deps(resolver: DnsResolver): RuleDeps {
  return { ownNames: ['mx.test'], ownAddresses: [], resolver, store: new MemoryStore(), metrics: createMetrics({ version: 't', defaults: false }), log: { warn: () => undefined, info: () => undefined }, now: Date.now };
}

const snap = (id: string, ip: string): SessionSnapshot => ({
  id, client: parseAddress(ip), clientPort: 1, listener: { name: 'l', role: 'smtp' }, localAddress: '127.0.0.1',
  tls: false, helo: null, esmtp: false, auth: null, transaction: 0, sender: null, recipients: [], recipientsForwarded: 0, acceptedBy: null, authResults: [],
  ended: new AbortController().signal,
});
const connect = (ip: string, id = 's'): SessionEvent => ({ stage: 'connect', session: snap(id, ip) });
const sender = (() => {
  const r = parsePath('a@example.org');
  if (!r.ok) throw new Error(r.reason);
  return r.path;
})();
const mail = (ip: string, id = 's'): SessionEvent => ({ stage: 'mail', session: { ...snap(id, ip), transaction: 1, sender }, sender, params: [] });

/** What the runner does at a stage: start the rule's lookups, then ask for its verdict. */
function run(rule: Rule, ev: SessionEvent): Promise<Finding> {
  return Promise.resolve(checkRule(rule, ev) as Finding | Promise<Finding>);
}

function make(zone: Zone, settings: Record<string, unknown> = {}) {
  const r = zoneResolver(zone);
  const d = deps(r);
  const rule = fcrdnsRule.create('fcrdns', fcrdnsRule.settings.parse(settings), d);
  const checks = async (result: string) => (await d.metrics.fcrdnsChecks.get()).values.find((v) => v.labels.result === result)?.value ?? 0;
  return { r, rule, checks };
}

const FAIL = (ip: string) => ({ code: 550, enhanced: '5.7.25', text: `Reverse DNS validation failed for [${ip}]` });
const TEMP = (ip: string) => ({ code: 451, enhanced: '4.7.25', text: `Reverse DNS lookup failed for [${ip}], try again later` });

test('a PTR name that resolves back to the client passes', async () => {
  const { r, rule, checks } = make({ '192.0.2.5': { PTR: ['mail.example.org'] }, 'mail.example.org': { A: ['192.0.2.9', '192.0.2.5'] } });
  assert.deepEqual(Object.keys(rule.starts ?? {}), ['connect']);
  assert.deepEqual(stagesOf(rule), ['connect'], 'no quit: the runner owns the session state');
  assert.equal(rule.bypassable, true);
  assert.deepEqual(await run(rule, connect('192.0.2.5')), { kind: 'pass' });
  assert.deepEqual(r.calls, ['PTR 192.0.2.5', 'A mail.example.org']);
  assert.equal(await checks('pass'), 1);
});

test('no PTR record: 550 5.7.25 Reverse DNS validation failed', async () => {
  const { rule, checks } = make({});
  assert.deepEqual(await run(rule, connect('192.0.2.5')), { kind: 'reject', reason: 'fail: no PTR record', reply: FAIL('192.0.2.5') });
  assert.equal(await checks('fail'), 1);
});

test('an empty PTR answer is a failure too', async () => {
  const { rule } = make({ '192.0.2.5': { PTR: [] } });
  const f = await run(rule, connect('192.0.2.5'));
  assert.equal(f.kind === 'reject' && f.reason, 'fail: no PTR record');
});

test('PTR names that do not resolve back (other address, no record) fail', async () => {
  const { rule } = make({ '192.0.2.5': { PTR: ['a.example.org', 'b.example.org', 'c.example.org'] }, 'a.example.org': { A: ['192.0.2.6'] }, 'b.example.org': { AAAA: ['2001:db8::5'] } });
  assert.deepEqual(await run(rule, connect('192.0.2.5')), { kind: 'reject', reason: 'fail: a.example.org, b.example.org, c.example.org do not resolve to 192.0.2.5', reply: FAIL('192.0.2.5') });
});

test('IPv6 clients are confirmed by AAAA records', async () => {
  const { r, rule } = make({ '2001:db8::5': { PTR: ['v6.example.org'] }, 'v6.example.org': { A: ['192.0.2.5'], AAAA: ['2001:db8::5'] } });
  assert.equal((await run(rule, connect('2001:db8::5'))).kind, 'pass');
  assert.deepEqual(r.calls, ['PTR 2001:db8::5', 'AAAA v6.example.org']);
  const v4 = make({ '192.0.2.5': { PTR: ['v6only.example.org'] }, 'v6only.example.org': { AAAA: ['::ffff:192.0.2.5'] } });
  assert.equal((await run(v4.rule, connect('192.0.2.5'))).kind, 'reject', 'an IPv4 client needs an A record');
});

test('a PTR lookup failure is temperror: 451 4.7.25', async () => {
  const { rule, checks } = make({ '192.0.2.5': 'ESERVFAIL' });
  const f = await run(rule, connect('192.0.2.5'));
  assert.equal(f.kind, 'tempfail');
  assert.deepEqual(f.kind === 'tempfail' && f.reply, TEMP('192.0.2.5'));
  assert.match(f.kind === 'tempfail' ? f.reason : '', /^temperror: PTR lookup: query ESERVFAIL/);
  assert.equal(await checks('temperror'), 1);
});

test('a forward lookup failure is temperror unless another name confirms', async () => {
  const bad = make({ '192.0.2.5': { PTR: ['broken.example.org', 'other.example.org'] }, 'broken.example.org': 'ETIMEOUT', 'other.example.org': { A: ['192.0.2.6'] } });
  const f = await run(bad.rule, connect('192.0.2.5'));
  assert.equal(f.kind, 'tempfail');
  assert.match(f.kind === 'tempfail' ? f.reason : '', /^temperror: broken\.example\.org: query ETIMEOUT/);
  const ok = make({ '192.0.2.5': { PTR: ['broken.example.org', 'good.example.org'] }, 'broken.example.org': 'ESERVFAIL', 'good.example.org': { A: ['192.0.2.5'] } });
  assert.equal((await run(ok.rule, connect('192.0.2.5'))).kind, 'pass');
});

test('maxNames: only the first names are tried', async () => {
  const zone: Zone = { '192.0.2.5': { PTR: ['a.example.org', 'b.example.org', 'c.example.org'] }, 'c.example.org': { A: ['192.0.2.5'] } };
  const two = make(zone, { maxNames: 2 });
  const f = await run(two.rule, connect('192.0.2.5'));
  assert.equal(f.kind === 'reject' && f.reason, 'fail: a.example.org, b.example.org do not resolve to 192.0.2.5');
  assert.deepEqual(two.r.calls, ['PTR 192.0.2.5', 'A a.example.org', 'A b.example.org']);
  assert.equal((await run(make(zone).rule, connect('192.0.2.5'))).kind, 'pass', 'default 10');
});

test('timeout: a lookup that does not answer in time is temperror', async () => {
  const { rule } = make({ '192.0.2.5': 'SLOW' }, { timeout: 30 });
  const t0 = Date.now();
  const f = await run(rule, connect('192.0.2.5'));
  assert.equal(f.kind, 'tempfail');
  assert.match(f.kind === 'tempfail' ? f.reason : '', /timeout after 30 ms/);
  assert.ok(Date.now() - t0 < 1000);
});

test('results: fail and temperror map to the configured action', async () => {
  const tag = make({}, { results: { fail: 'tag' } });
  assert.deepEqual(await run(tag.rule, connect('192.0.2.5')), { kind: 'tag', reason: 'fail: no PTR record' });
  const lax = make({ '192.0.2.5': 'ESERVFAIL' }, { results: { temperror: 'pass' } });
  assert.deepEqual(await run(lax.rule, connect('192.0.2.5')), { kind: 'pass' });
  const strict = make({ '192.0.2.5': 'ESERVFAIL' }, { results: { temperror: 'reject' } });
  const f = await run(strict.rule, connect('192.0.2.5'));
  assert.equal(f.kind, 'reject');
  assert.deepEqual(f.kind === 'reject' && f.reply, FAIL('192.0.2.5'));
  const soft = make({}, { results: { fail: 'tempfail' } });
  const g = await run(soft.rule, connect('192.0.2.5'));
  assert.deepEqual(g.kind === 'tempfail' && g.reply, TEMP('192.0.2.5'));
});

test('stage mail: lookups start at connect without holding it; the verdict comes at MAIL', async () => {
  const { r, rule } = make({ '192.0.2.5': { PTR: ['x.example.org'] } }, { stage: 'mail' });
  assert.deepEqual(stagesOf(rule), ['mail', 'connect']);
  assert.deepEqual(Object.keys(rule.starts ?? {}), ['connect']);
  startRule(rule, connect('192.0.2.5'));
  assert.deepEqual(r.calls, ['PTR 192.0.2.5'], 'started at connect');
  const pending = checkRule(rule, mail('192.0.2.5'));
  assert.ok(pending instanceof Promise, 'still in flight: the verdict waits for it');
  assert.equal((await pending).kind, 'reject');
  const settled = checkRule(rule, mail('192.0.2.5'));
  assert.ok(!(settled instanceof Promise), 'once in, read synchronously');
  assert.equal((settled as Finding).kind, 'reject');
});

test('sessions are kept apart; the session end drops its state', async () => {
  const { rule } = make({ '192.0.2.5': { PTR: ['ok.example.org'] }, 'ok.example.org': { A: ['192.0.2.5'] } }, { stage: 'rcpt' });
  startRule(rule, connect('192.0.2.5', 'good'));
  startRule(rule, connect('192.0.2.6', 'bad'));
  const rcpt = (id: string, ip: string): SessionEvent => ({ stage: 'rcpt', session: snap(id, ip), recipient: sender, params: [] });
  assert.equal((await run(rule, rcpt('good', '192.0.2.5'))).kind, 'pass');
  assert.equal((await run(rule, rcpt('bad', '192.0.2.6'))).kind, 'reject');
  assert.equal(endSession(rule, snap('bad', '192.0.2.6')), true, 'the session end drops its state');
  assert.equal(liveStates(rule), 1, 'the other session keeps its own');
  assert.equal((await run(rule, rcpt('bad', '192.0.2.6'))).kind, 'pass', 'no lookup on record: nothing to judge');
});

test('a session ended before its lookups came in leaves nothing behind', async () => {
  const { rule } = make({});
  startRule(rule, connect('192.0.2.5'));
  assert.equal(endSession(rule, snap('s', '192.0.2.5')), true);
  await new Promise((r) => setTimeout(r, 10));
  assert.equal(liveStates(rule), 0, 'the lookup landing later keeps nothing');
  assert.equal(endSession(rule, snap('s', '192.0.2.5')), false, 'ended once');
});
