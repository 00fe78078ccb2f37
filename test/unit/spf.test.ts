/**
 * The spf rule (RFC 7208) evaluated by mailauth with doorman's resolver, here one built from a
 * zone literal of TXT and A/AAAA records (no network): the HELO and MAIL FROM identities, the
 * mapping of each result to a finding with the replies of RFC 7208 §8 / RFC 7372, the settings,
 * and the start-at-MAIL / decide-at-RCPT split of `stage: rcpt`.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spfRule } from '../../src/rules/spf.js';
import type { DnsResolver } from '../../src/net/dns.js';
import type { SessionEvent, SessionSnapshot } from '../../src/pipeline/events.js';
import { stagesOf, type Finding, type Rule, type RuleDeps } from '../../src/pipeline/rule.js';
import { parseAddress } from '../../src/net/ip.js';
import { type ParsedPath } from '../../src/protocol/address.js';
import { createMetrics } from '../../src/metrics/registry.js';
import { MemoryStore } from '../../src/store/store.js';
import { checkRule, endSession, pathOf, startRule } from '../helpers/rule-fixtures.js';

/** Records by owner name; a string is the error code every query of that name gets. */
type Zone = Record<string, { TXT?: string[]; A?: string[]; AAAA?: string[] } | 'ESERVFAIL' | 'ETIMEOUT'>;

function zoneResolver(zone: Zone): DnsResolver & { calls: string[] } {
  const calls: string[] = [];
  const unused = () => Promise.reject(new Error('unused'));
  return {
    calls,
    servers: [],
    resolve: (name, rrtype) => {
      calls.push(`${rrtype} ${name}`);
      const z = zone[name.toLowerCase()];
      const fail = (code: string, msg: string) => Promise.reject(Object.assign(new Error(msg), { code }));
      if (typeof z === 'string') return fail(z, `query ${z}`);
      if (!z) return fail('ENOTFOUND', `queryTxt ENOTFOUND ${name}`);
      if (rrtype === 'TXT') return z.TXT ? Promise.resolve(z.TXT.map((t) => [t])) : fail('ENODATA', 'no data');
      if (rrtype === 'A' || rrtype === 'AAAA') {
        const a = z[rrtype];
        return a ? Promise.resolve(a) : fail('ENODATA', 'no data');
      }
      return fail('ENODATA', 'no data');
    },
    resolveA: unused,
    resolveAAAA: unused,
    reverse: unused,
  };
}

interface Sess {
  id?: string;
  ip?: string;
  helo?: string | null;
  login?: string;
  txn?: number;
}
const snap = (o: Sess, sender: ParsedPath | null): SessionSnapshot => ({
  id: o.id ?? 's', client: parseAddress(o.ip ?? '192.0.2.5'), clientPort: 1, listener: { name: 'l', role: 'smtp' }, localAddress: '127.0.0.1',
  tls: false, helo: o.helo === undefined ? 'relay.example.net' : o.helo, esmtp: true, auth: o.login ? { mechanism: 'PLAIN', login: o.login } : null,
  transaction: o.txn ?? 1, sender, recipients: [], recipientsForwarded: 0, acceptedBy: null, authResults: [], ended: new AbortController().signal,
});
const mail = (from: string, o: Sess = {}): SessionEvent => ({ stage: 'mail', session: snap(o, pathOf(from)), sender: pathOf(from), params: [] });
const rcpt = (from: string, o: Sess = {}): SessionEvent => ({ stage: 'rcpt', session: snap(o, pathOf(from)), recipient: pathOf('bob@example.net'), params: [] });

/** What the runner does at a stage: start the rule's work, then ask for its verdict. */
function run(rule: Rule, ev: SessionEvent): Promise<Finding> {
  return Promise.resolve(checkRule(rule, ev) as Finding | Promise<Finding>);
}

