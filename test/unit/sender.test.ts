/**
 * The sender rule: local-domain senders from outside (not_owned) and senders an authenticated
 * login does not own (login_mismatch, from senderLogins); the null sender is never forged.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { senderRule } from '../../src/rules/sender.js';
import type { SessionEvent, SessionSnapshot } from '../../src/pipeline/events.js';
import { stagesOf, type Finding, type Rule, type RuleDeps } from '../../src/pipeline/rule.js';
import { parseAddress } from '../../src/net/ip.js';
import { checkRule, pathOf, ruleDeps } from '../helpers/rule-fixtures.js';

const deps = (): RuleDeps => ruleDeps();
const snap = (ip: string, login: string | null | undefined): SessionSnapshot => ({
  id: 's', client: parseAddress(ip), clientPort: 1, listener: { name: 'l', role: 'submission' }, localAddress: '127.0.0.1',
  tls: true, helo: 'client.example', esmtp: true, auth: login === undefined ? null : { mechanism: 'PLAIN', login }, transaction: 1,
  sender: null, recipients: [], recipientsForwarded: 0, acceptedBy: null, authResults: [], ended: new AbortController().signal,
});
/** MAIL FROM:<raw> from `ip`, authenticated as `login` when given (null: AUTH without a login name). */
const mail = (raw: string, login?: string | null, ip = '192.0.2.5'): SessionEvent => ({ stage: 'mail', sender: pathOf(raw), params: [], session: snap(ip, login) });
const make = (settings: unknown = {}): Rule => senderRule.create('sender', senderRule.settings.parse(settings), deps());
const check = (rule: Rule, ev: SessionEvent) => checkRule(rule, ev) as Finding;
const notOwned = (raw: string): Finding => ({ kind: 'reject', reason: 'not_owned', reply: { code: 553, enhanced: '5.7.1', text: `<${raw}>: Sender address rejected: not owned by you` } });
const mismatch = (raw: string, login: string): Finding => ({ kind: 'reject', reason: 'login_mismatch', reply: { code: 553, enhanced: '5.7.1', text: `<${raw}>: Sender address rejected: not owned by user ${login}` } });

test('stage mail only; not bypassable; other stages pass', () => {
  const rule = make({ localDomains: ['example.com'] });
  assert.deepEqual(stagesOf(rule), ['mail']);
  assert.equal(rule.bypassable, false);
  assert.equal(check(rule, { stage: 'connect', session: snap('192.0.2.5', undefined) }).kind, 'pass');
});

test('not_owned: a local-domain sender from an outside, unauthenticated client → 553 5.7.1', () => {
  const rule = make({ localDomains: ['example.com', '*.corp.test'], relayNetworks: ['10.0.0.0/8', '2001:db8::/32'] });
  assert.deepEqual(check(rule, mail('ceo@example.com')), notOwned('ceo@example.com'));
  assert.deepEqual(check(rule, mail('CEO@Example.COM.')), notOwned('CEO@Example.COM.'), 'domain normalised, address echoed as sent');
  assert.equal(check(rule, mail('x@mail.corp.test')).kind, 'reject');
  assert.equal(check(rule, mail('x@remote.test')).kind, 'pass', 'not a local domain');
  assert.equal(check(rule, mail('ceo@example.com', undefined, '10.2.3.4')).kind, 'pass', 'relay networks own local senders');
  assert.equal(check(rule, mail('ceo@example.com', undefined, '2001:db8::9')).kind, 'pass');
  assert.equal(check(rule, mail('ceo@example.com', 'bob')).kind, 'pass', 'authenticated, no senderLogins');
  assert.equal(check(make(), mail('ceo@example.com')).kind, 'pass', 'no localDomains: nothing to forge');
});

test('the null sender is never forged', () => {
  assert.equal(check(make({ localDomains: ['example.com'] }), mail('')).kind, 'pass');
  assert.equal(check(make({ senderLogins: { 'example.com': 'alice' }, requireOwnedSender: true }), mail('', 'bob')).kind, 'pass');
});

