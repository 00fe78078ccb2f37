/**
 * The backend behind doorman, against a real Postfix: what doorman holds there and in what state.
 * Clients that connect and say nothing cost the backend no connection (Postfix with
 * default_process_limit = 4 stays free for real clients); doorman never holds more than
 * backend.maxConnections, and the clients past it get 421 4.3.2 after backend.acquireTimeout,
 * never a 250 for mail that was not delivered, and the next ones are served again; a connection
 * whose state is not clean (a client left in the middle of AUTH) is never handed to the next client.
 * Backend connections are counted with ss(8): established TCP connections to Postfix's port.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startPostfix, type Postfix } from '../helpers/postfix.js';
import { startSink, type Sink } from '../helpers/sink.js';
import { SmtpClient } from '../helpers/smtp.js';
import { eventually, sleep, useCleanup } from '../helpers/procs.js';

useCleanup();
let sink: Sink;
/** A Postfix with only four smtpd processes, like the reproduction. */
let postfix: Postfix;
const running: Doorman[] = [];

before(async () => {
  sink = await startSink();
  postfix = await startPostfix({ relayPort: sink.port, main: ['default_process_limit = 4'] });
});
after(async () => {
  await Promise.all(running.map((d) => d.stop()));
  await postfix?.stop();
  await sink?.stop();
});

async function doorman(backendPort: number, config: string, extra: { env?: Record<string, string> } = {}): Promise<Doorman> {
  const d = await startDoorman({ backendPort, config, ...extra });
  running.push(d);
  return d;
}

/** Established TCP connections to `port` on loopback (doorman → backend). */
function connectionsTo(port: number): number {
  const out = execFileSync('ss', ['-Htn', 'state', 'established', `( dport = :${port} )`], { encoding: 'utf8' });
  return out.split('\n').filter((l) => l.trim()).length;
}

test('silent clients hold no backend connection: six idle sockets, then a real client is delivered by a Postfix with four smtpd processes', async () => {
  // A short greeting deadline: a Postfix out of processes queues the connection and never greets.
  const d = await doorman(postfix.port, 'backend:\n  greetingTimeout: 2000\n');
  const idle: SmtpClient[] = [];
  try {
    for (let i = 0; i < 6; i++) {
      idle.push(await SmtpClient.open(d.port, { localAddress: `127.0.0.${40 + i}`, ehlo: false }));
    }
    // A client that only talks to doorman (NOOP, HELP, RSET) does not need the backend either.
    assert.equal((await idle[0]!.cmd('NOOP')).code, 250);
    await sleep(300);
    assert.equal(connectionsTo(postfix.port), 0, 'no connection to Postfix for six silent clients');
    assert.equal(await d.metric('doorman_backend_connections'), 0);
    const c = await SmtpClient.open(d.port, { localAddress: '127.0.0.50', ehlo: 'real.example.net' });
    const r = await c.message({ from: 'after-idle@example.org', to: 'bob@example.com', body: 'Subject: after idle\r\n\r\nhi\r\n' });
    assert.equal(r.code, 250, r.raw);
    await sink.bySender('after-idle@example.org');
    assert.equal((await c.cmd('QUIT')).code, 221);
    // What doorman holds now: the session's connection (idle in the pool) and at most 2 spares.
    assert.ok(connectionsTo(postfix.port) <= 3, `${connectionsTo(postfix.port)} connections`);
    assert.equal(await d.metric('doorman_backend_connections'), connectionsTo(postfix.port));
  } finally {
    for (const c of idle) c.close();
    // Its pooled connections would take Postfix's processes from the next test.
    await d.stop();
  }
});