/** example.org: 192.0.2.0/24 allowed, the rest fails; other domains for the other results. */
const ZONE: Zone = {
  'example.org': { TXT: ['v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 -all'] },
  'mail.example.org': { TXT: ['v=spf1 a -all'], A: ['192.0.2.5'] },
  'soft.test': { TXT: ['v=spf1 ~all'] },
  'neutral.test': { TXT: ['v=spf1 ?all'] },
  'none.test': { TXT: ['some other record'] },
  'broken.test': { TXT: ['v=spf1 ip4:192.0.2.0/33 -all'] },
  'servfail.test': 'ESERVFAIL',
  'bad-helo.test': { TXT: ['v=spf1 -all'] },
  'good-helo.test': { TXT: ['v=spf1 +all'] },
  'soft-helo.test': { TXT: ['v=spf1 ~all'] },
};

/** The rule reports through the runner's metrics, not its own: one registry serves every test. */
const metrics = createMetrics({ version: 't', defaults: false });

function make(settings: Record<string, unknown> = {}, zone: Zone = ZONE) {
  const r = zoneResolver(zone);
  const d: RuleDeps = { ownNames: ['mx.test'], ownAddresses: [], resolver: r, store: new MemoryStore(), metrics, log: { warn: () => undefined, info: () => undefined }, now: Date.now };
  return { r, rule: spfRule.create('spf', spfRule.settings.parse(settings), d) };
}

const reasonOf = (f: Finding) => (f.kind === 'pass' ? '' : f.reason);
const replyOf = (f: Finding) => (f.kind === 'reject' || f.kind === 'tempfail' ? f.reply : undefined);

test('stage mail (default): evaluated and decided at MAIL, bypassable', () => {
  const { rule } = make();
  assert.deepEqual(stagesOf(rule), ['mail']);
  assert.deepEqual(Object.keys(rule.starts ?? {}), []);
  assert.equal(rule.bypassable, true);
});

test('fail → reject 550 5.7.23 Sender address rejected: SPF fail', async () => {
  const { r, rule } = make();
  const f = await run(rule, mail('alice@example.org', { ip: '198.51.100.7' }));
  assert.equal(f.kind, 'reject');
  assert.deepEqual(replyOf(f), { code: 550, enhanced: '5.7.23', text: '<alice@example.org>: Sender address rejected: SPF fail' });
  assert.equal(reasonOf(f), 'mailfrom fail: mx.test: domain of alice@example.org does not designate 198.51.100.7 as permitted sender');
  assert.ok(r.calls.includes('TXT example.org'), 'through doorman\'s resolver');
});

const spfPass = (result: string, mailfrom: string) => ({ kind: 'pass', results: [{ method: 'spf', result, props: [['smtp.mailfrom', mailfrom]] }] });

test('pass, neutral and none → pass', async () => {
  const { rule } = make();
  assert.deepEqual(await run(rule, mail('alice@example.org')), spfPass('pass', 'alice@example.org'));
  assert.deepEqual(await run(rule, mail('alice@example.org', { ip: '2001:db8::25' })), spfPass('pass', 'alice@example.org'), 'IPv6 client, ip6 mechanism');
  assert.deepEqual(await run(rule, mail('x@neutral.test')), spfPass('neutral', 'x@neutral.test'));
  assert.deepEqual(await run(rule, mail('x@none.test')), spfPass('none', 'x@none.test'));
  assert.deepEqual(await run(rule, mail('x@nxdomain.test')), spfPass('none', 'x@nxdomain.test'), 'no such domain: none');
});

