/**
 * rules/site.yaml and rule scopes as the loader builds them: the site's lists reach relay, sender
 * and spf; old rule files keep working with warnings naming file:line; a rule list that widens the
 * site is reported; `scope:` parsing (roles, names, `!` negation, site names) and its validation;
 * `failMode` migrating to `onError`.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { loadRuleSet, type RuleSet, type RuleSetOptions } from '../../src/config/rules.js';
import { DoormanError, formatProblem } from '../../src/errors.js';
import type { SessionEvent, SessionSnapshot } from '../../src/pipeline/events.js';
import type { Finding } from '../../src/pipeline/rule.js';
import { inScope } from '../../src/pipeline/scope.js';
import { RULE_TYPES } from '../../src/rules/index.js';
import { checkRule, pathOf, ruleDeps, snapshot } from '../helpers/rule-fixtures.js';

const ROOT = path.resolve(import.meta.dirname, '../..');

function folder(files: Record<string, string>): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-site-'));
  for (const [n, t] of Object.entries(files)) fs.writeFileSync(path.join(dir, n), t);
  return dir;
}

function load(files: Record<string, string>, opts: RuleSetOptions = {}): RuleSet {
  const dir = folder(files);
  try {
    return loadRuleSet(dir, ruleDeps(), RULE_TYPES, opts);
  } finally {
    fs.rmSync(dir, { recursive: true });
  }
}

/** The problems of a folder that does not load, as `doorman check` prints them. */
function problems(files: Record<string, string>, opts: RuleSetOptions = {}): string[] {
  try {
    load(files, opts);
  } catch (e) {
    assert.ok(e instanceof DoormanError, String(e));
    return e.problems.map((p) => formatProblem({ ...p, file: path.basename(p.file) }));
  }
  assert.fail('expected the folder to be refused');
}

const warnings = (set: RuleSet) => set.warnings.map((p) => formatProblem({ ...p, file: path.basename(p.file) }));
const rule = (set: RuleSet, name: string) => {
  const r = set.rules.find((x) => x.rule.name === name);
  assert.ok(r, `rule ${name} loaded`);
  return r;
};
const sess = (o: Parameters<typeof snapshot>[0] = {}): SessionSnapshot => snapshot(o);
const mail = (from: string, o: Parameters<typeof snapshot>[0] = {}): SessionEvent => ({ stage: 'mail', session: sess(o), sender: pathOf(from), params: [] });
const rcpt = (to: string, o: Parameters<typeof snapshot>[0] = {}): SessionEvent => ({ stage: 'rcpt', session: sess({ sender: pathOf('a@example.org'), ...o }), recipient: pathOf(to), params: [] });
const kind = async (set: RuleSet, name: string, ev: SessionEvent) => ((await checkRule(rule(set, name).rule, ev)) as Finding).kind;

test('site.yaml reaches relay and sender: a domain listed only there is local, and forged from outside', async () => {
  const set = load({
    'site.yaml': 'localDomains: [example.com]\nrelayNetworks: [10.1.0.0/16]\ntrustedNetworks: [192.0.2.25]\n',
    'relay.yaml': 'rule: relay\n',
    'sender.yaml': 'rule: sender\n',
  });
  assert.deepEqual(warnings(set), []);
  assert.equal(await kind(set, 'relay', rcpt('bob@example.com')), 'pass');
  assert.equal(await kind(set, 'relay', rcpt('bob@example.net')), 'reject');
  assert.equal(await kind(set, 'relay', rcpt('bob@example.net', { ip: '10.1.2.3' })), 'pass', 'relayNetworks relay');
  assert.equal(await kind(set, 'relay', rcpt('bob@example.net', { ip: '192.0.2.25' })), 'reject', 'trustedNetworks get no relay rights');
  assert.equal(await kind(set, 'sender', mail('alice@example.com')), 'reject', 'a local sender from outside');
  assert.equal(await kind(set, 'sender', mail('alice@example.com', { ip: '10.1.2.3' })), 'pass');
  assert.equal(await kind(set, 'sender', mail('alice@example.com', { ip: '192.0.2.25' })), 'pass', 'a trusted forwarder');
  assert.equal(await kind(set, 'sender', mail('alice@example.org')), 'pass');
});

