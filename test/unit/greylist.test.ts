/**
 * The greylist rule (RFC 6647) with the real MemoryStore on a virtual clock: a new triplet is
 * greylisted, a retry after `delay` and within `retryWindow` passes, the pass lasts `passLifetime`,
 * client networks are masked, allowlists and authenticated sessions skip it, store failures follow
 * the store failures the runner handles by the file's `onError`.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { greylistRule } from '../../src/rules/greylist.js';
import type { SessionEvent, SessionSnapshot } from '../../src/pipeline/events.js';
import { stagesOf, type Finding, type RuleDeps } from '../../src/pipeline/rule.js';
import { parseAddress } from '../../src/net/ip.js';
import { createMetrics } from '../../src/metrics/registry.js';
import { MemoryStore, type Store } from '../../src/store/store.js';
import { checkRule, noDns, pathOf, clock } from '../helpers/rule-fixtures.js';

const MIN = 60_000;

function deps(store: Store, now: () => number): RuleDeps {
  return { ownNames: ['mx.test'], ownAddresses: [], resolver: noDns, store, metrics: createMetrics({ version: 't', defaults: false }), log: { warn: () => undefined, info: () => undefined }, now };
}

interface Opts {
  ip?: string;
  from?: string;
  auth?: boolean;
}
const rcpt = (to: string, o: Opts = {}): SessionEvent => {
  const session: SessionSnapshot = {
    id: 's', client: parseAddress(o.ip ?? '192.0.2.5'), clientPort: 1, listener: { name: 'l', role: 'smtp' }, localAddress: '127.0.0.1',
    tls: false, helo: 'mail.example.org', esmtp: true, auth: o.auth ? { mechanism: 'PLAIN', login: 'u' } : null, transaction: 1,
    sender: pathOf(o.from ?? 'alice@example.org'), recipients: [], recipientsForwarded: 0, acceptedBy: null, authResults: [], ended: new AbortController().signal,
  };
  return { stage: 'rcpt', session, recipient: pathOf(to), params: [] };
};

function setup(settings: Record<string, unknown> = {}, store?: Store, onError?: 'pass' | 'tempfail') {
  const c = clock();
  const st = store ?? new MemoryStore(c.now);
  const d = { ...deps(st, c.now), ...(onError ? { onError } : {}) };
  const rule = greylistRule.create('grey', greylistRule.settings.parse(settings), d);
  const check = (ev: SessionEvent) => checkRule(rule, ev) as Promise<Finding>;
  return { c, rule, check, metrics: d.metrics };
}

async function counter(metrics: RuleDeps['metrics'], result: string): Promise<number> {
  const v = (await metrics.greylist.get()).values.find((x) => x.labels.result === result);
  return v?.value ?? 0;
}

test('a new triplet gets 451 4.7.1 Greylisted; the retry after the delay passes', async () => {
  const { c, check, rule, metrics } = setup();
  assert.deepEqual(stagesOf(rule), ['rcpt']);
  assert.equal(rule.bypassable, true);
  const f = await check(rcpt('bob@example.net'));
  assert.deepEqual(f, { kind: 'tempfail', reason: 'greylisted for 300 s (first attempt)', reply: { code: 451, enhanced: '4.7.1', text: 'Greylisted, try again later' } });
  await c.advance(2 * MIN);
  const early = await check(rcpt('bob@example.net'));
  assert.equal(early.kind, 'tempfail');
  assert.equal(early.kind === 'tempfail' && early.reason, 'greylisted for 180 s', 'a too-early retry is told the time left, not a first attempt');
  await c.advance(3 * MIN);
  assert.equal((await check(rcpt('bob@example.net'))).kind, 'pass', 'default delay is 5 minutes');
  assert.equal(await counter(metrics, 'greylisted'), 2);
  assert.equal(await counter(metrics, 'passed'), 1);
});

test('each element of the triplet counts: another sender or recipient is a new triplet', async () => {
  const { c, check } = setup({ delay: 1000 });
  await check(rcpt('bob@example.net'));
  await c.advance(1000);
  assert.equal((await check(rcpt('bob@example.net'))).kind, 'pass');
  assert.equal((await check(rcpt('carol@example.net'))).kind, 'tempfail');
  assert.equal((await check(rcpt('bob@example.net', { from: 'mallory@example.org' }))).kind, 'tempfail');
  assert.equal((await check(rcpt('bob@example.net', { ip: '198.51.100.7' }))).kind, 'tempfail');
});

test('local parts are compared case-insensitively; the null sender is its own triplet', async () => {
  const { c, check } = setup({ delay: 1000 });
  await check(rcpt('Bob@example.net', { from: 'Alice@example.org' }));
  await c.advance(1000);
  assert.equal((await check(rcpt('bob@example.net', { from: 'alice@example.org' }))).kind, 'pass');
  assert.equal((await check(rcpt('bob@example.net', { from: '' }))).kind, 'tempfail', 'bounces are greylisted too');
  await c.advance(1000);
  assert.equal((await check(rcpt('bob@example.net', { from: '' }))).kind, 'pass');
});

test('a retry from the same /24 (IPv4) or /64 (IPv6) passes: big senders are not hurt', async () => {
  const { c, check } = setup({ delay: 1000 });
  await check(rcpt('bob@example.net', { ip: '192.0.2.5' }));
  await check(rcpt('bob@example.net', { ip: '2001:db8:1:2::5' }));
  await c.advance(1000);
  assert.equal((await check(rcpt('bob@example.net', { ip: '192.0.2.200' }))).kind, 'pass');
  assert.equal((await check(rcpt('bob@example.net', { ip: '192.0.3.5' }))).kind, 'tempfail', 'another /24');
  assert.equal((await check(rcpt('bob@example.net', { ip: '2001:db8:1:2:ffff::9' }))).kind, 'pass');
  assert.equal((await check(rcpt('bob@example.net', { ip: '2001:db8:1:3::5' }))).kind, 'tempfail', 'another /64');
});

test('ipv4Prefix and ipv6Prefix set the network size', async () => {
  const { c, check } = setup({ delay: 1000, ipv4Prefix: 32, ipv6Prefix: 128 });
  await check(rcpt('bob@example.net', { ip: '192.0.2.5' }));
  await check(rcpt('bob@example.net', { ip: '2001:db8::5' }));
  await c.advance(1000);
  assert.equal((await check(rcpt('bob@example.net', { ip: '192.0.2.6' }))).kind, 'tempfail');
  assert.equal((await check(rcpt('bob@example.net', { ip: '2001:db8::6' }))).kind, 'tempfail');
  assert.equal((await check(rcpt('bob@example.net', { ip: '192.0.2.5' }))).kind, 'pass');
  assert.equal((await check(rcpt('bob@example.net', { ip: '2001:db8::5' }))).kind, 'pass');
});

test('a retry after the retry window starts over', async () => {
  const { c, check } = setup({ delay: 1000, retryWindow: 10_000 });
  await check(rcpt('bob@example.net'));
  // Past delay + retryWindow, the grey entry's lifetime in both stores.
  await c.advance(1000 + 10_000 + 1);
  const f = await check(rcpt('bob@example.net'));
  assert.equal(f.kind === 'tempfail' && f.reason, 'greylisted for 1 s (first attempt)');
});

test('a passed triplet lasts passLifetime, refreshed by each use', async () => {
  const { c, check } = setup({ delay: 1000, passLifetime: 60_000 });
  await check(rcpt('bob@example.net'));
  await c.advance(1000);
  assert.equal((await check(rcpt('bob@example.net'))).kind, 'pass');
  await c.advance(50_000);
  assert.equal((await check(rcpt('bob@example.net'))).kind, 'pass', 'within the lifetime (and refreshed)');
  await c.advance(50_000);
  assert.equal((await check(rcpt('bob@example.net'))).kind, 'pass', 'still within the refreshed lifetime');
  await c.advance(60_001);
  assert.equal((await check(rcpt('bob@example.net'))).kind, 'tempfail', 'unused for a lifetime: greylisted again');
});

test('delay 0: the first attempt is greylisted, any retry passes', async () => {
  const { check } = setup({ delay: 0 });
  assert.equal((await check(rcpt('bob@example.net'))).kind, 'tempfail');
  assert.equal((await check(rcpt('bob@example.net'))).kind, 'pass');
});

test('allowClients, allowSenderDomains and authenticated sessions are never greylisted', async () => {
  const { check, metrics } = setup({ allowClients: ['192.0.2.0/28', '2001:db8::/32'], allowSenderDomains: ['trusted.test', '*.partner.test'] });
  assert.equal((await check(rcpt('bob@example.net', { ip: '192.0.2.5' }))).kind, 'pass');
  assert.equal((await check(rcpt('bob@example.net', { ip: '2001:db8::1' }))).kind, 'pass');
  assert.equal((await check(rcpt('bob@example.net', { ip: '198.51.100.1', from: 'x@trusted.test' }))).kind, 'pass');
  assert.equal((await check(rcpt('bob@example.net', { ip: '198.51.100.1', from: 'x@mx.partner.test' }))).kind, 'pass');
  assert.equal((await check(rcpt('bob@example.net', { ip: '198.51.100.1', auth: true }))).kind, 'pass');
  assert.equal(await counter(metrics, 'allowlisted'), 5);
  assert.equal((await check(rcpt('bob@example.net', { ip: '192.0.2.16' }))).kind, 'tempfail', 'outside the /28');
  assert.equal((await check(rcpt('bob@example.net', { ip: '198.51.100.1', from: 'x@untrusted.test' }))).kind, 'tempfail');
});

test('skipAuthenticated: false greylists authenticated sessions too', async () => {
  const { check } = setup({ skipAuthenticated: false });
  assert.equal((await check(rcpt('bob@example.net', { auth: true }))).kind, 'tempfail');
});

test('non-rcpt events pass', async () => {
  const { check } = setup();
  const ev = rcpt('bob@example.net');
  assert.equal((await check({ stage: 'quit', session: ev.session, reason: 'QUIT' })).kind, 'pass');
});

const broken: Store = Object.assign(new MemoryStore(), { greylist: () => Promise.reject(new Error('redis down')) });

test('store failure is the rule\'s error (the runner applies onError), counted open or closed by onError', async () => {
  const open = setup({}, broken);
  await assert.rejects(open.check(rcpt('bob@example.net')), /store unavailable: redis down/);
  assert.equal((await open.metrics.failOpen.get()).values.find((v) => v.labels.rule === 'grey')?.value, 1);
  const closed = setup({}, broken, 'tempfail');
  await assert.rejects(closed.check(rcpt('bob@example.net')), /store unavailable: redis down/);
  assert.equal((await closed.metrics.failClosed.get()).values.find((v) => v.labels.rule === 'grey')?.value, 1);
  assert.equal((await closed.metrics.failOpen.get()).values.find((v) => v.labels.rule === 'grey')?.value, 0);
  assert.throws(() => greylistRule.settings.parse({ failMode: 'open' }), /failMode/, 'failMode is read by the loader, not the rule');
});

test('admin names the triplet key of the masked network, lower-cased', () => {
  const { rule } = setup();
  const a = rule.admin?.(['192.0.2.77', 'Alice@example.org', 'Bob@example.net']);
  assert.ok(typeof a === 'object');
  assert.deepEqual([a.key, a.describe], ['grey:{grey:192.0.2.0/24}:alice@example.org:bob@example.net', 'triplet 192.0.2.0/24 Alice@example.org → Bob@example.net']);
  assert.equal(a.spec.kind, 'greylist', 'what the key holds, for limitView');
  assert.match(String(rule.admin?.(['nope', 'a', 'b'])), /not an IP address/);
  assert.match(String(rule.admin?.(['192.0.2.1'])), /usage/);
});
