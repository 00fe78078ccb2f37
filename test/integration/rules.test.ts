/**
 * Rules end to end: a rule's reply reaches the client with its code; a client refused at
 * connect costs the backend no connection; an allowlist cancels bypassable refusals; dry-run
 * only logs; tag adds a header; rule files reload on change and on SIGHUP, and an invalid file
 * keeps the last good rules; every refusal is counted in doorman_rejections_total and logged
 * with its rule name.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startFakeBackend, type FakeBackend } from '../helpers/fake-backend.js';
import { SmtpClient } from '../helpers/smtp.js';
import { eventually, useCleanup } from '../helpers/procs.js';

useCleanup();
let fb: FakeBackend;
let dm: Doorman;

const ACCESS = `rule: access
settings:
  clients:
    - allow: 127.0.0.10
    - deny: 127.0.0.66/32
      reply: "554 5.7.1 You are not welcome here"
  senders:
    - deny: "@spammer.example"
      reply: "550 5.7.1 Sender address rejected: spammer"
  recipients:
    - deny: nobody@example.com
`;
const HELO_ENFORCE = `rule: helo
action: enforce
`;
const HELO_DRY = `rule: helo
name: helo-dry
action: dry-run
settings:
  allowBareIp: false
  requireFqdn: false
`;

before(async () => {
  fb = await startFakeBackend('none');
  dm = await startDoorman({ backendPort: fb.port, rules: { '10-access.yaml': ACCESS, '20-helo.yaml': HELO_ENFORCE, '30-helo-dry.yaml': HELO_DRY } });
});
after(async () => {
  await dm?.stop();
  await fb?.close();
});

test('a client denied at connect gets the rule’s 554 and never costs the backend a connection', async () => {
  const before = fb.connections;
  const c = await SmtpClient.greet(dm.port, { localAddress: '127.0.0.66' });
  const g = c.greeting;
  assert.equal(g.code, 554);
  assert.equal(g.text, '5.7.1 You are not welcome here');
  assert.equal((await c.cmd('EHLO x.example.net')).code, 503);
  assert.equal((await c.cmd('QUIT')).code, 221);
  assert.equal(await c.waitClosed(), true);
  assert.equal(fb.connections, before, 'no backend connection for a refused client');
  assert.equal(await dm.metric('doorman_rejections_total', { rule: '10-access', stage: 'connect', code: '554', enhanced_code: '5.7.1' }), 1);
  const log = await eventually(() => dm.sessions().find((s) => s.client === '127.0.0.66'));
  assert.equal(log?.outcome, 'refused');
  assert.deepEqual((log?.rules as { rule: string }[]).map((r) => r.rule), ['10-access']);
});

test('sender and recipient denials carry the rule’s reply; the transaction goes on', async () => {
  const c = await SmtpClient.open(dm.port);
  const s = await c.cmd('MAIL FROM:<bulk@spammer.example>');
  assert.equal(s.code, 550);
  assert.equal(s.text, '5.7.1 Sender address rejected: spammer');
  assert.equal((await c.cmd('MAIL FROM:<ok@example.org>')).code, 250);
  const r = await c.cmd('RCPT TO:<nobody@example.com>');
  assert.equal(r.code, 550);
  assert.equal(r.text, '5.7.1 Recipient address rejected: Access denied', 'the stage default');
  assert.equal((await c.cmd('RCPT TO:<somebody@example.com>')).code, 250);
  c.close();
  assert.equal(await dm.metric('doorman_rejections_total', { rule: '10-access', stage: 'mail' }), 1);
  assert.equal(await dm.metric('doorman_rejections_total', { rule: '10-access', stage: 'rcpt' }), 1);
  assert.ok(!fb.commands.some((x) => x.includes('spammer.example')), 'refused commands never reach the backend');
  const log = await eventually(() => dm.sessions().find((x) => (x.transactions as { from: string }[]).some((t) => t.from === 'bulk@spammer.example')));
  assert.deepEqual(log?.transactions, [
    { from: 'bulk@spammer.example', mail: 550, rcpts: [] },
    { from: 'ok@example.org', mail: 250, rcpts: [{ to: 'nobody@example.com', code: 550 }, { to: 'somebody@example.com', code: 250 }] },
  ]);
  assert.deepEqual(
    (log?.rules as { rule: string; stage: string; reply: string }[]).map((r) => [r.rule, r.stage, r.reply]),
    [['10-access', 'mail', '550 5.7.1 Sender address rejected: spammer'], ['10-access', 'rcpt', '550 5.7.1 Recipient address rejected: Access denied']],
  );
});

test('an enforced HELO rule refuses; an allowlisted client is exempt', async () => {
  const c = await SmtpClient.open(dm.port, { ehlo: false });
  const r = await c.cmd('EHLO localhost');
  assert.equal(r.code, 504);
  assert.equal(r.text, '5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname');
  c.close();
  const ok = await SmtpClient.open(dm.port, { localAddress: '127.0.0.10', ehlo: false });
  assert.equal((await ok.cmd('EHLO localhost')).code, 250, 'access allow cancels bypassable refusals');
  ok.close();
});

test('dry-run logs what it would do and counts it, without refusing', async () => {
  const c = await SmtpClient.open(dm.port, { ehlo: false });
  const r = await c.cmd('EHLO 192.0.2.1');
  // 20-helo (enforce) refuses bare IPs too; use its reply to see which rule decided.
  assert.equal(r.code, 501);
  c.close();
  const s = await eventually(() => dm.sessions().find((x) => (x.rules as { rule: string; would?: string }[]).some((o) => o.rule === 'helo-dry' && o.would === 'reject')));
  assert.ok(s, 'the session log shows the dry-run finding');
  assert.ok((await dm.metric('doorman_rule_evaluations_total', { rule: 'helo-dry', outcome: 'dry_run' })) >= 1);
  assert.equal(await dm.metric('doorman_rejections_total', { rule: 'helo-dry' }), 0);
});

test('hot reload: a changed file applies to new sessions; an invalid one keeps the last good rules', async () => {
  const file = path.join(dm.rulesDir, '10-access.yaml');
  const old = await SmtpClient.open(dm.port);
  fs.writeFileSync(file, ACCESS.replace('@spammer.example', '@other.example'));
  await eventually(async () => (await dm.metric('doorman_config_reloads_total', { result: 'success' })) >= 1, 5000);
  // A session opened before the reload goes on, with the rules it started with.
  assert.equal((await old.cmd('MAIL FROM:<x@spammer.example>')).code, 550);
  assert.equal((await old.cmd('MAIL FROM:<x@other.example>')).code, 250);
  old.close();
  let c = await SmtpClient.open(dm.port);
  assert.equal((await c.cmd('MAIL FROM:<x@other.example>')).code, 550, 'new rule in force');
  assert.equal((await c.cmd('RSET')).code, 250);
  assert.equal((await c.cmd('MAIL FROM:<x@spammer.example>')).code, 250, 'old rule gone');
  c.close();

  fs.writeFileSync(file, 'rule: access\nsettings:\n  senders:\n    - deny: 999.1.1.1/8\n      bogus: 1\n');
  await eventually(async () => (await dm.metric('doorman_config_reloads_total', { result: 'failure' })) >= 1, 5000);
  // The metric can be scraped before the log line has come through doorman's stdout pipe.
  const err = await eventually(() => dm.logs().find((l) => l.msg.startsWith('rule reload failed')), 5000);
  assert.match(String(err?.err), /10-access\.yaml:\d+: settings\.senders\.0\.bogus: unknown key/);
  c = await SmtpClient.open(dm.port);
  assert.equal((await c.cmd('MAIL FROM:<x@other.example>')).code, 550, 'last good rules still in force');
  c.close();
});

test('SIGHUP reloads the rule files', async () => {
  const file = path.join(dm.rulesDir, '10-access.yaml');
  const before = await dm.metric('doorman_config_reloads_total', { result: 'success' });
  // Write without triggering the watcher's debounce first: rename into place, then signal.
  fs.writeFileSync(file + '.tmp', ACCESS.replace('@spammer.example', '@hup.example'));
  fs.renameSync(file + '.tmp', file);
  process.kill(dm.proc.pid, 'SIGHUP');
  await eventually(async () => (await dm.metric('doorman_config_reloads_total', { result: 'success' })) > before, 5000);
  const c = await SmtpClient.open(dm.port);
  assert.equal((await c.cmd('MAIL FROM:<x@hup.example>')).code, 550);
  c.close();
});

test('action tag adds a header to the message instead of refusing', async () => {
  const d = await startDoorman({ backendPort: fb.port, rules: { 'helo.yaml': 'rule: helo\nname: helo-tag\naction: tag\n' } });
  try {
    const c = await SmtpClient.open(d.port, { ehlo: 'localhost' });
    assert.equal((await c.message({ from: 'tag@example.org', to: 'b@example.com', body: 'Subject: tagged\r\n\r\nbody\r\n' })).code, 250);
    c.close();
    const msg = fb.messages[fb.messages.length - 1] ?? '';
    assert.match(msg, /^X-Doorman-Tag: helo-tag; need fully-qualified hostname\r\nSubject: tagged\r\n/);
  } finally {
    await d.stop();
  }
});
