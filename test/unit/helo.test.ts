/**
 * The helo rule: HELO/EHLO argument syntax (RFC 1123 host names, RFC 5321 address literals),
 * FQDN, bare IPs, doorman's own names and addresses, and literals that are not the client's.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { heloRule } from '../../src/rules/helo.js';
import type { SessionEvent, SessionSnapshot } from '../../src/pipeline/events.js';
import { stagesOf, type Finding, type Rule, type RuleDeps } from '../../src/pipeline/rule.js';
import { parseAddress } from '../../src/net/ip.js';
import { createMetrics } from '../../src/metrics/registry.js';
import { MemoryStore } from '../../src/store/store.js';
import { checkRule, noDns } from '../helpers/rule-fixtures.js';

const deps = (ownAddresses: string[] = ['198.51.100.25']): RuleDeps => ({ ownNames: ['mx.doorman.test'], ownAddresses, resolver: noDns, store: new MemoryStore(), metrics: createMetrics({ version: 't', defaults: false }), log: { warn: () => undefined, info: () => undefined }, now: () => 0, checkOnly: true });
const snap = (ip: string, localAddress: string): SessionSnapshot => ({
  id: 's', client: parseAddress(ip), clientPort: 1, listener: { name: 'l', role: 'smtp' }, localAddress,
  tls: false, helo: null, esmtp: false, auth: null, transaction: 0, sender: null, recipients: [], recipientsForwarded: 0, acceptedBy: null, authResults: [],
  ended: new AbortController().signal,
});
const helo = (name: string, ip = '192.0.2.5', localAddress = '203.0.113.1'): SessionEvent => ({ stage: 'helo', verb: 'EHLO', name, session: snap(ip, localAddress) });
const make = (settings: unknown = {}, d = deps()): Rule => heloRule.create('helo', heloRule.settings.parse(settings), d);
const check = (rule: Rule, ev: SessionEvent) => checkRule(rule, ev) as Finding;
const rejected = (reason: string, code: number, enhanced: string, name: string, text: string): Finding => ({ kind: 'reject', reason, reply: { code, enhanced, text: `<${name}>: Helo command rejected: ${text}` } });

test('stage helo only, bypassable; other stages pass', () => {
  const rule = make();
  assert.deepEqual(stagesOf(rule), ['helo']);
  assert.equal(rule.bypassable, true);
  assert.equal(check(rule, { stage: 'connect', session: snap('192.0.2.5', '203.0.113.1') }).kind, 'pass');
});

test('valid FQDNs pass (case, trailing dot, digits, hyphens, underscore tolerated)', () => {
  const rule = make();
  for (const n of ['mail.example.com', 'MAIL.Example.COM.', 'a-1.b2.example', 'host_1.example.org', `${'a'.repeat(63)}.example`]) {
    assert.equal(check(rule, helo(n)).kind, 'pass', n);
  }
});

test('invalid host names → 501 5.5.2 Invalid name', () => {
  const rule = make();
  for (const n of ['bad name.example', 'ex!ample.com', 'a..b.example', '.example.com', `${'a'.repeat(64)}.example`, `${'abcdefghi.'.repeat(26)}com`, '-']) {
    assert.deepEqual(check(rule, helo(n)), rejected('invalid name', 501, '5.5.2', n, 'Invalid name'), n);
  }
});

test('non_fqdn: a name without a dot → 504 5.5.2, unless requireFqdn is false', () => {
  assert.deepEqual(check(make(), helo('localhost')), rejected('need fully-qualified hostname', 504, '5.5.2', 'localhost', 'need fully-qualified hostname'));
  assert.equal(check(make(), helo('single.')).kind, 'reject', 'a trailing dot alone does not make an FQDN');
  assert.equal(check(make({ requireFqdn: false }), helo('localhost')).kind, 'pass');
});

test('bare IP → 501 5.5.2 unless allowBareIp; then it must be the client\'s', () => {
  assert.deepEqual(check(make(), helo('192.0.2.5')), rejected('invalid name', 501, '5.5.2', '192.0.2.5', 'Invalid name'));
  assert.equal(check(make(), helo('2001:db8::1', '2001:db8::1')).kind, 'reject');
  const rule = make({ allowBareIp: true });
  assert.equal(check(rule, helo('192.0.2.5')).kind, 'pass');
  assert.deepEqual(check(rule, helo('192.0.2.9')), rejected('address literal mismatch', 550, '5.7.1', '192.0.2.9', 'Address literal mismatch'));
  assert.deepEqual(check(rule, helo('198.51.100.25')), rejected('you are not me', 550, '5.7.1', '198.51.100.25', 'You are not me'));
});

test('address literals: the client\'s own [a.b.c.d] / [IPv6:…] pass; malformed → 501 Invalid ip address', () => {
  const rule = make();
  assert.equal(check(rule, helo('[192.0.2.5]')).kind, 'pass');
  assert.equal(check(rule, helo('[IPv6:2001:db8::1]', '2001:db8::1')).kind, 'pass');
  assert.equal(check(rule, helo('[ipv6:2001:DB8:0::1]', '2001:db8::1')).kind, 'pass', 'IPv6 compared normalised, tag case-insensitive');
  for (const n of ['[192.0.2.256]', '[2001:db8::1]', '[IPv6:192.0.2.5]', '[example.com]', '[192.0.2.5', '[]']) {
    assert.deepEqual(check(rule, helo(n)), rejected('invalid ip address', 501, '5.5.2', n, 'Invalid ip address'), n);
  }
});

test('literal: refused when allowAddressLiteral is false', () => {
  assert.deepEqual(check(make({ allowAddressLiteral: false }), helo('[192.0.2.5]')), rejected('address literal not allowed', 501, '5.5.2', '[192.0.2.5]', 'Address literal not allowed'));
});

test('literal_mismatch: a literal that is not the client\'s address → 550 5.7.1, unless literalMustMatch is false', () => {
  assert.deepEqual(check(make(), helo('[192.0.2.9]')), rejected('address literal mismatch', 550, '5.7.1', '[192.0.2.9]', 'Address literal mismatch'));
  assert.equal(check(make(), helo('[IPv6:2001:db8::2]', '2001:db8::1')).kind, 'reject');
  assert.equal(check(make({ literalMustMatch: false }), helo('[192.0.2.9]')).kind, 'pass');
});

test('own_address: doorman\'s addresses (ownAddresses or the local address) → You are not me, unless also the client\'s', () => {
  const notMe = (n: string) => rejected('you are not me', 550, '5.7.1', n, 'You are not me');
  assert.deepEqual(check(make({ literalMustMatch: false }), helo('[198.51.100.25]')), notMe('[198.51.100.25]'));
  assert.deepEqual(check(make({ literalMustMatch: false }), helo('[203.0.113.1]')), notMe('[203.0.113.1]'), 'the local address the client reached');
  assert.equal(check(make(), helo('[198.51.100.25]', '198.51.100.25')).kind, 'pass', 'a client on doorman\'s own host');
  const lenient = make({ rejectOwnName: false, literalMustMatch: false });
  assert.equal(check(lenient, helo('[198.51.100.25]')).kind, 'pass');
  const mismatchOnly = make({ rejectOwnName: false });
  assert.equal((check(mismatchOnly, helo('[198.51.100.25]')) as { reason: string }).reason, 'address literal mismatch');
});

test('own_name: deps.ownNames and settings ownNames (case, trailing dot) → 550 5.7.1 You are not me', () => {
  const rule = make({ ownNames: ['Alias.Doorman.test.'] });
  assert.deepEqual(check(rule, helo('MX.doorman.test.')), rejected('you are not me', 550, '5.7.1', 'MX.doorman.test.', 'You are not me'));
  assert.equal(check(rule, helo('alias.doorman.test')).kind, 'reject');
  assert.equal(check(rule, helo('other.doorman.test')).kind, 'pass');
  assert.equal(check(make({ rejectOwnName: false }), helo('mx.doorman.test')).kind, 'pass');
});

test('settings: defaults and strictness', () => {
  assert.deepEqual(heloRule.settings.parse({}), { requireFqdn: true, allowBareIp: false, allowAddressLiteral: true, rejectOwnName: true, ownNames: [], literalMustMatch: true });
  assert.equal(heloRule.settings.safeParse({ requireFQDN: true }).success, false);
});