test('every evaluated finding carries its Authentication-Results entry, whatever its action', async () => {
  const { rule } = make();
  const resultsOf = async (ev: SessionEvent) => (await run(rule, ev)).results;
  assert.deepEqual(await resultsOf(mail('alice@example.org', { ip: '198.51.100.7' })), [{ method: 'spf', result: 'fail', props: [['smtp.mailfrom', 'alice@example.org']] }]);
  assert.deepEqual(await resultsOf(mail('x@soft.test')), [{ method: 'spf', result: 'softfail', props: [['smtp.mailfrom', 'x@soft.test']] }]);
  assert.deepEqual(await resultsOf(mail('x@servfail.test')), [{ method: 'spf', result: 'temperror', props: [['smtp.mailfrom', 'x@servfail.test']] }]);
  assert.deepEqual(await resultsOf(mail('x@broken.test')), [{ method: 'spf', result: 'permerror', props: [['smtp.mailfrom', 'x@broken.test']] }]);
  // The HELO identity decided: smtp.helo (RFC 8601 §2.7.2).
  assert.deepEqual(await resultsOf(mail('alice@example.org', { helo: 'bad-helo.test' })), [{ method: 'spf', result: 'fail', props: [['smtp.helo', 'bad-helo.test']] }]);
  // The null sender: postmaster@<helo> (RFC 7208 §2.4).
  assert.deepEqual(await resultsOf(mail('', { helo: 'mail.example.org' })), [{ method: 'spf', result: 'pass', props: [['smtp.mailfrom', 'postmaster@mail.example.org']] }]);
  // Not evaluated (authenticated): no result.
  assert.equal(await resultsOf(mail('alice@example.org', { login: 'alice' })), undefined);
});

test('softfail → tag', async () => {
  const { rule } = make();
  const f = await run(rule, mail('x@soft.test'));
  assert.equal(f.kind, 'tag');
  assert.match(reasonOf(f), /^mailfrom softfail: mx\.test: domain of transitioning x@soft\.test does not designate 192\.0\.2\.5/);
});

test('temperror (a DNS failure, never a crash) → tempfail 451 4.7.24', async () => {
  const { rule } = make();
  const f = await run(rule, mail('x@servfail.test'));
  assert.equal(f.kind, 'tempfail');
  assert.deepEqual(replyOf(f), { code: 451, enhanced: '4.7.24', text: '<x@servfail.test>: SPF temporary error, try again later' });
  assert.match(reasonOf(f), /^mailfrom temperror/);
});

test('permerror → pass by default; reject gives 550 5.7.24', async () => {
  assert.equal((await run(make().rule, mail('x@broken.test'))).kind, 'pass');
  const f = await run(make({ results: { permerror: 'reject' } }).rule, mail('x@broken.test'));
  assert.equal(f.kind, 'reject');
  assert.match(reasonOf(f), /^mailfrom permerror/);
  assert.deepEqual(replyOf(f), { code: 550, enhanced: '5.7.24', text: '<x@broken.test>: SPF permanent error' });
});

test('results: each result maps to the configured action', async () => {
  const { rule } = make({ results: { softfail: 'reject', neutral: 'tempfail', fail: 'tag', temperror: 'pass', pass: 'tag', none: 'reject' } });
  const soft = await run(rule, mail('x@soft.test'));
  assert.deepEqual(replyOf(soft), { code: 550, enhanced: '5.7.1', text: '<x@soft.test>: Sender address rejected: SPF softfail' });
  const neutral = await run(rule, mail('x@neutral.test'));
  assert.equal(neutral.kind, 'tempfail');
  assert.equal(replyOf(neutral)?.code, 451);
  assert.equal((await run(rule, mail('alice@example.org', { ip: '198.51.100.7' }))).kind, 'tag');
  assert.equal((await run(rule, mail('x@servfail.test'))).kind, 'pass');
  assert.equal((await run(rule, mail('alice@example.org'))).kind, 'tag');
  assert.deepEqual(replyOf(await run(rule, mail('x@none.test'))), { code: 550, enhanced: '5.7.1', text: '<x@none.test>: Sender address rejected: SPF none' });
});

test('checkHelo: a HELO identity that fails decides, even if MAIL FROM passes', async () => {
  const { r, rule } = make();
  const f = await run(rule, mail('alice@example.org', { helo: 'bad-helo.test' }));
  assert.equal(f.kind, 'reject');
  assert.match(reasonOf(f), /^helo fail: /);
  assert.deepEqual(replyOf(f), { code: 550, enhanced: '5.7.23', text: '<postmaster@bad-helo.test>: Sender address rejected: SPF fail' });
  assert.ok(!r.calls.includes('TXT example.org'), 'MAIL FROM not evaluated after a HELO fail');
});

