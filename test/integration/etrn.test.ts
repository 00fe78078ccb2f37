/**
 * ETRN (RFC 1985), which a backup MX's customers use to ask for their queue: relayed to a backend
 * that offers it (a real Postfix: fast_flush_domains defaults to $relay_domains, example.com here),
 * subject to the etrn-stage rules — the relay rule lets clients with relay rights (and nodes in
 * etrnDomains) through and refuses everyone else as Postfix's smtpd_etrn_restrictions would; 502
 * when the backend does not offer it.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startFakeBackend } from '../helpers/fake-backend.js';
import { startPostfix, type Postfix } from '../helpers/postfix.js';
import { startSink, type Sink } from '../helpers/sink.js';
import { SmtpClient } from '../helpers/smtp.js';
import { useCleanup } from '../helpers/procs.js';

useCleanup();
let sink: Sink;
let postfix: Postfix;
let dm: Doorman;

const RELAYNET = '127.0.0.31';
const OUTSIDE = '127.0.0.32';
const relay = (extra = '') => `rule: relay\nsettings:\n  localDomains: [example.com]\n  relayNetworks: [${RELAYNET}/32]\n${extra}`;

before(async () => {
  sink = await startSink();
  postfix = await startPostfix({ relayPort: sink.port });
  dm = await startDoorman({ backendPort: postfix.port, rules: { '10-relay.yaml': relay() } });
});
after(async () => {
  await dm?.stop();
  await postfix?.stop();
  await sink?.stop();
});

test('ETRN from a relay network: offered in EHLO, relayed to Postfix, its replies passed on', async () => {
  const c = await SmtpClient.open(dm.port, { localAddress: RELAYNET, ehlo: 'customer.example.net' });
  assert.ok(c.keywords.has('ETRN'), 'ETRN offered: the backend offers it');
  const r = await c.cmd('ETRN example.com');
  assert.equal(r.code, 250, r.raw);
  assert.match(r.text, /Queuing started/);
  const at = await c.cmd('ETRN @example.com');
  assert.equal(at.code, 250, at.raw);
  // A node Postfix does not flush: its own refusal (RFC 1985 459).
  const other = await c.cmd('ETRN other.example');
  assert.equal(other.code, 459, other.raw);
  assert.equal((await c.cmd('ETRN')).code, 501);
  // Inside a transaction, as Postfix: 503.
  assert.equal((await c.cmd('MAIL FROM:<a@example.org>')).code, 250);
  assert.equal((await c.cmd('ETRN example.com')).code, 503);
  assert.equal((await c.cmd('QUIT')).code, 221);
});

test('ETRN from outside the relay networks: 554 5.7.1 from the relay rule, counted; the session goes on', async () => {
  const c = await SmtpClient.open(dm.port, { localAddress: OUTSIDE, ehlo: 'customer.example.net' });
  const r = await c.cmd('ETRN example.com');
  assert.equal(r.code, 554, r.raw);
  assert.equal(r.text, '5.7.1 <example.com>: Etrn command rejected: Access denied');
  assert.equal(await dm.metric('doorman_rejections_total', { rule: '10-relay', stage: 'etrn' }), 1);
  assert.equal((await c.cmd('NOOP')).code, 250);
  c.close();
  const log = (await dm.waitSessions(2)).find((s) => s.client === OUTSIDE);
  assert.ok(JSON.stringify(log?.rules).includes('etrn_denied'), JSON.stringify(log));
});

test('ETRN for a node in etrnDomains is relayed from anyone; a backend without ETRN gets 502', async () => {
  const d = await startDoorman({ backendPort: postfix.port, rules: { '10-relay.yaml': relay('  etrnDomains: [example.com]\n') } });
  const fb = await startFakeBackend('none');
  const plain = await startDoorman({ backendPort: fb.port, rules: { '10-relay.yaml': relay() } });
  try {
    const c = await SmtpClient.open(d.port, { localAddress: OUTSIDE, ehlo: 'customer.example.net' });
    assert.equal((await c.cmd('ETRN example.com')).code, 250);
    assert.equal((await c.cmd('ETRN Example.COM')).code, 250);
    assert.equal((await c.cmd('ETRN other.example')).code, 554);
    c.close();
    const p = await SmtpClient.open(plain.port, { localAddress: RELAYNET, ehlo: 'customer.example.net' });
    assert.equal(p.keywords.has('ETRN'), false);
    const r = await p.cmd('ETRN example.com');
    assert.equal(r.code, 502, r.raw);
    assert.match(r.text, /^5\.5\.1 /);
    assert.ok(!fb.commands.some((l) => l.startsWith('ETRN')), 'nothing relayed');
    p.close();
  } finally {
    await d.stop();
    await plain.stop();
    await fb.close();
  }
});