test('no site.yaml: no local domains, relay from 127.0.0.0/8 and ::1', async () => {
  const set = load({ 'relay.yaml': 'rule: relay\n' });
  assert.deepEqual(set.site.lists, { localDomains: [], relayNetworks: ['127.0.0.0/8', '::1'], trustedNetworks: [] });
  assert.equal(await kind(set, 'relay', rcpt('bob@example.com')), 'reject');
  assert.equal(await kind(set, 'relay', rcpt('bob@example.com', { ip: '127.0.0.1' })), 'pass');
  assert.equal(await kind(set, 'relay', rcpt('bob@example.com', { ip: '::1' })), 'pass');
});

test('site.yaml problems name file, line and key; it is not loaded as a rule', () => {
  assert.deepEqual(problems({ 'site.yaml': 'localDomains: [example.com]\nrelayNetworks:\n  - 10.0.0.0/8\n  - 300.1.1.1\nlocaldomains: []\n' }), [
    'site.yaml:4: relayNetworks.1: not an address or CIDR: 300.1.1.1',
    'site.yaml:5: localdomains: unknown key',
  ]);
  assert.deepEqual(load({ 'site.yaml': 'localDomains: [example.com]\n' }).rules, []);
});

test('an old rule file with its own lists keeps working, with a file:line warning to move them', async () => {
  const set = load({
    'relay.yaml': 'rule: relay\nsettings:\n  localDomains: [example.com]\n  relayNetworks: [10.1.0.0/16]\n',
    'sender.yaml': 'rule: sender\nsettings:\n  localDomains: [example.com]\n',
  });
  assert.deepEqual(warnings(set), [
    'relay.yaml:3: settings.localDomains: move this list to rules/site.yaml (localDomains: one list for every rule); until then this file\'s list is used for this rule',
    'relay.yaml:4: settings.relayNetworks: move this list to rules/site.yaml (relayNetworks: one list for every rule); until then this file\'s list is used for this rule',
    'sender.yaml:3: settings.localDomains: move this list to rules/site.yaml (localDomains: one list for every rule); until then this file\'s list is used for this rule',
  ]);
  assert.equal(await kind(set, 'relay', rcpt('bob@example.com')), 'pass');
  assert.equal(await kind(set, 'relay', rcpt('bob@example.net', { ip: '10.1.0.9' })), 'pass');
  assert.equal(await kind(set, 'relay', rcpt('bob@example.net', { ip: '127.0.0.1' })), 'reject', 'the file\'s list, not the default');
  assert.equal(await kind(set, 'sender', mail('alice@example.com')), 'reject');
});

test('a rule list that widens site.yaml is reported with what to move where; a narrower one is the rule\'s own', async () => {
  const set = load({
    'site.yaml': 'localDomains: [example.com, "*.example.org"]\nrelayNetworks: [10.0.0.0/8]\n',
    'relay.yaml': 'rule: relay\nsettings:\n  localDomains: [example.com, other.example, a.example.org]\n  relayNetworks: [10.1.0.0/16]\n',
    'sender.yaml': 'rule: sender\nsettings:\n  relayNetworks: [10.0.0.0/8]\n  localDomains: []\n',
  });
  const dir = set.files[0] ? path.dirname(set.files[0]) : '';
  assert.deepEqual(warnings(set), [
    `relay.yaml:3: settings.localDomains: other.example not in localDomains of ${dir}/site.yaml: add it there (then remove this copy), or remove it here; this rule uses only this file's list`,
    `sender.yaml:4: settings.localDomains: empty, so this rule has no localDomains while ${dir}/site.yaml lists example.com, *.example.org: remove the key here to use the site's`,
    `sender.yaml:3: settings.relayNetworks: same as relayNetworks of ${dir}/site.yaml: remove this copy (a change there would not reach this rule)`,
  ]);
  assert.equal(await kind(set, 'relay', rcpt('bob@other.example')), 'pass', 'still this file\'s list');
  assert.equal(await kind(set, 'relay', rcpt('bob@x.example.org')), 'reject', 'narrowed');
});

