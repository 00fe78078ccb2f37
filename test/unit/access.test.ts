/**
 * The access rule: static allow/deny lists per stage (clients, HELO, senders, recipients), first
 * matching entry wins, deny → reject with the entry's reply (else none: the runner's stage
 * default), allow → accept; stages only for the lists given; never bypassable.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { accessRule } from '../../src/rules/access.js';
import type { SessionEvent, SessionSnapshot } from '../../src/pipeline/events.js';
import { stagesOf, type Finding, type Rule, type RuleDeps } from '../../src/pipeline/rule.js';
import { checkRule, pathOf, ruleDeps, snapshot } from '../helpers/rule-fixtures.js';

const deps = (): RuleDeps => ruleDeps();
const snap = (ip = '192.0.2.5'): SessionSnapshot => snapshot({ ip });
const connect = (ip: string): SessionEvent => ({ stage: 'connect', session: snap(ip) });
const helo = (name: string): SessionEvent => ({ stage: 'helo', verb: 'EHLO', name, session: snap() });
const mail = (raw: string): SessionEvent => ({ stage: 'mail', sender: pathOf(raw), params: [], session: snap() });
const rcpt = (raw: string): SessionEvent => ({ stage: 'rcpt', recipient: pathOf(raw), params: [], session: snap() });
const make = (settings: unknown): Rule => accessRule.create('access', accessRule.settings.parse(settings), deps());
const check = (rule: Rule, ev: SessionEvent) => checkRule(rule, ev) as Finding;
const kind = (rule: Rule, ev: SessionEvent) => check(rule, ev).kind;

test('a stage runs only when its list is given; the rule is not bypassable', () => {
  assert.deepEqual(stagesOf(make({})), []);
  assert.deepEqual(stagesOf(make({ clients: [{ deny: '10.0.0.0/8' }] })), ['connect']);
  assert.deepEqual(stagesOf(make({ helo: [{ deny: 'x' }], recipients: [{ deny: 'a@b' }] })), ['helo', 'rcpt']);
  const all = make({ clients: [{ deny: '10.0.0.0/8' }], helo: [{ deny: 'x' }], senders: [{ deny: 'a@b' }], recipients: [{ deny: 'a@b' }] });
  assert.deepEqual(stagesOf(all), ['connect', 'helo', 'mail', 'rcpt']);
  assert.equal(all.bypassable, false);
  assert.equal(all.type, 'access');
});

test('clients: CIDR or list of CIDRs, IPv4 and IPv6; deny → reject, allow → accept, else pass', () => {
  const rule = make({ clients: [{ allow: ['192.0.2.0/28', '2001:db8::/32'] }, { deny: '192.0.2.0/24' }] });
  assert.deepEqual(check(rule, connect('192.0.2.5')), { kind: 'accept', reason: 'allow 192.0.2.0/28,2001:db8::/32' });
  assert.equal(kind(rule, connect('2001:db8::7')), 'accept');
  assert.deepEqual(check(rule, connect('192.0.2.200')), { kind: 'reject', reason: 'deny 192.0.2.0/24' });
  assert.equal(kind(rule, connect('198.51.100.1')), 'pass');
  assert.equal(kind(rule, connect('2001:db9::1')), 'pass');
});

test('the first matching entry wins', () => {
  const denyFirst = make({ clients: [{ deny: '192.0.2.0/24' }, { allow: '192.0.2.5' }] });
  assert.equal(kind(denyFirst, connect('192.0.2.5')), 'reject');
  const allowFirst = make({ clients: [{ allow: '192.0.2.5' }, { deny: '192.0.2.0/24' }] });
  assert.equal(kind(allowFirst, connect('192.0.2.5')), 'accept');
  assert.equal(kind(allowFirst, connect('192.0.2.6')), 'reject');
});

test("deny uses the entry's reply and reason; without one the finding carries no reply (the stage default applies)", () => {
  const rule = make({ senders: [{ deny: 'spam@bad.test', reply: '554 5.7.1 Go away', reason: 'known spammer' }, { deny: 'bad.test' }] });
  assert.deepEqual(check(rule, mail('spam@bad.test')), { kind: 'reject', reason: 'known spammer', reply: { code: 554, enhanced: '5.7.1', text: 'Go away' } });
  const other = check(rule, mail('x@bad.test'));
  assert.equal(other.kind, 'reject');
  assert.equal('reply' in other, false);
});

test('helo: exact names and *.suffix, case-insensitive, one trailing dot ignored', () => {
  const rule = make({ helo: [{ allow: 'good.example' }, { deny: ['*.dyn.example', 'localhost'] }] });
  assert.equal(kind(rule, helo('GOOD.Example.')), 'accept');
  assert.equal(kind(rule, helo('host1.DYN.example')), 'reject');
  assert.equal(kind(rule, helo('dyn.example')), 'pass', '*.suffix does not match the domain itself');
  assert.equal(kind(rule, helo('localhost')), 'reject');
  assert.equal(kind(rule, helo('other.example')), 'pass');
});

test('senders: address, domain, @domain, *.subdomain, local@ and <> patterns', () => {
  const rule = make({
    senders: [
      { allow: 'boss@corp.test' },
      { deny: '<>', reason: 'null' },
      { deny: 'corp.test', reason: 'domain' },
      { deny: '@other.test', reason: 'at-domain' },
      { deny: '*.sub.test', reason: 'subdomain' },
      { deny: 'mailer-daemon@', reason: 'local' },
    ],
  });
  assert.equal(kind(rule, mail('Boss@CORP.test')), 'accept');
  const reason = (raw: string) => {
    const f = check(rule, mail(raw));
    return f.kind === 'pass' ? 'pass' : f.reason;
  };
  assert.equal(reason(''), 'null');
  assert.equal(reason('x@corp.test.'), 'domain');
  assert.equal(reason('x@other.test'), 'at-domain');
  assert.equal(reason('x@a.sub.test'), 'subdomain');
  assert.equal(reason('x@sub.test'), 'pass');
  assert.equal(reason('MAILER-DAEMON@anywhere.test'), 'local');
  assert.equal(reason('x@fine.test'), 'pass');
});

test('recipients: matched at rcpt; allow accepts only that recipient', () => {
  const rule = make({ recipients: [{ allow: 'abuse@corp.test' }, { deny: 'corp.test', reply: '550 5.1.1 No such user' }] });
  assert.equal(kind(rule, rcpt('abuse@corp.test')), 'accept');
  assert.deepEqual(check(rule, rcpt('x@corp.test')), { kind: 'reject', reason: 'deny corp.test', reply: { code: 550, enhanced: '5.1.1', text: 'No such user' } });
  assert.equal(kind(rule, rcpt('x@elsewhere.test')), 'pass');
});

test('other stages pass', () => {
  const rule = make({ clients: [{ deny: '0.0.0.0/0' }] });
  assert.equal(kind(rule, helo('x.example')), 'pass');
  assert.equal(kind(rule, { stage: 'quit', reason: 'QUIT', session: snap() }), 'pass');
});

test('settings: exactly one of allow/deny, valid CIDRs, address patterns and replies', () => {
  const bad = (s: unknown) => assert.equal(accessRule.settings.safeParse(s).success, false, JSON.stringify(s));
  bad({ clients: [{ allow: '10.0.0.0/8', deny: '10.0.0.0/8' }] });
  bad({ clients: [{ reply: '550 5.7.1 x' }] });
  bad({ clients: [{ deny: 'not-an-ip' }] });
  bad({ senders: [{ deny: '@' }] });
  bad({ helo: [{ deny: [] }] });
  bad({ helo: [{ deny: 'x', reply: '550 4.7.1 classes differ' }] });
  bad({ helo: [{ deny: 'x', extra: 1 }] });
  bad({ unknown: [] });
  assert.equal(accessRule.settings.safeParse({ clients: [{ deny: '10.0.0.0/8', reply: '554 5.7.1 no' }] }).success, true);
});
