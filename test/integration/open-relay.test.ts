/**
 * Open relay and forged senders, end to end: swaks and raw clients on different 127.0.0.x
 * addresses → doorman (relay, sender and helo rules enforced) → a Postfix that would relay
 * anything (so every refusal is doorman's) → smtp-sink. Every relay-tester form of
 * ../shared/SMTP-REFERENCE.md §3.2 (nmap smtp-open-relay) and more is refused from outside and
 * allowed from a relay network and after AUTH; local-domain mail from outside still flows.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { makeCert } from '../helpers/certs.js';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startPostfix, type Postfix } from '../helpers/postfix.js';
import { startSink, type Sink } from '../helpers/sink.js';
import { SmtpClient } from '../helpers/smtp.js';
import { swaks } from '../helpers/swaks.js';
import { eventually, sleep, useCleanup } from '../helpers/procs.js';

useCleanup();
let sink: Sink;
let postfix: Postfix;
let dm: Doorman;
let cert: ReturnType<typeof makeCert>;

const OUTSIDE = '127.0.0.20';
const RELAYNET = '127.0.0.30';
const SRV = 'mx.doorman.test';
const IP = '127.0.0.1';
const DOMAIN = 'tester.example';

const RELAY = `rule: relay
settings:
  localDomains: [example.com, "*.example.com", "[127.0.0.53]"]
  relayNetworks: [${RELAYNET}/32]
  nullSenderMaxRecipients: 1
`;
const SENDER = `rule: sender
settings:
  localDomains: [example.com, "*.example.com"]
  relayNetworks: [${RELAYNET}/32]
  senderLogins:
    "alice@example.com": alice@backend.test
    "@example.net": [bob@backend.test]
`;
const HELO = `rule: helo
settings:
  requireFqdn: false
`;

before(async () => {
  cert = makeCert();
  sink = await startSink();
  postfix = await startPostfix({ relayPort: sink.port, openRelay: true, sasl: { alice: 'wonderland' } });
  dm = await startDoorman({
    backendPort: postfix.port,
    listen: 'smtp://127.0.0.1:{PORT},submission://127.0.0.1:{PORT}',
    env: { DOORMAN_TLS_CERT: cert.cert, DOORMAN_TLS_KEY: cert.key },
    rules: { 'relay.yaml': RELAY, 'sender.yaml': SENDER, 'helo.yaml': HELO },
  });
});
after(async () => {
  await dm?.stop();
  await postfix?.stop();
  await sink?.stop();
  if (cert) fs.rmSync(cert.dir, { recursive: true, force: true });
});

/** nmap smtp-open-relay's 16 forms (SMTP-REFERENCE.md §3.2) plus more. [from, to]. */
const FORMS: [string, string][] = [
  ['', `relaytest@${DOMAIN}`],
  [`antispam@${DOMAIN}`, `relaytest@${DOMAIN}`],
  [`antispam@${SRV}`, `relaytest@${DOMAIN}`],
  [`antispam@[${IP}]`, `relaytest@${DOMAIN}`],
  [`antispam@${DOMAIN}`, `relaytest%${DOMAIN}@[${IP}]`],
  [`antispam@${DOMAIN}`, `relaytest%${DOMAIN}@${SRV}`],
  [`antispam@${DOMAIN}`, `"relaytest@${DOMAIN}"`],
  [`antispam@${DOMAIN}`, `"relaytest%${DOMAIN}"`],
  [`antispam@${DOMAIN}`, `relaytest@${DOMAIN}@[${IP}]`],
  [`antispam@${DOMAIN}`, `"relaytest@${DOMAIN}"@[${IP}]`],
  [`antispam@${DOMAIN}`, `relaytest@${DOMAIN}@${SRV}`],
  [`antispam@${DOMAIN}`, `@[${IP}]:relaytest@${DOMAIN}`],
  [`antispam@${DOMAIN}`, `@${SRV}:relaytest@${DOMAIN}`],
  [`antispam@${DOMAIN}`, `${DOMAIN}!relaytest`],
  [`antispam@${DOMAIN}`, `${DOMAIN}!relaytest@[${IP}]`],
  [`antispam@${DOMAIN}`, `${DOMAIN}!relaytest@${SRV}`],
  // More: the same tricks aimed at a local domain, literals, case, trailing dots, look-alikes.
  [`antispam@${DOMAIN}`, `relaytest%${DOMAIN}@example.com`],
  [`antispam@${DOMAIN}`, `${DOMAIN}!relaytest@example.com`],
  [`antispam@${DOMAIN}`, `"relaytest@${DOMAIN}"@example.com`],
  [`antispam@${DOMAIN}`, `relaytest@${DOMAIN}@example.com`],
  [`antispam@${DOMAIN}`, `@example.com:relaytest@${DOMAIN}`],
  [`antispam@${DOMAIN}`, `@${DOMAIN}:user@example.com`],
  [`antispam@${DOMAIN}`, `relaytest@[IPv6:::1]`],
  [`antispam@${DOMAIN}`, `relaytest@[127.0.0.99]`],
  [`antispam@${DOMAIN}`, `RelayTest@TESTER.EXAMPLE.`],
  [`antispam@${DOMAIN}`, `relaytest@evilexample.com`],
  [`antispam@${DOMAIN}`, `relaytest@example.com.${DOMAIN}`],
  [`antispam@${DOMAIN}`, `relaytest@sub.${DOMAIN}`],
  [`antispam@${DOMAIN}`, `relaytest`],
];

