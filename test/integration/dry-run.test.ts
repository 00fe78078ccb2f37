/**
 * A rule in dry-run never delays a session, and DNS rules start their lookups at connect and
 * apply their verdict at their `stage` (issue 14, "The shipped defaults must not slow or refuse
 * good mail"). The resolver is dnsmasq behind a relay that holds every answer 2.5 s: the shipped
 * fcrdns (dry-run, stage connect) used to hold every greeting that long.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startDnsmasq, startSlowDns, type Dnsmasq } from '../helpers/dns.js';
import { startFakeBackend, type FakeBackend } from '../helpers/fake-backend.js';
import { SmtpClient } from '../helpers/smtp.js';
import { eventually, useCleanup } from '../helpers/procs.js';

useCleanup();
const DELAY = 2500; // ms each DNS answer is held
let dns: Dnsmasq;
let slow: Awaited<ReturnType<typeof startSlowDns>>;
let fb: FakeBackend;
let dryRun: Doorman;
let enforceConnect: Doorman;
let enforceRcpt: Doorman;
let spfRcpt: Doorman;

const fcrdns = (action: string, stage: string) =>
  `rule: fcrdns\naction: ${action}\ntimeout: 10000\nsettings:\n  stage: ${stage}\n  timeout: 8000\n`;

before(async () => {
  // 127.0.0.83 has no PTR record: fcrdns finds `fail` after one (slow) lookup.
  dns = await startDnsmasq({ ptr: [['81.0.0.127.in-addr.arpa', 'good.test']], a: [['good.test', '127.0.0.81']], txt: [['strict.test', 'v=spf1 ip4:127.0.0.40 -all']] });
  slow = await startSlowDns(dns.server, DELAY);
  fb = await startFakeBackend('none');
  // One try, long enough for the slow answer: the finding is `fail`, not a DNS timeout.
  const config = `dns:\n  servers: ["${slow.server}"]\n  timeout: 8000\n  tries: 1\n`;
  const spf = 'rule: spf\ntimeout: 10000\nsettings:\n  stage: rcpt\n  checkHelo: false\n  results:\n    fail: reject\n';
  [dryRun, enforceConnect, enforceRcpt, spfRcpt] = await Promise.all([
    startDoorman({ backendPort: fb.port, config, rules: { 'fcrdns.yaml': fcrdns('dry-run', 'connect') } }),
    startDoorman({ backendPort: fb.port, config, rules: { 'fcrdns.yaml': fcrdns('enforce', 'connect') } }),
    startDoorman({ backendPort: fb.port, config, rules: { 'fcrdns.yaml': fcrdns('enforce', 'rcpt') } }),
    startDoorman({ backendPort: fb.port, config, rules: { 'spf.yaml': spf } }),
  ]);
});
after(async () => {
  await Promise.all([dryRun?.stop(), enforceConnect?.stop(), enforceRcpt?.stop(), spfRcpt?.stop()]);
  await fb?.close();
  await slow?.stop();
  await dns?.stop();
});

async function greet(port: number): Promise<{ c: SmtpClient; code: number; text: string; ms: number }> {
  const t0 = Date.now();
  const c = await SmtpClient.greet(port, { localAddress: '127.0.0.83', timeout: 15_000 });
  return { c, code: c.greeting.code, text: c.greeting.text, ms: Date.now() - t0 };
}

test('dry-run fcrdns at connect with a slow resolver: greeting at once, mail delivered, finding logged when it arrives', async () => {
  const before = fb.messages.length;
  // Session A sends a message and leaves before the DNS answer; session B stays until it is in.
  const [a, b] = await Promise.all([greet(dryRun.port), greet(dryRun.port)]);
  assert.equal(a.code, 220);
  assert.equal(b.code, 220);
  assert.ok(a.ms < 1000 && b.ms < 1000, `greetings took ${a.ms} and ${b.ms} ms with DNS answering after ${DELAY} ms`);
  await a.c.ehlo('client.example.net');
  const sent = await a.c.message({ from: 'alice@example.net', to: 'bob@example.org', body: 'Subject: hi\r\n\r\nhello' });
  assert.equal(sent.code, 250, sent.raw);
  assert.equal((await a.c.cmd('QUIT')).code, 221);
  assert.equal(fb.messages.length, before + 1);
  await b.c.ehlo('client.example.net');

  // A's session line is out before the lookup ended; the finding follows in its own line.
  const lines = await dryRun.waitSessions(1);
  const sa = lines[0]!;
  assert.equal(sa.client, '127.0.0.83');
  const late = await eventually(() => dryRun.logs().find((l) => l.msg === 'late rule finding' && l.session === sa.session), 10_000);
  assert.ok(late, `no late finding for ${String(sa.session)}: ${dryRun.proc.output().slice(-2000)}`);
  assert.match(JSON.stringify(late.rule), /"rule":"fcrdns".*"action":"dry-run".*"effect":"none".*"would":"reject".*no PTR record/);

  // B is still open when its lookup ends: its own session line carries the finding.
  assert.ok(await eventually(async () => (await dryRun.metric('doorman_rule_evaluations_total', { rule: 'fcrdns', outcome: 'dry_run' })) === 2, 10_000));
  assert.equal((await b.c.cmd('QUIT')).code, 221);
  const sb = (await dryRun.waitSessions(2)).find((l) => l.session !== sa.session)!;
  assert.match(JSON.stringify(sb.rules), /"rule":"fcrdns","stage":"connect","finding":"reject","action":"dry-run","effect":"none","would":"reject"/);
});

test('an enforcing fcrdns still refuses at its stage: at connect (greeting held for the lookup)', async () => {
  const r = await greet(enforceConnect.port);
  assert.equal(r.code, 554);
  assert.equal(r.text, '5.7.25 Reverse DNS validation failed for [127.0.0.83]');
  r.c.close();
});

test('an enforcing fcrdns at rcpt: the lookup starts at connect, the greeting is not held, RCPT is refused', async () => {
  const r = await greet(enforceRcpt.port);
  assert.equal(r.code, 220);
  assert.ok(r.ms < 1000, `greeting took ${r.ms} ms`);
  await r.c.ehlo('client.example.net');
  assert.equal((await r.c.cmd('MAIL FROM:<alice@example.net>')).code, 250);
  const rcpt = await r.c.cmd('RCPT TO:<bob@example.org>', 15_000);
  assert.equal(rcpt.code, 550);
  assert.equal(rcpt.text, '5.7.25 Reverse DNS validation failed for [127.0.0.83]');
  // One check for the session, started at connect.
  assert.equal(await enforceRcpt.metric('doorman_fcrdns_checks_total', { result: 'fail' }), 1);
  r.c.close();
});

test('an enforcing spf at rcpt: evaluated from MAIL, the MAIL reply is not held, RCPT is refused', async () => {
  const r = await greet(spfRcpt.port);
  assert.equal(r.code, 220);
  await r.c.ehlo('client.example.net');
  const t0 = Date.now();
  assert.equal((await r.c.cmd('MAIL FROM:<alice@strict.test>')).code, 250);
  const mailMs = Date.now() - t0;
  assert.ok(mailMs < 1000, `MAIL reply took ${mailMs} ms`);
  const rcpt = await r.c.cmd('RCPT TO:<bob@example.org>', 15_000);
  assert.equal(rcpt.code, 550);
  assert.equal(rcpt.text, '5.7.23 <alice@strict.test>: Sender address rejected: SPF fail');
  // Every recipient of the transaction gets the same verdict; the next transaction is its own.
  assert.equal((await r.c.cmd('RCPT TO:<carol@example.org>')).code, 550);
  assert.equal((await r.c.cmd('RSET')).code, 250);
  assert.equal((await r.c.cmd('MAIL FROM:<alice@nospf.test>')).code, 250);
  assert.equal((await r.c.cmd('RCPT TO:<bob@example.org>', 15_000)).code, 250);
  r.c.close();
});