test('login_mismatch: senderLogins by address, @domain or domain; logins case-insensitive', () => {
  const rule = make({ localDomains: ['example.com'], senderLogins: { 'Boss@Example.com': ['alice', 'Assistant'], '@example.com': 'staff', 'other.test': ['carol'] } });
  assert.equal(check(rule, mail('boss@example.com', 'ALICE')).kind, 'pass');
  assert.equal(check(rule, mail('BOSS@example.com', 'assistant')).kind, 'pass');
  assert.deepEqual(check(rule, mail('boss@example.com', 'staff')), mismatch('boss@example.com', 'staff'), 'the address entry wins over its domain');
  assert.equal(check(rule, mail('anyone@example.com', 'staff')).kind, 'pass');
  assert.deepEqual(check(rule, mail('anyone@example.com', 'Mallory')), mismatch('anyone@example.com', 'Mallory'));
  assert.equal(check(rule, mail('x@other.test', 'carol')).kind, 'pass');
  assert.equal(check(rule, mail('x@other.test', 'alice')).kind, 'reject');
  assert.deepEqual(check(rule, mail('x@other.test', null)), { kind: 'reject', reason: 'login_mismatch', reply: { code: 553, enhanced: '5.7.1', text: '<x@other.test>: Sender address rejected: not owned by user' } }, 'AUTH without a login name owns nothing');
});

test('senderLogins keys ignore one trailing dot, as every domain match does', () => {
  const rule = make({ senderLogins: { 'example.com.': 'alice', '@other.test.': 'bob' } });
  assert.equal(check(rule, mail('x@example.com', 'alice')).kind, 'pass');
  assert.deepEqual(check(rule, mail('x@example.com', 'mallory')), mismatch('x@example.com', 'mallory'), 'the entry applies: only alice owns example.com');
  assert.deepEqual(check(rule, mail('y@other.test', 'alice')), mismatch('y@other.test', 'alice'));
});

test('requireOwnedSender: an authenticated client may not use a sender nobody owns', () => {
  const logins = { 'example.com': 'alice' };
  assert.equal(check(make({ senderLogins: logins }), mail('x@unlisted.test', 'alice')).kind, 'pass');
  assert.deepEqual(check(make({ senderLogins: logins, requireOwnedSender: true }), mail('x@unlisted.test', 'alice')), mismatch('x@unlisted.test', 'alice'));
  assert.equal(check(make({ senderLogins: logins, requireOwnedSender: true }), mail('x@example.com', 'alice')).kind, 'pass');
});

test('notOwnedReply and mismatchReply templates: {address} and {login} filled and echoed safely', () => {
  const rule = make({
    localDomains: ['example.com'],
    senderLogins: { 'example.com': 'alice' },
    notOwnedReply: '550 5.7.1 {address} is ours',
    mismatchReply: '550 5.7.1 {login} may not send as {address}',
  });
  assert.deepEqual(check(rule, mail('x@example.com')), { kind: 'reject', reason: 'not_owned', reply: { code: 550, enhanced: '5.7.1', text: 'x@example.com is ours' } });
  assert.deepEqual(check(rule, mail('x@example.com', 'eve\r\n')), { kind: 'reject', reason: 'login_mismatch', reply: { code: 550, enhanced: '5.7.1', text: 'eve?? may not send as x@example.com' } });
});

test('settings: defaults and validation', () => {
  const d = senderRule.settings.parse({});
  assert.deepEqual(d, {
    senderLogins: {}, requireOwnedSender: false,
    notOwnedReply: '553 5.7.1 <{address}>: Sender address rejected: not owned by you',
    mismatchReply: '553 5.7.1 <{address}>: Sender address rejected: not owned by user {login}',
  });
  const bad = (s: unknown) => assert.equal(senderRule.settings.safeParse(s).success, false, JSON.stringify(s));
  bad({ localDomains: ['not a domain'] });
  bad({ relayNetworks: ['nope'] });
  bad({ notOwnedReply: '553 4.7.1 classes differ' });
  bad({ senderLogins: { 'example.com': 5 } });
  bad({ extra: true });
});