test('every relay-tester form is refused from outside with 554 5.7.1, and nothing is relayed', async () => {
  let refused = 0;
  let c = await SmtpClient.open(dm.port, { localAddress: OUTSIDE });
  for (const [i, [from, to]] of FORMS.entries()) {
    if (i > 0 && i % 10 === 0) {
      // Each refusal is an error reply: stay under limits.maxErrors (20) per session.
      c.close();
      c = await SmtpClient.open(dm.port, { localAddress: OUTSIDE });
    }
    const m = await c.cmd(`MAIL FROM:<${from}>`);
    assert.equal(m.code, 250, `MAIL FROM:<${from}>: ${m.raw}`);
    const r = await c.cmd(`RCPT TO:<${to}>`);
    assert.equal(r.code, 554, `RCPT TO:<${to}>: ${r.raw}`);
    assert.equal(r.text, `5.7.1 <${to}>: Relay access denied`);
    refused++;
    assert.equal((await c.cmd('RSET')).code, 250);
  }
  c.close();
  assert.equal(refused, FORMS.length);
  assert.equal(await dm.metric('doorman_rejections_total', { rule: 'relay', stage: 'rcpt', code: '554', enhanced_code: '5.7.1' }), FORMS.length);
  await eventually(() => dm.sessions().filter((s) => s.client === OUTSIDE).length >= 3);
  const logs = dm.sessions().filter((s) => s.client === OUTSIDE);
  const reasons = new Set(logs.flatMap((l) => (l.rules as { rule: string; reason: string }[]).map((r) => `${r.rule}:${r.reason}`)));
  for (const r of ['source_route', 'percent_hack', 'bang_path', 'double_at', 'address_literal', 'foreign_domain', 'no_domain']) {
    assert.ok(reasons.has(`relay:${r}`), `log names relay:${r}`);
  }
  await sleep(300);
  assert.ok(!postfix.log().includes('relaytest'), 'the backend never saw a relay attempt');
});

test('local-domain mail from outside flows (swaks from another address)', async () => {
  for (const to of ['user@example.com', 'user@sub.example.com', 'User@Example.COM.', 'postmaster', 'user@[127.0.0.53]']) {
    const r = await swaks(['--server', `127.0.0.1:${dm.port}`, '--local-interface', OUTSIDE, '--from', `friend@${DOMAIN}`, '--to', to, '--helo', 'friend.tester.example', '--quit-after', 'RCPT']);
    assert.equal(r.status, 0, `${to}: ${r.out}`);
  }
  const r = await swaks(['--server', `127.0.0.1:${dm.port}`, '--local-interface', OUTSIDE, '--from', `inbound@${DOMAIN}`, '--to', 'user@example.com', '--helo', 'friend.tester.example']);
  assert.equal(r.status, 0, r.out);
  const m = await sink.bySender(`inbound@${DOMAIN}`);
  assert.match(m.body, /Received: from friend\.tester\.example \(unknown \[127\.0\.0\.20\]\)/);
});

test('a client in relayNetworks may relay (swaks); the same tricks are the backend’s business', async () => {
  const r = await swaks(['--server', `127.0.0.1:${dm.port}`, '--local-interface', RELAYNET, '--from', 'app@example.com', '--to', `someone@${DOMAIN}`, '--helo', 'app.example.com']);
  assert.equal(r.status, 0, r.out);
  const m = await sink.bySender('app@example.com');
  assert.deepEqual(m.rcpts.map((x) => x.split(' ')[0]), [`<someone@${DOMAIN}>`]);
  const c = await SmtpClient.open(dm.port, { localAddress: RELAYNET });
  assert.equal((await c.cmd(`MAIL FROM:<antispam@${DOMAIN}>`)).code, 250);
  assert.equal((await c.cmd(`RCPT TO:<relaytest%${DOMAIN}@example.com>`)).code, 250);
  c.close();
});