test('failMode becomes onError with a file:line warning; both set and disagreeing is an error', () => {
  const grey = (top: string, mode: string) => `rule: greylist\n${top}settings:\n  delay: 1000\n  failMode: ${mode}\n`;
  const open = load({ 'g.yaml': grey('', 'open') });
  assert.equal(rule(open, 'g').onError, 'pass');
  assert.deepEqual(warnings(open), ['g.yaml:4: settings.failMode: failMode is replaced by the rule file\'s onError: remove it and write onError: pass (top level)']);
  const closed = load({ 'g.yaml': grey('', 'closed') });
  assert.equal(rule(closed, 'g').onError, 'tempfail');
  assert.equal(rule(load({ 'g.yaml': grey('onError: tempfail\n', 'closed') }), 'g').onError, 'tempfail');
  assert.deepEqual(problems({ 'g.yaml': grey('onError: pass\n', 'closed') }), [
    'g.yaml:5: settings.failMode: failMode: closed means onError: tempfail, but the file says onError: pass: keep only onError',
  ]);
  assert.deepEqual(problems({ 'r.yaml': 'rule: ratelimit\nsettings:\n  failMode: shut\n  limits: [{ name: c, count: connections, limit: 1 }]\n' }), [
    'r.yaml:3: settings.failMode: expected open or closed (better: remove it and set onError: pass | tempfail)',
  ]);
});