test('checkHelo: a HELO result other than fail leaves the verdict to MAIL FROM', async () => {
  const { rule } = make();
  assert.equal((await run(rule, mail('alice@example.org', { helo: 'soft-helo.test' }))).kind, 'pass');
  const f = await run(rule, mail('alice@example.org', { helo: 'good-helo.test', ip: '198.51.100.7' }));
  assert.equal(f.kind, 'reject');
  assert.match(reasonOf(f), /^mailfrom fail/);
});

test('checkHelo: only host names with a dot are checked (RFC 7208 §2.3)', async () => {
  for (const helo of ['localhost', '[192.0.2.5]', 'bad_name!']) {
    const { r, rule } = make({}, { ...ZONE, localhost: { TXT: ['v=spf1 -all'] } });
    assert.equal((await run(rule, mail('alice@example.org', { helo }))).kind, 'pass', helo);
    assert.deepEqual(r.calls.filter((c) => c.startsWith('TXT')), ['TXT example.org'], helo);
  }
});

test('checkHelo false: the HELO identity is not checked', async () => {
  const { r, rule } = make({ checkHelo: false });
  assert.equal((await run(rule, mail('alice@example.org', { helo: 'bad-helo.test' }))).kind, 'pass');
  assert.ok(!r.calls.includes('TXT bad-helo.test'));
});

test('the null sender is checked as postmaster@<helo> (RFC 7208 §2.4)', async () => {
  const { rule } = make({ checkHelo: false });
  const f = await run(rule, mail('', { helo: 'bad-helo.test' }));
  assert.equal(f.kind, 'reject');
  assert.match(reasonOf(f), /^mailfrom fail: mx\.test: domain of postmaster@bad-helo\.test does not designate/);
  assert.deepEqual(replyOf(f), { code: 550, enhanced: '5.7.23', text: '<postmaster@bad-helo.test>: Sender address rejected: SPF fail' });
  assert.equal((await run(rule, mail('', { helo: 'mail.example.org' }))).kind, 'pass', 'the a mechanism of the HELO host');
});

test('the null sender without HELO passes, with no lookup', async () => {
  const { r, rule } = make();
  assert.deepEqual(await run(rule, mail('', { helo: null })), { kind: 'pass' });
  assert.deepEqual(r.calls, []);
});

test('skipAuthenticated (default) and skipNetworks: not checked', async () => {
  const a = make();
  assert.deepEqual(await run(a.rule, mail('alice@example.org', { ip: '198.51.100.7', login: 'alice' })), { kind: 'pass' });
  assert.deepEqual(a.r.calls, []);
  const off = make({ skipAuthenticated: false });
  assert.equal((await run(off.rule, mail('alice@example.org', { ip: '198.51.100.7', login: 'alice' }))).kind, 'reject');
  const nets = make({ skipNetworks: ['198.51.100.0/24', '2001:db8:ffff::/48'] });
  assert.deepEqual(await run(nets.rule, mail('alice@example.org', { ip: '198.51.100.7' })), { kind: 'pass' });
  assert.deepEqual(await run(nets.rule, mail('x@soft.test', { ip: '2001:db8:ffff::1' })), { kind: 'pass' });
  assert.deepEqual(nets.r.calls, []);
  assert.equal((await run(nets.rule, mail('alice@example.org', { ip: '203.0.113.1' }))).kind, 'reject', 'outside the networks');
});

