/**
 * A client that half-closes (sends FIN right after its last command) still gets every reply:
 * pipelining the final "." and QUIT and then shutting down its side is legal TCP, and a client
 * that never reads the 250 retries a message the backend already queued (a duplicate).
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

before(async () => {
  sink = await startSink();
  dm = await startDoorman({ backendPort: sink.port });
});
after(async () => {
  await dm?.stop();
  await sink?.stop();
});

function delivered(from: string): number {
  return sink.messages().filter((m) => m.mail.startsWith(`<${from}>`)).length;
}

test('body, ".", QUIT pipelined, then a half-close: the client reads 250 and 221; the backend has the message once', async () => {
  const c = await SmtpClient.open(dm.port);
  await c.message({ from: 'halfclose-quit@example.org', to: 'user@example.com' });
  c.write('Subject: half-close\r\n\r\nbody\r\n.\r\nQUIT\r\n');
  c.socket.end();
  const r = await c.reply();
  assert.equal(r.code, 250, r.raw);
  const q = await c.reply();
  assert.equal(q.code, 221, q.raw);
  assert.equal(await c.waitClosed(), true);
  const m = await sink.bySender('halfclose-quit@example.org');
  assert.equal(m.body, 'Subject: half-close\n\nbody\n');
  await sleep(300);
  assert.equal(delivered('halfclose-quit@example.org'), 1);
  const [line] = (await dm.waitSessions(1)).filter((s) => s.outcome === 'quit');
  assert.ok(line);
});

test('a half-close right after "." without QUIT: the client reads 250, then the session ends', async () => {
  const c = await SmtpClient.open(dm.port);
  await c.message({ from: 'halfclose-dot@example.org', to: 'user@example.com' });
  c.write('Subject: no quit\r\n\r\nbody\r\n.\r\n');
  c.socket.end();
  const r = await c.reply();
  assert.equal(r.code, 250, r.raw);
  assert.equal(await c.waitClosed(), true);
  await sink.bySender('halfclose-dot@example.org');
  await sleep(300);
  assert.equal(delivered('halfclose-dot@example.org'), 1);
});

test('a half-close in the middle of DATA: nothing is delivered and the session ends', async () => {
  const c = await SmtpClient.open(dm.port);
  await c.message({ from: 'halfclose-mid@example.org', to: 'user@example.com' });
  c.write('Subject: cut\r\n\r\nthe message goes on\r\n');
  c.socket.end();
  assert.equal(await c.waitClosed(), true);
  await sleep(500);
  assert.equal(delivered('halfclose-mid@example.org'), 0);
  assert.equal(c.pending(), '', 'no reply to an incomplete message');
});
