/**
 * dmarc rule pieces without DNS: the DMARC record (RFC 7489 §6.3), the organisational domain by
 * the Public Suffix List, relaxed and strict alignment, the header From's domains, the own-domain
 * check at data_headers, and the shipped rule file's settings.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { parse } from 'yaml';
import { aligned, dmarcRule, fromDomains, orgDomain, parseDmarcRecord } from '../../src/rules/dmarc.js';
import { checkRule, ruleDeps as deps, snapshot } from '../helpers/rule-fixtures.js';
import { parseCidr } from '../../src/net/ip.js';
import { DomainList } from '../../src/protocol/match.js';
import type { Finding } from '../../src/pipeline/rule.js';
import type { SessionEvent } from '../../src/pipeline/events.js';

test('parseDmarcRecord: tags, defaults (sp=p, relaxed, pct 100), invalid records', () => {
  assert.deepEqual(parseDmarcRecord('v=DMARC1; p=reject'), { p: 'reject', sp: 'reject', adkim: 'r', aspf: 'r', pct: 100 });
  assert.deepEqual(parseDmarcRecord('v=DMARC1;p=quarantine;sp=none;adkim=s;aspf=s;pct=20;rua=mailto:x@y'), { p: 'quarantine', sp: 'none', adkim: 's', aspf: 's', pct: 20 });
  assert.equal(parseDmarcRecord('v=DMARC1; p=bogus'), null, 'no valid p and no rua: no record');
  assert.deepEqual(parseDmarcRecord('v=DMARC1; p=bogus; rua=mailto:a@b')?.p, 'none', 'RFC 7489 §6.6.3: with rua, p=none');
  assert.equal(parseDmarcRecord('v=spf1 -all'), null);
  assert.equal(parseDmarcRecord('p=reject; v=DMARC1'), null, 'v= must come first');
  assert.equal(parseDmarcRecord('v=DMARC1; p=reject; pct=150')?.pct, 100);
});

test('orgDomain: the Public Suffix List, ICANN and private sections', () => {
  assert.equal(orgDomain('mail.example.org'), 'example.org');
  assert.equal(orgDomain('a.b.example.co.uk'), 'example.co.uk');
  assert.equal(orgDomain('example.org.'), 'example.org');
  assert.equal(orgDomain('foo.github.io'), 'foo.github.io', 'private section: github.io is a suffix');
  assert.equal(aligned('mail.example.org', 'news.example.org', 'r'), true);
  assert.equal(aligned('mail.example.org', 'example.org', 's'), false);
  assert.equal(aligned('Example.ORG', 'example.org', 's'), true);
  assert.equal(aligned('a.example.co.uk', 'b.other.co.uk', 'r'), false);
  assert.equal(aligned('a.github.io', 'b.github.io', 'r'), false);
});

test('fromDomains: addresses in angle brackets, bare, folded; comments and quoted strings ignored', () => {
  assert.deepEqual(fromDomains('Subject: x\r\nFrom: "Boss <ceo@evil.test>" <ceo@Example.COM>\r\n').domains, ['example.com']);
  assert.deepEqual(fromDomains('from:\r\n ceo@example.com (ceo@evil.test)\r\n').domains, ['example.com']);
  assert.deepEqual(fromDomains('From: a@one.test, B <b@two.test>\r\n').domains, ['two.test'], 'angle-addrs win when present');
  assert.deepEqual(fromDomains('From: a@one.test, b@two.test\r\n').domains, ['one.test', 'two.test']);
  assert.deepEqual(fromDomains('From: undisclosed\r\nX-From: x@y.test\r\n').domains, []);
});

const site = { localDomains: new DomainList(['example.com']), relayNetworks: [parseCidr('127.0.0.0/8')], trustedNetworks: [parseCidr('198.51.100.25')], lists: { localDomains: ['example.com'], relayNetworks: [], trustedNetworks: [] } };

test('data_headers: our domain in the header From from an outsider is refused; relay, trusted, authenticated or ownDomains false pass', () => {
  const rule = dmarcRule.create('dmarc', dmarcRule.settings.parse({}), deps({ site }));
  const ev = (headers: string, o: Parameters<typeof snapshot>[0] = {}): SessionEvent => ({ stage: 'data_headers', session: snapshot({ ip: '192.0.2.9', ...o }), headers: Buffer.from(headers), truncated: false });
  const f = checkRule(rule, ev('From: CEO <ceo@example.com>\r\nTo: x@example.com\r\n\r\n')) as Finding;
  assert.equal(f.kind, 'reject');
  assert.deepEqual(f.kind === 'reject' && f.reply, { code: 550, enhanced: '5.7.1', text: 'Message rejected: header From <ceo@example.com> not owned by you' });
  assert.equal((checkRule(rule, ev('From: a@other.test\r\n\r\n')) as Finding).kind, 'pass');
  assert.equal((checkRule(rule, ev('From: ceo@example.com\r\n\r\n', { ip: '127.0.0.9' })) as Finding).kind, 'pass', 'relayNetworks');
  assert.equal((checkRule(rule, ev('From: ceo@example.com\r\n\r\n', { ip: '198.51.100.25' })) as Finding).kind, 'pass', 'trustedNetworks');
  assert.equal((checkRule(rule, ev('From: ceo@example.com\r\n\r\n', { auth: { mechanism: 'PLAIN', login: 'ceo' } })) as Finding).kind, 'pass', 'authenticated');
  const off = dmarcRule.create('dmarc', dmarcRule.settings.parse({ ownDomains: false }), deps({ site }));
  assert.equal((checkRule(off, ev('From: ceo@example.com\r\n\r\n')) as Finding).kind, 'pass');
});

test('settings: defaults, and the shipped rules/dmarc.yaml is valid and in dry-run', () => {
  assert.deepEqual(dmarcRule.settings.parse({}), { quarantine: 'tag', temperror: 'pass', ownDomains: true, trustedSealers: [], minKeyBits: 1024, maxHeaderBytes: 1048576 });
  assert.throws(() => dmarcRule.settings.parse({ quarantine: 'drop' }));
  const shipped = parse(fs.readFileSync('rules/dmarc.yaml', 'utf8')) as { action: string; settings: unknown };
  assert.equal(shipped.action, 'dry-run');
  dmarcRule.settings.parse(shipped.settings);
});
