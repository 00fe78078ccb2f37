/**
 * Every named limit with its reply: command line length (500 5.5.2), concurrent sessions in
 * total and per client IP (421 4.7.0), idle timeout (421 4.4.2), recipients per message
 * (452 4.5.3), errors and unknown commands per session (421 4.7.0), message size (552 5.3.4,
 * nothing delivered) and message line length (500 5.5.2, nothing delivered).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startSink, type Sink } from '../helpers/sink.js';
import { SmtpClient } from '../helpers/smtp.js';
import { sleep, useCleanup } from '../helpers/procs.js';

useCleanup();
let sink: Sink;
let dm: Doorman;

const CONFIG = `limits:
  maxClients: 4
  maxClientsPerIp: 2
  commandTimeout: 1500
  dataTimeout: 1500
  maxRecipients: 3
  maxErrors: 5
  maxUnknownCommands: 3
  maxMessageSize: 10000
`;

before(async () => {
  sink = await startSink();
  dm = await startDoorman({ backendPort: sink.port, config: CONFIG });
});
after(async () => {
  await dm?.stop();
  await sink?.stop();
});

test('a command line over 512 octets: 500 5.5.2, and the session goes on', async () => {
  const c = await SmtpClient.open(dm.port);
  const r = await c.cmd('NOOP ' + 'x'.repeat(600));
  assert.equal(r.code, 500);
  assert.match(r.text, /^5\.5\.2 Error: line too long/);
  assert.equal((await c.cmd('NOOP')).code, 250);
  c.close();
});

test('per-IP concurrency: the third session from one address gets 421 4.7.0', async () => {
  const a = await SmtpClient.open(dm.port, { localAddress: '127.0.0.2', ehlo: false });
  const b = await SmtpClient.open(dm.port, { localAddress: '127.0.0.2', ehlo: false });
  const c = await SmtpClient.greet(dm.port, { localAddress: '127.0.0.2' });
  const r = c.greeting;
  assert.equal(r.code, 421);
  assert.match(r.text, /4\.7\.0 .*too many connections/);
  assert.equal(await c.waitClosed(), true);
  const other = await SmtpClient.open(dm.port, { localAddress: '127.0.0.3', ehlo: false });
  other.close();
  a.close();
  b.close();
  await sleep(200);
});

test('total concurrency: above maxClients new sessions get 421 4.7.0', async () => {
  const held = [];
  for (const localAddress of ['127.0.0.4', '127.0.0.5', '127.0.0.6', '127.0.0.7']) held.push(await SmtpClient.open(dm.port, { localAddress, ehlo: false }));
  const c = await SmtpClient.greet(dm.port, { localAddress: '127.0.0.8' });
  const r = c.greeting;
  assert.equal(r.code, 421);
  assert.match(r.text, /^4\.7\.0 /);
  for (const h of held) h.close();
  await sleep(200);
  const after = await SmtpClient.open(dm.port, { localAddress: '127.0.0.8', ehlo: false });
  after.close();
  assert.ok((await dm.metric('doorman_connections_refused_total', { reason: 'max_clients' })) >= 1);
  assert.ok((await dm.metric('doorman_connections_refused_total', { reason: 'max_clients_per_ip' })) >= 1);
});

test('idle timeout: 421 4.4.2 and the connection closes', async () => {
  await sleep(300);
  const c = await SmtpClient.open(dm.port, { ehlo: false });
  const t0 = Date.now();
  const r = await c.reply(5000);
  assert.equal(r.code, 421);
  assert.match(r.text, /^4\.4\.2 /);
  assert.ok(Date.now() - t0 >= 1300);
  assert.equal(await c.waitClosed(), true);
});

test('recipients per message: the fourth gets 452 4.5.3; the message goes to three', async () => {
  const c = await SmtpClient.open(dm.port);
  assert.equal((await c.cmd('MAIL FROM:<many@example.org>')).code, 250);
  for (let i = 1; i <= 3; i++) assert.equal((await c.cmd(`RCPT TO:<r${i}@example.com>`)).code, 250);
  const r = await c.cmd('RCPT TO:<r4@example.com>');
  assert.equal(r.code, 452);
  assert.match(r.text, /^4\.5\.3 /);
  assert.equal((await c.cmd('DATA')).code, 354);
  c.write('Subject: three\r\n\r\nhi\r\n.\r\n');
  assert.equal((await c.reply()).code, 250);
  c.close();
  const m = await sink.bySender('many@example.org');
  assert.equal(m.rcpts.length, 3);
});

test('unknown commands: the fourth is answered 421 4.7.0 and the session ends', async () => {
  const c = await SmtpClient.open(dm.port, { ehlo: false });
  for (let i = 0; i < 3; i++) assert.equal((await c.cmd(`BOGUS${i}`)).code, 500);
  const r = await c.cmd('BOGUS4');
  assert.equal(r.code, 421);
  assert.match(r.text, /4\.7\.0 .*too many errors/);
  assert.equal(await c.waitClosed(), true);
});

test('errors per session: past maxErrors the session gets 421 4.7.0', async () => {
  const c = await SmtpClient.open(dm.port);
  const codes: number[] = [];
  for (let i = 0; i < 6; i++) codes.push((await c.cmd('RCPT TO:<x@example.com>')).code);
  // The sixth error is followed by the closing 421 in the same write.
  codes.push((await c.reply()).code);
  assert.deepEqual(codes, [503, 503, 503, 503, 503, 503, 421]);
  assert.equal(await c.waitClosed(), true);
});

test('message size: SIZE= over the limit gets 552 5.3.4 at MAIL', async () => {
  const c = await SmtpClient.open(dm.port);
  assert.equal(c.keywords.get('SIZE'), '10000');
  const r = await c.cmd('MAIL FROM:<a@example.org> SIZE=10001');
  assert.equal(r.code, 552);
  assert.match(r.text, /^5\.3\.4 /);
  c.close();
});

test('message size: data over the limit gets 552 5.3.4 and nothing is delivered', async () => {
  const c = await SmtpClient.open(dm.port);
  const big = 'Subject: big\r\n\r\n' + 'z'.repeat(70).concat('\r\n').repeat(200);
  const r = await c.message({ from: 'toobig@example.org', to: 'b@example.com', body: big });
  assert.equal(r.code, 552);
  assert.match(r.text, /^5\.3\.4 /);
  // The session goes on with a fresh backend connection.
  assert.equal((await c.message({ from: 'small@example.org', to: 'b@example.com', body: 'Subject: small\r\n\r\nok\r\n' })).code, 250);
  c.close();
  await sink.bySender('small@example.org');
  assert.equal(sink.messages().some((m) => m.mail.startsWith('<toobig@')), false, 'the oversized message never reached the backend');
});

test('a message line over 1000 octets: 500 5.5.2 and nothing is delivered', async () => {
  const c = await SmtpClient.open(dm.port);
  const long = 'Subject: long\r\n\r\n' + 'w'.repeat(999) + '\r\n';
  const r = await c.message({ from: 'longline@example.org', to: 'b@example.com', body: long });
  assert.equal(r.code, 500);
  assert.match(r.text, /^5\.5\.2 /);
  c.close();
  await sleep(300);
  assert.equal(sink.messages().some((m) => m.mail.startsWith('<longline@')), false);
});

test('a client that stalls inside DATA gets 421 4.4.2 after the data timeout; nothing is delivered', async () => {
  const c = await SmtpClient.open(dm.port);
  await c.message({ from: 'stall@example.org', to: 'b@example.com' });
  c.write('Subject: stall\r\n\r\nhalf a message\r\n');
  const r = await c.reply(5000);
  assert.equal(r.code, 421);
  assert.match(r.text, /^4\.4\.2 /);
  assert.equal(await c.waitClosed(), true);
  await sleep(300);
  assert.equal(sink.messages().some((m) => m.mail.startsWith('<stall@')), false);
});
