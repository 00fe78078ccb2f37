/**
 * The relay rule: relay rights (relayNetworks, AUTH), AUTH required on submission listeners,
 * foreign domains and the routing tricks of RFC 5321 paths (source routes, %-hack, bang paths,
 * double @, address literals, no domain but postmaster), the null sender's recipient cap, ETRN.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { relayRule } from '../../src/rules/relay.js';
import type { SessionEvent, SessionSnapshot } from '../../src/pipeline/events.js';
import { stagesOf, type Finding, type Rule, type RuleDeps } from '../../src/pipeline/rule.js';
import { parseAddress } from '../../src/net/ip.js';
import { checkRule, pathOf, ruleDeps } from '../helpers/rule-fixtures.js';

const deps = (): RuleDeps => ruleDeps();
interface Opts {
  ip?: string;
  role?: 'smtp' | 'submission' | 'smtps';
  auth?: boolean;
  sender?: string;
  forwarded?: number;
}
const snap = (o: Opts = {}): SessionSnapshot => ({
  id: 's', client: parseAddress(o.ip ?? '192.0.2.5'), clientPort: 1, listener: { name: 'l', role: o.role ?? 'smtp' }, localAddress: '127.0.0.1',
  tls: false, helo: 'client.example', esmtp: true, auth: o.auth ? { mechanism: 'PLAIN', login: 'alice' } : null, transaction: 1,
  sender: o.sender === undefined ? null : pathOf(o.sender), recipients: [], recipientsForwarded: o.forwarded ?? 0, acceptedBy: null, authResults: [],
  ended: new AbortController().signal,
});
const mail = (o: Opts = {}): SessionEvent => ({ stage: 'mail', sender: pathOf(o.sender ?? 'a@remote.test'), params: [], session: snap(o) });
const rcpt = (raw: string, o: Opts = {}): SessionEvent => ({ stage: 'rcpt', recipient: pathOf(raw), params: [], session: snap(o) });
const etrn = (node: string, o: Opts = {}): SessionEvent => ({ stage: 'etrn', node, session: snap(o) });
const make = (settings: unknown = {}): Rule => relayRule.create('relay', relayRule.settings.parse(settings), deps());
const check = (rule: Rule, ev: SessionEvent) => checkRule(rule, ev) as Finding;
const reason = (f: Finding) => (f.kind === 'pass' ? 'pass' : f.reason);
const relayDenied = (trick: string, raw: string): Finding => ({ kind: 'reject', reason: trick, reply: { code: 554, enhanced: '5.7.1', text: `<${raw}>: Relay access denied` } });

const local = { localDomains: ['example.com', '*.corp.test', '[192.0.2.1]'] };

test('stages mail, rcpt and etrn; not bypassable', () => {
  const rule = make();
  assert.deepEqual(stagesOf(rule), ['mail', 'rcpt', 'etrn']);
  assert.equal(rule.bypassable, false);
  assert.equal(check(rule, { stage: 'connect', session: snap() }).kind, 'pass');
});

test('foreign_domain: a recipient outside localDomains → relayReply with the address', () => {
  const rule = make(local);
  assert.deepEqual(check(rule, rcpt('victim@elsewhere.test')), relayDenied('foreign_domain', 'victim@elsewhere.test'));
  assert.equal(check(rule, rcpt('user@example.com')).kind, 'pass');
  assert.equal(check(rule, rcpt('User@EXAMPLE.com.')).kind, 'pass', 'case and trailing dot normalised');
  assert.equal(check(rule, rcpt('u@a.corp.test')).kind, 'pass', '*.suffix matches subdomains');
  assert.equal(reason(check(rule, rcpt('u@corp.test'))), 'foreign_domain', 'but not the domain itself');
  assert.equal(reason(check(rule, rcpt('u@example.com.evil.test'))), 'foreign_domain');
  assert.equal(reason(check(make(), rcpt('user@example.com'))), 'foreign_domain', 'no localDomains: nothing is local');
});

test('routing tricks are refused even towards a local domain', () => {
  const rule = make(local);
  const cases: [string, string][] = [
    ['@relay.test,@example.com:user@example.com', 'source_route'],
    ['@example.com:user@elsewhere.test', 'source_route'],
    ['user%elsewhere.test@example.com', 'percent_hack'],
    ['elsewhere.test!user@example.com', 'bang_path'],
    ['elsewhere.test!user', 'bang_path'],
    ['"user@elsewhere.test"@example.com', 'double_at'],
    ['user@[198.51.100.7]', 'address_literal'],
    ['user@[IPv6:2001:db8::1]', 'address_literal'],
    ['user', 'no_domain'],
  ];
  for (const [raw, trick] of cases) assert.deepEqual(check(rule, rcpt(raw)), relayDenied(trick, raw), raw);
});

test('postmaster without a domain is accepted (RFC 5321 §4.5.1); listed address literals are local', () => {
  const rule = make(local);
  assert.equal(check(rule, rcpt('postmaster')).kind, 'pass');
  assert.equal(check(rule, rcpt('PostMaster')).kind, 'pass');
  assert.equal(check(rule, rcpt('user@[192.0.2.1]')).kind, 'pass');
  const v6 = make({ localDomains: ['[IPv6:2001:db8::1]'] });
  assert.equal(check(v6, rcpt('user@[IPv6:2001:DB8::1]')).kind, 'pass');
});

test('relay rights: relayNetworks, or AUTH when authenticatedMayRelay', () => {
  const rule = make({ ...local, relayNetworks: ['10.0.0.0/8', '2001:db8::/32'] });
  assert.equal(check(rule, rcpt('x@elsewhere.test', { ip: '10.1.2.3' })).kind, 'pass');
  assert.equal(check(rule, rcpt('user%x@example.com', { ip: '2001:db8::5' })).kind, 'pass', 'not checked further');
  assert.equal(check(rule, rcpt('x@elsewhere.test', { auth: true })).kind, 'pass');
  assert.equal(reason(check(rule, rcpt('x@elsewhere.test', { ip: '11.0.0.1' }))), 'foreign_domain');
  const noAuthRelay = make({ ...local, authenticatedMayRelay: false });
  assert.equal(reason(check(noAuthRelay, rcpt('x@elsewhere.test', { auth: true }))), 'foreign_domain');
});

test('auth_required at MAIL on listeners in requireAuthOn (default submission, smtps) → 530 5.7.0', () => {
  const rule = make(local);
  const needAuth: Finding = { kind: 'reject', reason: 'auth_required', reply: { code: 530, enhanced: '5.7.0', text: 'Authentication required' } };
  assert.deepEqual(check(rule, mail({ role: 'submission' })), needAuth);
  assert.deepEqual(check(rule, mail({ role: 'smtps' })), needAuth);
  assert.equal(check(rule, mail({ role: 'smtp' })).kind, 'pass');
  assert.equal(check(rule, mail({ role: 'submission', auth: true })).kind, 'pass');
  assert.equal(check(make({ ...local, relayNetworks: ['10.0.0.0/8'] }), mail({ role: 'submission', ip: '10.0.0.1' })).kind, 'pass', 'relay networks need no AUTH');
  const smtpToo = make({ ...local, requireAuthOn: ['smtp'] });
  assert.equal(reason(check(smtpToo, mail({ role: 'smtp' }))), 'auth_required');
  assert.equal(check(smtpToo, mail({ role: 'submission' })).kind, 'pass');
});

test('relayReply: a custom template with {address} filled and echoed safely', () => {
  const rule = make({ ...local, relayReply: '550 5.7.54 {address} relaying denied' });
  assert.deepEqual(check(rule, rcpt('x@elsewhere.test')), { kind: 'reject', reason: 'foreign_domain', reply: { code: 550, enhanced: '5.7.54', text: 'x@elsewhere.test relaying denied' } });
  assert.equal(relayRule.settings.safeParse({ relayReply: '550 4.7.1 classes differ' }).success, false);
  assert.equal(relayRule.settings.safeParse({ relayReply: 'Relay denied' }).success, false);
});

test('null_sender_rcpts: <> may have at most nullSenderMaxRecipients recipients let through', () => {
  const rule = make({ ...local, nullSenderMaxRecipients: 2 });
  const capped: Finding = { kind: 'reject', reason: 'null_sender_rcpts', reply: { code: 550, enhanced: '5.5.3', text: '<u@example.com>: Too many recipients for the null sender' } };
  assert.equal(check(rule, rcpt('u@example.com', { sender: '', forwarded: 0 })).kind, 'pass');
  assert.equal(check(rule, rcpt('u@example.com', { sender: '', forwarded: 1 })).kind, 'pass');
  assert.deepEqual(check(rule, rcpt('u@example.com', { sender: '', forwarded: 2 })), capped, 'pipelined recipients count too');
  assert.equal(check(rule, rcpt('u@example.com', { sender: 'a@remote.test', forwarded: 5 })).kind, 'pass', 'only for <>');
  assert.equal(check(make(local), rcpt('u@example.com', { sender: '', forwarded: 1000 })).kind, 'pass', 'default: no limit');
  assert.equal(relayRule.settings.safeParse({ nullSenderMaxRecipients: 0 }).success, false);
});

test('etrn_denied: ETRN without relay rights for a node not in etrnDomains → 554 5.7.1', () => {
  const rule = make({ ...local, etrnDomains: ['queue.test'], relayNetworks: ['10.0.0.0/8'] });
  assert.deepEqual(check(rule, etrn('example.com')), { kind: 'reject', reason: 'etrn_denied', reply: { code: 554, enhanced: '5.7.1', text: '<example.com>: Etrn command rejected: Access denied' } });
  assert.equal(check(rule, etrn('queue.test')).kind, 'pass');
  assert.equal(check(rule, etrn('@QUEUE.test.')).kind, 'pass', '@domain form, normalised');
  assert.equal(reason(check(rule, etrn('#queue.test'))), 'etrn_denied');
  assert.equal(check(rule, etrn('example.com', { ip: '10.9.9.9' })).kind, 'pass', 'relay clients may flush any queue');
  assert.equal(check(rule, etrn('example.com', { auth: true })).kind, 'pass');
  const f = check(rule, etrn('a\r\nb'));
  assert.equal(f.kind === 'reject' && f.reply?.text, '<a??b>: Etrn command rejected: Access denied', 'control characters are not echoed');
});

test('settings: defaults and validation', () => {
  assert.deepEqual(relayRule.settings.parse({}), {
    authenticatedMayRelay: true, requireAuthOn: ['submission', 'smtps'],
    nullSenderMaxRecipients: null, relayReply: '554 5.7.1 <{address}>: Relay access denied', etrnDomains: [],
  });
  assert.equal(relayRule.settings.safeParse({ localDomains: ['bad domain'] }).success, false);
  assert.equal(relayRule.settings.safeParse({ relayNetworks: ['10.0.0.0/33'] }).success, false);
  assert.equal(relayRule.settings.safeParse({ requireAuthOn: ['lmtp'] }).success, false);
});
