/**
 * rules/site.yaml and rule scopes end to end: clients on different 127.0.0.x addresses → doorman
 * (an smtp and a submission listener; relay, sender, a DNSBL scoped to the port-25 role, greylisting
 * scoped to one recipient domain) → a Postfix with AUTH that would relay anything (so every
 * refusal is doorman's), with a real rbldnsd for the DNSBL. A listed client is refused on port 25
 * and reaches the relay rule's 530 on submission; the sender rule reads site.yaml's domains; a
 * scope edited on disk applies after the reload; an old rule file keeps working and warns.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startPostfix, type Postfix } from '../helpers/postfix.js';
import { startRbldnsd, type Rbldnsd } from '../helpers/rbldnsd.js';
import { startSink, type Sink } from '../helpers/sink.js';
import { SmtpClient } from '../helpers/smtp.js';
import { eventually, useCleanup } from '../helpers/procs.js';

useCleanup();
let rbl: Rbldnsd;
let sink: Sink;
let postfix: Postfix;
let dm: Doorman;
let smtpPort = 0;
let submissionPort = 0;

const LISTED = '127.0.0.77';
const OUTSIDE = '127.0.0.78';
const TRUSTED = '127.0.0.79';

const SITE = `localDomains: [example.com, example.org]
relayNetworks: [127.0.0.1/32]
trustedNetworks: [${TRUSTED}]
`;
const DNSBL = `rule: dnsbl
scope:
  listeners: [smtp]
settings:
  zones:
    - zone: bl.test
      answers: ["127.0.0.2"]
`;
const GREYLIST = `rule: greylist
scope:
  recipientDomains: [example.com]
settings:
  delay: 3600000
`;

before(async () => {
  rbl = await startRbldnsd([{ name: 'bl.test', type: 'ip4set', lines: [':127.0.0.2:Listed by bl.test', '127.0.0.2', LISTED] }]);
  sink = await startSink();
  postfix = await startPostfix({ relayPort: sink.port, openRelay: true, sasl: { alice: 'wonderland' } });
  dm = await startDoorman({
    backendPort: postfix.port,
    env: { DOORMAN_LISTEN: '', DOORMAN_DNS_SERVERS: rbl.server },
    config: 'listen:\n  - address: 127.0.0.1:0\n    role: smtp\n    name: mx\n  - address: 127.0.0.1:0\n    role: submission\n    authPlaintext: true\n',
    rules: { 'site.yaml': SITE, 'relay.yaml': 'rule: relay\n', 'sender.yaml': 'rule: sender\n', 'dnsbl.yaml': DNSBL, 'greylist.yaml': GREYLIST },
  });
  const listeners = dm.logs().find((l) => l.msg === 'doorman started')?.listeners as { name: string; port: number }[];
  smtpPort = listeners.find((l) => l.name === 'mx')?.port ?? 0;
  submissionPort = listeners.find((l) => l.name !== 'mx')?.port ?? 0;
});
after(async () => {
  await dm?.stop();
  await postfix?.stop();
  await sink?.stop();
  await rbl?.stop();
});

test('the port-25 role refuses a DNSBL-listed client at connect', async () => {
  const c = await SmtpClient.greet(smtpPort, { localAddress: LISTED, timeout: 5000 });
  const r = c.greeting;
  assert.equal(r.code, 554);
  assert.equal(r.text, '5.7.1 Service unavailable; client [127.0.0.77] blocked using bl.test');
  c.close();
});

test('the same client on submission is greeted, offered AUTH, and refused at MAIL by the relay rule (530), not the DNSBL', async () => {
  const c = await SmtpClient.open(submissionPort, { localAddress: LISTED, ehlo: 'laptop.example.net' });
  assert.match(c.keywords.get('AUTH') ?? '', /PLAIN/);
  const r = await c.cmd('MAIL FROM:<someone@example.net>');
  assert.equal(r.code, 530);
  assert.equal(r.text, '5.7.0 Authentication required');
  assert.equal((await c.cmd('AUTH PLAIN ' + Buffer.from('\0alice@backend.test\0wonderland').toString('base64'))).code, 235);
  assert.equal((await c.cmd('MAIL FROM:<alice@example.com>')).code, 250);
  assert.equal((await c.cmd('RCPT TO:<friend@elsewhere.example>')).code, 250, 'AUTH relays');
  c.close();
});

test('greylisting scoped to example.com greylists it and not example.org', async () => {
  const c = await SmtpClient.open(smtpPort, { localAddress: OUTSIDE, ehlo: 'mail.example.net' });
  assert.equal((await c.cmd('MAIL FROM:<news@example.net>')).code, 250);
  const grey = await c.cmd('RCPT TO:<bob@example.com>');
  assert.equal(grey.code, 451);
  assert.equal(grey.text, '4.7.1 Greylisted, try again later');
  assert.equal((await c.cmd('RCPT TO:<carol@example.org>')).code, 250);
  c.close();
});

test('the sender rule reads site.yaml: a local sender from outside is refused, from a trusted network not', async () => {
  const c = await SmtpClient.open(smtpPort, { localAddress: OUTSIDE, ehlo: 'mail.example.net' });
  const r = await c.cmd('MAIL FROM:<ceo@example.org>');
  assert.equal(r.code, 553);
  assert.equal(r.text, '5.7.1 <ceo@example.org>: Sender address rejected: not owned by you');
  c.close();
  const t = await SmtpClient.open(smtpPort, { localAddress: TRUSTED, ehlo: 'backup-mx.example.net' });
  assert.equal((await t.cmd('MAIL FROM:<ceo@example.org>')).code, 250, 'a backup MX passes our own senders on');
  const relay = await t.cmd('RCPT TO:<x@elsewhere.example>');
  assert.equal(relay.code, 554, 'but gets no relay rights');
  assert.equal((await t.cmd('RCPT TO:<carol@example.org>')).code, 250);
  t.close();
});

test('a scope edited on disk applies after the reload', async () => {
  const reloads = () => dm.logs().filter((l) => l.msg === 'rules reloaded').length;
  const before = reloads();
  fs.writeFileSync(path.join(dm.rulesDir, 'greylist.yaml'), GREYLIST.replace('[example.com]', '[example.org]'));
  await eventually(() => reloads() > before, 5000);
  const c = await SmtpClient.open(smtpPort, { localAddress: OUTSIDE, ehlo: 'mail.example.net' });
  assert.equal((await c.cmd('MAIL FROM:<news@example.net>')).code, 250);
  assert.equal((await c.cmd('RCPT TO:<bob@example.com>')).code, 250);
  assert.equal((await c.cmd('RCPT TO:<carol@example.org>')).code, 451);
  c.close();
});

test('an old rule file with its own lists and failMode keeps working and logs file:line to move them', async () => {
  const old = await startDoorman({
    backendPort: postfix.port,
    rules: {
      'relay.yaml': 'rule: relay\nsettings:\n  localDomains: [example.com]\n  relayNetworks: [127.0.0.1/32]\n',
      'greylist.yaml': 'rule: greylist\nsettings:\n  delay: 3600000\n  failMode: open\n',
    },
  });
  try {
    const warns = old.logs().filter((l) => l.level === 40).map((l) => l.msg);
    assert.ok(warns.some((m) => /relay\.yaml:3: settings\.localDomains: move this list to rules\/site\.yaml/.test(m)), warns.join('\n'));
    assert.ok(warns.some((m) => /relay\.yaml:4: settings\.relayNetworks: move this list to rules\/site\.yaml/.test(m)), warns.join('\n'));
    assert.ok(warns.some((m) => /greylist\.yaml:4: settings\.failMode: .*onError: pass/.test(m)), warns.join('\n'));
    const c = await SmtpClient.open(old.port, { localAddress: OUTSIDE, ehlo: 'mail.example.net' });
    assert.equal((await c.cmd('MAIL FROM:<news@example.net>')).code, 250);
    assert.equal((await c.cmd('RCPT TO:<x@elsewhere.example>')).code, 554);
    assert.equal((await c.cmd('RCPT TO:<bob@example.com>')).code, 451);
    c.close();
  } finally {
    await old.stop();
  }
});
