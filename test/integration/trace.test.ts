/**
 * The Received: trace field (backend.traceHeader, DOORMAN_TRACE_HEADER): doorman → a backend that
 * cannot be told the client (the fake backend without XCLIENT) gets one with the client's HELO,
 * address, protocol and doorman's session id; a backend told the client by XCLIENT gets none
 * (`auto`); `never` writes none.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startFakeBackend, type FakeBackend } from '../helpers/fake-backend.js';
import { SmtpClient } from '../helpers/smtp.js';
import { useCleanup } from '../helpers/procs.js';

useCleanup();
let plain: FakeBackend;
let xclient: FakeBackend;
let auto: Doorman;
let autoX: Doorman;
let never: Doorman;

before(async () => {
  [plain, xclient] = await Promise.all([startFakeBackend('none'), startFakeBackend('xclient')]);
  [auto, autoX, never] = await Promise.all([
    startDoorman({ backendPort: plain.port, env: { DOORMAN_TRACE_HEADER: 'auto' } }),
    startDoorman({ backendPort: xclient.port, env: { DOORMAN_TRACE_HEADER: 'auto' } }),
    startDoorman({ backendPort: plain.port, env: { DOORMAN_TRACE_HEADER: 'never' } }),
  ]);
});
after(async () => {
  await Promise.all([auto?.stop(), autoX?.stop(), never?.stop()]);
  await Promise.all([plain?.close(), xclient?.close()]);
});

async function deliver(dm: Doorman, fb: FakeBackend, subject: string, rcpts = ['bob@example.com']): Promise<string> {
  const c = await SmtpClient.open(dm.port, { localAddress: '127.0.0.61', ehlo: 'client.example.org' });
  const t = await c.transaction({ from: 'alice@example.org', to: rcpts, body: `Subject: ${subject}\r\n\r\nHi.\r\n` });
  c.close();
  assert.equal(t.last.code, 250, t.last.text);
  await new Promise((r) => setTimeout(r, 50));
  const got = fb.messages.find((m) => m.includes(`Subject: ${subject}`));
  assert.ok(got, 'delivered');
  return got;
}

test('auto, backend without XCLIENT: a Received field names the client, its HELO, the protocol and the session', async () => {
  const got = await deliver(auto, plain, 'trace-1');
  const m = /^Received: from client\.example\.org \(\[127\.0\.0\.61\]\)\r\n\tby mx\.doorman\.test \(doorman\) with ESMTP id (\w+)\r\n\tfor <bob@example\.com>;\r\n\t(\w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d \+0000)\r\nSubject: trace-1\r\n/.exec(got);
  assert.ok(m, JSON.stringify(got.slice(0, 300)));
  const [line] = await auto.waitSessions(1);
  assert.equal(m[1], line?.session, 'the id is the session log line’s');
  assert.ok(Math.abs(Date.parse(m[2] ?? '') - Date.now()) < 60_000, 'a current RFC 5322 date');
});

test('auto: with two recipients the field names none of them', async () => {
  const got = await deliver(auto, plain, 'trace-2', ['bob@example.com', 'carol@example.com']);
  assert.match(got, /^Received: from client\.example\.org \(\[127\.0\.0\.61\]\)\r\n\tby mx\.doorman\.test \(doorman\) with ESMTP id \w+;\r\n\t/);
});

test('auto, backend told the client by XCLIENT: no Received field; never: none either', async () => {
  const a = await deliver(autoX, xclient, 'trace-3');
  assert.match(a, /^Subject: trace-3\r\n/);
  const n = await deliver(never, plain, 'trace-4');
  assert.match(n, /^Subject: trace-4\r\n/);
});