test('spf skipNetworks still skips, with a warning to write a scope', async () => {
  const set = load({ 'spf.yaml': 'rule: spf\nsettings:\n  skipNetworks: [192.0.2.0/24]\n' });
  assert.equal(await kind(set, 'spf', mail('a@example.org', { ip: '192.0.2.5' })), 'pass');
  assert.match(warnings(set).join('\n'), /^spf\.yaml:3: settings\.skipNetworks: deprecated \(still used\): write scope: \{ clients: \["!relayNetworks"/);
});

test('scope listeners: roles or configured names; an unknown one names the listeners configured', () => {
  const listeners = [{ name: 'mx', role: 'smtp' }, { name: 'submission@127.0.0.1:587', role: 'submission' }];
  const set = load({ 'helo.yaml': 'rule: helo\nscope:\n  listeners: [smtp, submission@127.0.0.1:587]\n' }, { listeners });
  const scope = rule(set, 'helo').scope;
  const helo = (l: SessionSnapshot['listener']): SessionEvent => ({ stage: 'helo', session: sess({ listener: l }), verb: 'EHLO', name: 'x' });
  assert.equal(inScope(scope, helo({ name: 'mx', role: 'smtp' })), true);
  assert.equal(inScope(scope, helo({ name: 'submission@127.0.0.1:587', role: 'submission' })), true);
  assert.equal(inScope(scope, helo({ name: 'other', role: 'submission' })), false);
  assert.equal(inScope(scope, helo({ name: 'tls', role: 'smtps' })), false);
  assert.deepEqual(problems({ 'helo.yaml': 'rule: helo\nscope:\n  listeners:\n    - smtp\n    - port25\n' }, { listeners }), [
    'helo.yaml:5: scope.listeners.1: no listener role or name "port25": roles are smtp, submission, smtps, milter, policy; the listeners configured are mx (smtp), submission@127.0.0.1:587 (submission)',
  ]);
});

test('scope clients: first match wins, `!` negates, only negations match the rest, site names', () => {
  const site = 'relayNetworks: [10.0.0.0/8]\ntrustedNetworks: [192.0.2.25]\n';
  const scopeOf = (clients: string) => rule(load({ 'site.yaml': site, 'helo.yaml': `rule: helo\nscope:\n  clients: ${clients}\n` }), 'helo').scope;
  const at = (ip: string): SessionEvent => ({ stage: 'helo', session: sess({ ip }), verb: 'EHLO', name: 'x' });
  const noRelay = scopeOf('["!relayNetworks"]');
  assert.equal(inScope(noRelay, at('10.2.3.4')), false);
  assert.equal(inScope(noRelay, at('198.51.100.1')), true);
  const ordered = scopeOf('["!10.9.0.0/16", relayNetworks, trustedNetworks]');
  assert.equal(inScope(ordered, at('10.9.1.1')), false, 'the negation comes first');
  assert.equal(inScope(ordered, at('10.2.3.4')), true);
  assert.equal(inScope(ordered, at('192.0.2.25')), true);
  assert.equal(inScope(ordered, at('198.51.100.1')), false, 'a list with positive entries: no match, not in scope');
  const v6 = scopeOf('["2001:db8::/32"]');
  assert.equal(inScope(v6, at('2001:db8::7')), true);
  assert.equal(inScope(v6, at('::ffff:10.0.0.1')), false);
  assert.deepEqual(problems({ 'helo.yaml': 'rule: helo\nscope:\n  clients: [10.0.0.0/33, "!relaynetworks"]\n' }), [
    'helo.yaml:3: scope.clients.0: not an address, CIDR or site list (relayNetworks, trustedNetworks): 10.0.0.0/33',
    'helo.yaml:3: scope.clients.1: not an address, CIDR or site list (relayNetworks, trustedNetworks): !relaynetworks',
  ]);
  assert.deepEqual(problems({ 'helo.yaml': 'rule: helo\nscope:\n  clients: []\n  authenticated: maybe\n' }).length, 2);
});

test('scope authenticated and recipientDomains (localDomains from site.yaml)', () => {
  const set = load({
    'site.yaml': 'localDomains: [example.com]\n',
    'g.yaml': 'rule: greylist\nscope:\n  authenticated: false\n  recipientDomains: [localDomains, "*.example.net"]\n',
  });
  const scope = rule(set, 'g').scope;
  assert.equal(inScope(scope, rcpt('bob@example.com')), true);
  assert.equal(inScope(scope, rcpt('bob@Example.COM.')), true);
  assert.equal(inScope(scope, rcpt('bob@a.example.net')), true);
  assert.equal(inScope(scope, rcpt('bob@example.org')), false);
  assert.equal(inScope(scope, rcpt('bob@example.com', { auth: { mechanism: 'PLAIN', login: 'bob' } })), false);
  const neg = rule(load({ 'g.yaml': 'rule: greylist\nscope: { recipientDomains: ["!example.com"] }\n' }), 'g').scope;
  assert.equal(inScope(neg, rcpt('bob@example.com')), false);
  assert.equal(inScope(neg, rcpt('bob@example.org')), true);
  assert.deepEqual(problems({ 'g.yaml': 'rule: greylist\nscope: { recipientDomains: ["exa mple.com"] }\n' }), [
    'g.yaml:2: scope.recipientDomains.0: not a domain pattern or localDomains: exa mple.com',
  ]);
});

test('recipientDomains on a rule that acts before any recipient is warned: it would never apply', () => {
  const set = load({ 'helo.yaml': 'rule: helo\nscope:\n  listeners: [smtp]\n  recipientDomains: [example.com]\n' });
  assert.deepEqual(warnings(set), ['helo.yaml:4: scope.recipientDomains: this helo rule acts at helo, before any recipient is known: a recipientDomains scope means it never applies']);
});

test('the shipped rules folder loads without warnings; dnsbl is scoped to port 25, spf skips the relay networks', () => {
  const dir = folder({});
  for (const f of fs.readdirSync(path.join(ROOT, 'rules'))) {
    fs.writeFileSync(path.join(dir, f), fs.readFileSync(path.join(ROOT, 'rules', f), 'utf8').replace(/^enabled: false$/m, 'enabled: true'));
  }
  try {
    const set = loadRuleSet(dir, ruleDeps(), RULE_TYPES);
    assert.deepEqual(warnings(set), []);
    assert.deepEqual([...(rule(set, 'dnsbl').scope?.listeners ?? [])], ['smtp']);
    const spfScope = rule(set, 'spf').scope;
    assert.equal(inScope(spfScope, mail('a@example.org', { ip: '127.0.0.1' })), false);
    assert.equal(inScope(spfScope, mail('a@example.org', { ip: '192.0.2.5' })), true);
  } finally {
    fs.rmSync(dir, { recursive: true });
  }
});