test('backend.maxConnections: clients past the cap wait, then get 421 4.3.2 (counted), never a 250; a freed connection serves the next', async () => {
  const d = await doorman(postfix.port, 'backend:\n  maxConnections: 3\n  acquireTimeout: 1000\n');
  const active: SmtpClient[] = [];
  try {
    for (let i = 0; i < 3; i++) {
      const c = await SmtpClient.open(d.port, { localAddress: `127.0.0.${60 + i}`, ehlo: `a${i}.example.net` });
      assert.equal((await c.cmd(`MAIL FROM:<cap-${i}@example.org>`)).code, 250);
      assert.equal((await c.cmd('RCPT TO:<bob@example.com>')).code, 250);
      active.push(c);
    }
    assert.equal(await d.metric('doorman_backend_connections'), 3);
    assert.ok(connectionsTo(postfix.port) <= 3, 'the spares count against the cap');
    // A fourth client: nothing frees up within acquireTimeout.
    const x = await SmtpClient.open(d.port, { localAddress: '127.0.0.70', ehlo: false });
    const busy = await x.cmd('EHLO x.example.net', 5000);
    assert.equal(busy.code, 421, busy.raw);
    assert.match(busy.text, /^4\.3\.2 /);
    assert.doesNotMatch(busy.text, /backend/i);
    assert.ok(await x.waitClosed(), 'the session ends after 421');
    assert.equal(await d.metric('doorman_backend_busy_total'), 1);
    assert.ok(await eventually(() => d.logs().some((l) => l.msg === 'every backend connection in use')));
    // A fifth client waits; the first active client finishes and leaves: its connection serves it.
    const y = await SmtpClient.open(d.port, { localAddress: '127.0.0.71', ehlo: false });
    y.send('EHLO y.example.net');
    await sleep(200);
    const first = active.shift()!;
    assert.equal((await first.cmd('DATA')).code, 354);
    first.write('Subject: cap 0\r\n\r\nhi\r\n.\r\n');
    assert.equal((await first.reply()).code, 250);
    assert.equal((await first.cmd('QUIT')).code, 221);
    assert.equal((await y.reply(5000)).code, 250, 'served by the freed connection');
    assert.equal((await y.message({ from: 'cap-y@example.org', to: 'bob@example.com', body: 'Subject: cap y\r\n\r\nhi\r\n' })).code, 250);
    for (const [i, c] of active.entries()) {
      assert.equal((await c.cmd('DATA')).code, 354);
      c.write(`Subject: cap ${i + 1}\r\n\r\nhi\r\n.\r\n`);
      assert.equal((await c.reply()).code, 250);
    }
    for (const from of ['cap-0', 'cap-1', 'cap-2', 'cap-y']) await sink.bySender(`${from}@example.org`);
    assert.ok(connectionsTo(postfix.port) <= 3);
    assert.equal(await d.metric('doorman_backend_busy_total'), 1);
    y.close();
  } finally {
    for (const c of active) c.close();
    await d.stop();
  }
});

test('a client that leaves in the middle of AUTH: its backend connection is not reused (Postfix with SASL, xclient: false)', async () => {
  const saslSink = await startSink();
  const pf = await startPostfix({ relayPort: saslSink.port, sasl: { alice: 'wonderland' }, xclient: false });
  try {
    const d = await doorman(pf.port, 'backend:\n  xclient: false\n  spares: 0\nlisten:\n  - address: 127.0.0.1:0\n    role: submission\n    authPlaintext: true\n', {
      env: { DOORMAN_LISTEN: '' },
    });
    const port = (d.logs().find((l) => l.msg === 'doorman started')?.listeners as { port: number }[])[0]?.port ?? 0;
    const c = await SmtpClient.open(port, { ehlo: 'leaver.example.net' });
    assert.match(c.keywords.get('AUTH') ?? '', /LOGIN/);
    assert.equal((await c.cmd('AUTH LOGIN')).code, 334);
    c.close();
    await eventually(() => d.sessions().length >= 1);
    await sleep(100);
    const next = await SmtpClient.open(port, { ehlo: 'innocent.example.net' });
    const r = await next.message({ from: 'innocent@example.org', to: 'bob@example.com', body: 'Subject: innocent\r\n\r\nhi\r\n' });
    assert.equal(r.code, 250, r.raw);
    await saslSink.bySender('innocent@example.org');
    // A clean connection is still reused: a session that ended normally leaves it for the next.
    assert.equal((await next.cmd('QUIT')).code, 221);
    await sleep(100);
    const third = await SmtpClient.open(port, { ehlo: 'third.example.net' });
    assert.equal((await third.message({ from: 'third@example.org', to: 'bob@example.com', body: 'Subject: third\r\n\r\nhi\r\n' })).code, 250);
    assert.equal(await d.metric('doorman_backend_reused_total'), 1, 'only the clean connection was reused');
    third.close();
  } finally {
    await pf.stop();
    await saslSink.stop();
  }
});