test('maxLookups: more DNS-querying terms than allowed is permerror (RFC 7208 §4.6.4)', async () => {
  const zone: Zone = {
    'many.test': { TXT: ['v=spf1 include:i1.test include:i2.test include:i3.test -all'] },
    'i1.test': { TXT: ['v=spf1 ?all'] },
    'i2.test': { TXT: ['v=spf1 ?all'] },
    'i3.test': { TXT: ['v=spf1 ip4:192.0.2.5 -all'] },
  };
  const results = { permerror: 'reject' };
  assert.equal((await run(make({ results }, zone).rule, mail('x@many.test'))).kind, 'pass', 'three lookups within the default 10');
  const f = await run(make({ results, maxLookups: 2 }, zone).rule, mail('x@many.test'));
  assert.equal(f.kind, 'reject');
  assert.match(reasonOf(f), /^mailfrom permerror.*Too many DNS requests/);
});

test('maxVoidLookups: more lookups with no answer than allowed is permerror', async () => {
  const zone: Zone = { 'void.test': { TXT: ['v=spf1 a:v1.test a:v2.test a:v3.test ip4:192.0.2.5 -all'] } };
  const results = { permerror: 'reject' };
  const f = await run(make({ results }, zone).rule, mail('x@void.test'));
  assert.equal(f.kind, 'reject', 'three void lookups, two allowed');
  assert.match(reasonOf(f), /Too many void DNS results/);
  assert.deepEqual(await run(make({ results, maxVoidLookups: 3 }, zone).rule, mail('x@void.test')), spfPass('pass', 'x@void.test'));
});

test('stage rcpt: evaluation starts at MAIL (the reply not held) and is read at each RCPT', async () => {
  const { r, rule } = make({ stage: 'rcpt' });
  assert.deepEqual(Object.keys(rule.starts ?? {}), ['mail']);
  assert.deepEqual(stagesOf(rule), ['rcpt', 'mail'], 'no quit: the runner owns the session state');
  startRule(rule, mail('alice@example.org', { ip: '198.51.100.7' }));
  assert.ok(r.calls.length > 0, 'lookups under way at MAIL');
  const first = await run(rule, rcpt('alice@example.org', { ip: '198.51.100.7' }));
  assert.equal(first.kind, 'reject');
  assert.deepEqual(replyOf(first), { code: 550, enhanced: '5.7.23', text: '<alice@example.org>: Sender address rejected: SPF fail' });
  const calls = r.calls.length;
  const second = checkRule(rule, rcpt('alice@example.org', { ip: '198.51.100.7' }));
  assert.ok(!(second instanceof Promise), 'once in, read synchronously');
  assert.equal((second as Finding).kind, 'reject');
  assert.equal(r.calls.length, calls, 'evaluated once per transaction');
});

test('stage rcpt: the next MAIL replaces the verdict; the session end forgets it; no MAIL, nothing to judge', async () => {
  const { rule } = make({ stage: 'rcpt' });
  assert.deepEqual(await run(rule, rcpt('alice@example.org')), { kind: 'pass' }, 'nothing started');
  startRule(rule, mail('alice@example.org', { ip: '198.51.100.7' }));
  assert.equal((await run(rule, rcpt('alice@example.org', { ip: '198.51.100.7' }))).kind, 'reject');
  startRule(rule, mail('x@neutral.test', { ip: '198.51.100.7', txn: 2 }));
  assert.equal((await run(rule, rcpt('x@neutral.test', { ip: '198.51.100.7', txn: 2 }))).kind, 'pass');
  startRule(rule, mail('alice@example.org', { ip: '198.51.100.7', txn: 3 }));
  assert.equal(endSession(rule, snap({}, null)), true, 'the session end drops its state');
  assert.deepEqual(await run(rule, rcpt('alice@example.org', { ip: '198.51.100.7', txn: 3 })), { kind: 'pass' });
});

test('stage rcpt: sessions are kept apart', async () => {
  const { rule } = make({ stage: 'rcpt' });
  startRule(rule, mail('alice@example.org', { id: 'good' }));
  startRule(rule, mail('alice@example.org', { id: 'bad', ip: '198.51.100.7' }));
  assert.equal((await run(rule, rcpt('alice@example.org', { id: 'bad', ip: '198.51.100.7' }))).kind, 'reject');
  assert.equal((await run(rule, rcpt('alice@example.org', { id: 'good' }))).kind, 'pass');
});