test('AUTH grants relay rights; submission without AUTH gets 530 5.7.0 at MAIL', async () => {
  const noauth = await swaks(['--server', `127.0.0.1:${dm.ports[1]}`, '--local-interface', OUTSIDE, '--tls', '--from', 'x@tester.example', '--to', 'user@example.com', '--quit-after', 'MAIL']);
  assert.notEqual(noauth.status, 0);
  assert.match(noauth.out, /<~\*\s+530 5\.7\.0 Authentication required/);
  const r = await swaks([
    '--server', `127.0.0.1:${dm.ports[1]}`, '--local-interface', OUTSIDE, '--tls', '--auth', 'PLAIN', '--auth-user', 'alice@backend.test', '--auth-password', 'wonderland',
    '--from', 'alice@example.com', '--to', `friend@${DOMAIN}`, '--helo', 'laptop.tester.example',
  ]);
  assert.equal(r.status, 0, r.out);
  await sink.bySender('alice@example.com');
});

test('forged senders: a local domain from outside gets 553 5.7.1; the login map is enforced', async () => {
  const c = await SmtpClient.open(dm.port, { localAddress: OUTSIDE });
  const r = await c.cmd('MAIL FROM:<ceo@example.com>');
  assert.equal(r.code, 553);
  assert.equal(r.text, '5.7.1 <ceo@example.com>: Sender address rejected: not owned by you');
  assert.equal((await c.cmd('MAIL FROM:<ceo@sub.example.com>')).code, 553);
  assert.equal((await c.cmd('MAIL FROM:<>')).code, 250, 'bounces are never forged');
  c.close();
  const inside = await SmtpClient.open(dm.port, { localAddress: RELAYNET });
  assert.equal((await inside.cmd('MAIL FROM:<ceo@example.com>')).code, 250);
  inside.close();
  const mismatch = await swaks([
    '--server', `127.0.0.1:${dm.ports[1]}`, '--local-interface', OUTSIDE, '--tls', '--auth', 'PLAIN', '--auth-user', 'alice@backend.test', '--auth-password', 'wonderland',
    '--from', 'bob@example.net', '--to', 'user@example.com', '--quit-after', 'MAIL',
  ]);
  assert.match(mismatch.out, /<~\*\s+553 5\.7\.1 <bob@example\.net>: Sender address rejected: not owned by user alice@backend\.test/);
  assert.ok((await dm.metric('doorman_rejections_total', { rule: 'sender', stage: 'mail', code: '553' })) >= 3);
});

test('null sender carries at most one recipient when configured', async () => {
  const c = await SmtpClient.open(dm.port, { localAddress: OUTSIDE });
  assert.equal((await c.cmd('MAIL FROM:<>')).code, 250);
  assert.equal((await c.cmd('RCPT TO:<a@example.com>')).code, 250);
  const r = await c.cmd('RCPT TO:<b@example.com>');
  assert.equal(r.code, 550);
  assert.match(r.text, /^5\.5\.3 /);
  c.close();
});

test('HELO claiming doorman’s name or address, or a literal that is not the client’s, is refused', async () => {
  const cases: [string, number, RegExp][] = [
    [SRV, 550, /You are not me/],
    [`[${IP}]`, 550, /You are not me/],
    ['[127.0.0.99]', 550, /Address literal mismatch/],
    [`[${OUTSIDE}]`, 250, /./],
    ['192.0.2.1', 501, /Invalid name/],
  ];
  for (const [name, code, text] of cases) {
    const c = await SmtpClient.open(dm.port, { localAddress: OUTSIDE, ehlo: false });
    const r = await c.cmd(`EHLO ${name}`);
    assert.equal(r.code, code, `${name}: ${r.raw}`);
    assert.match(r.text, text);
    c.close();
  }
});

test('a UTF-8 address echoed in a refusal reaches the client as UTF-8, also in a pipelined batch', async () => {
  const c = await SmtpClient.open(dm.port, { localAddress: OUTSIDE });
  c.write(Buffer.from(`MAIL FROM:<a@${DOMAIN}> SMTPUTF8\r\nRCPT TO:<jörg@${DOMAIN}>\r\n`, 'utf8'));
  assert.equal((await c.reply()).code, 250);
  const r = await c.reply();
  assert.equal(r.code, 554);
  // The test client reads bytes as latin1: UTF-8 "ö" is the two bytes C3 B6.
  assert.equal(r.text, `5.7.1 <${Buffer.from('jörg', 'utf8').toString('latin1')}@${DOMAIN}>: Relay access denied`);
  c.close();
});
