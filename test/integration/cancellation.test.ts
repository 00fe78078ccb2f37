/**
 * A client that leaves while a rule waits cancels the wait (issue 15): doorman with a dnsbl rule
 * at connect (enforce, timeout 10 s) against a DNS server that never answers (dns.timeout 10 s,
 * one try). The client connects and hangs up before the greeting: its session's log line comes at
 * once with its end reason, and doorman_connections_active is back to 0 — not after the rule's
 * timeout, as when the session waited for the lookup it no longer needed.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startBlackHole } from '../helpers/dns.js';
import { startFakeBackend, type FakeBackend } from '../helpers/fake-backend.js';
import { SmtpClient } from '../helpers/smtp.js';
import { eventually, useCleanup } from '../helpers/procs.js';

useCleanup();
let fb: FakeBackend;
let hole: Awaited<ReturnType<typeof startBlackHole>>;
let dm: Doorman;

const RULE = `rule: dnsbl
action: enforce
timeout: 10000
settings:
  stage: connect
  zones:
    - zone: bl.test
      timeout: 10000
      selfTest: false
`;

before(async () => {
  fb = await startFakeBackend('none');
  hole = await startBlackHole();
  dm = await startDoorman({
    backendPort: fb.port,
    env: { DOORMAN_DNS_SERVERS: hole.server },
    config: 'dns:\n  timeout: 10000\n  tries: 1\n',
    rules: { 'dnsbl.yaml': RULE },
  });
});

after(async () => {
  await dm?.stop();
  await hole?.stop();
  await fb?.close();
});

test('a client that hangs up while a DNS rule waits ends its session at once', async () => {
  const queries = hole.queries();
  const c = await SmtpClient.connect(dm.port);
  // The lookup is under way: the session waits for the dnsbl verdict before its greeting.
  assert.equal(await eventually(() => hole.queries() > queries || undefined, 3000), true, 'the lookup went out');
  assert.equal(await dm.metric('doorman_connections_active'), 1);
  const t0 = Date.now();
  c.close();
  const [line] = await dm.waitSessions(1, 3000);
  const ms = Date.now() - t0;
  assert.ok(ms < 500, `session logged ${ms} ms after the client left (the rule's timeout is 10 s)`);
  assert.equal(line?.outcome, 'client-closed');
  const zero = await eventually(async () => ((await dm.metric('doorman_connections_active')) === 0 ? true : undefined), 500);
  assert.equal(zero, true, 'the connection is no longer counted');
});
