/**
 * The backend down, slow, refusing, lying or dying: the client always gets a 4xx (or the
 * backend's own refusal), never a 250 for a message the backend did not accept, and is never
 * left hanging. Real smtp-sink where it can show the case (down, killed mid-DATA); a
 * deliberately misbehaving socket where a real MTA cannot (stalls, garbage).
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startFakeBackend, type Fault } from '../helpers/fake-backend.js';
import { freePort } from '../helpers/net.js';
import { startSink } from '../helpers/sink.js';
import { SmtpClient } from '../helpers/smtp.js';
import { eventually, sleep, useCleanup } from '../helpers/procs.js';

useCleanup();
const running: Doorman[] = [];
after(async () => {
  await Promise.all(running.map((d) => d.stop()));
});

/**
 * Short backend deadlines so the stall cases finish quickly; no spares, so that the fake backend's
 * connections and command log are the session's own.
 */
const FAST = 'backend:\n  connectTimeout: 1000\n  greetingTimeout: 1000\n  commandTimeout: 1000\n  dataTimeout: 1500\n  spares: 0\n';

async function doorman(backendPort: number): Promise<Doorman> {
  const d = await startDoorman({ backendPort, config: FAST });
  running.push(d);
  return d;
}

test('backend down: 421 4.4.1 at the first command, and the connection closes', async () => {
  const d = await doorman(await freePort());
  // Doorman greets without waiting for the backend; EHLO is the first command that needs it.
  const c = await SmtpClient.open(d.port, { ehlo: false, timeout: 5000 });
  const r = await c.cmd('EHLO client.example.net', 5000);
  assert.equal(r.code, 421);
  assert.match(r.text, /^4\.4\.1 /);
  assert.doesNotMatch(r.text, /backend|127\.0\.0\.1/i, 'the client is not told about the backend');
  assert.equal(await c.waitClosed(), true);
  assert.ok((await d.metric('doorman_backend_failures_total', { kind: 'connect' })) >= 1);
});

const greetingCases: [Fault, number, string][] = [
  ['no-greeting', 421, '4.4.1'],
  ['garbage-greeting', 421, '4.4.1'],
  ['busy-greeting', 421, '4.4.1'],
  // A backend's refusal of doorman itself is doorman's problem, not the client's: 4xx.
  ['refuse-greeting', 421, '4.4.1'],
];
for (const [fault, code, enhanced] of greetingCases) {
  test(`backend ${fault}: the client gets ${code} ${enhanced}`, async () => {
    const fb = await startFakeBackend(fault);
    const d = await doorman(fb.port);
    const c = await SmtpClient.open(d.port, { ehlo: false, timeout: 5000 });
    const r = await c.cmd('EHLO client.example.net', 5000);
    assert.equal(r.code, code);
    assert.ok(r.text.startsWith(enhanced), r.raw);
    assert.equal(await c.waitClosed(), true);
    await fb.close();
  });
}

test('a backend refusing doorman at its greeting (554) and another busy (421), in either order: 421 4.4.1, never a permanent error', async () => {
  const refusing = await startFakeBackend('refuse-greeting');
  const busy = await startFakeBackend('busy-greeting');
  try {
    for (const order of [
      [refusing, busy],
      [busy, refusing],
    ]) {
      const d = await startDoorman({ backendPort: 1, config: FAST, env: { DOORMAN_BACKEND: `10 127.0.0.1:${order[0]!.port}, 20 127.0.0.1:${order[1]!.port}` } });
      running.push(d);
      const c = await SmtpClient.open(d.port, { ehlo: false, timeout: 5000 });
      const r = await c.cmd('EHLO client.example.net', 5000);
      assert.equal(r.code, 421, r.raw);
      assert.match(r.text, /^4\.4\.1 /);
      assert.equal(await c.waitClosed(), true);
      assert.equal(await d.metric('doorman_backend_failures_total', { backend: `127.0.0.1:${refusing.port}`, kind: 'refused' }), 1, 'the 554 greeting is counted as a refusal');
    }
  } finally {
    await refusing.close();
    await busy.close();
  }
});

test('backend dies mid-DATA (smtp-sink killed): 451, never 250', async () => {
  const sink = await startSink();
  const d = await doorman(sink.port);
  const c = await SmtpClient.open(d.port);
  await c.message({ from: 'a@example.org', to: 'b@example.com' });
  c.write('Subject: dies\r\n\r\n' + 'line of text\r\n'.repeat(2000));
  await new Promise((r) => setTimeout(r, 200));
  await sink.proc.stop('SIGKILL');
  c.write('more text after the backend is gone\r\n'.repeat(2000));
  c.write('.\r\n');
  const r = await c.reply();
  assert.ok(r.code === 451 || r.code === 421, r.raw);
  assert.match(r.text, /^4\.4\.2 /);
  await sink.stop();
});

test('backend drops the connection mid-DATA: 451 4.4.2 after the client’s end of data', async () => {
  const fb = await startFakeBackend('close-mid-data');
  const d = await doorman(fb.port);
  const c = await SmtpClient.open(d.port);
  await c.message({ from: 'a@example.org', to: 'b@example.com' });
  c.write('Subject: x\r\n\r\n' + 'y'.repeat(70).concat('\r\n').repeat(500) + '.\r\n');
  const r = await c.reply();
  assert.equal(r.code, 451, r.raw);
  assert.equal(fb.messages.length, 0);
  await fb.close();
});

test('backend never answers the end of data: 451 4.4.2 after the data deadline', async () => {
  const fb = await startFakeBackend('stall-after-data');
  const d = await doorman(fb.port);
  const c = await SmtpClient.open(d.port);
  await c.message({ from: 'a@example.org', to: 'b@example.com' });
  const t0 = Date.now();
  c.write('Subject: x\r\n\r\nbody\r\n.\r\n');
  const r = await c.reply(10_000);
  assert.equal(r.code, 451, r.raw);
  assert.match(r.text, /^4\.4\.2 /);
  assert.ok(Date.now() - t0 >= 1400, 'waited for the data deadline');
  assert.ok((await d.metric('doorman_backend_failures_total', { kind: 'timeout' })) >= 1);
  await fb.close();
});

test('backend stalls on a command: 421 4.4.2 and the session ends', async () => {
  const fb = await startFakeBackend('stall-mail');
  const d = await doorman(fb.port);
  const c = await SmtpClient.open(d.port);
  // MAIL is answered here and goes to the backend with the first RCPT (backend.deferMail).
  assert.equal((await c.cmd('MAIL FROM:<a@example.org>')).code, 250);
  const r = await c.cmd('RCPT TO:<b@example.com>', 5000);
  assert.equal(r.code, 421);
  assert.match(r.text, /^4\.4\.2 /);
  assert.equal(await c.waitClosed(), true);
  await fb.close();
});

test('backend closes after each message: doorman reconnects for the next transaction', async () => {
  const fb = await startFakeBackend('close-after-message');
  const d = await doorman(fb.port);
  const c = await SmtpClient.open(d.port);
  for (let i = 0; i < 3; i++) {
    assert.equal((await c.message({ from: `m${i}@example.org`, to: 'b@example.com', body: `Subject: ${i}\r\n\r\nbody\r\n` })).code, 250);
    await new Promise((r) => setTimeout(r, 50));
  }
  assert.equal(fb.messages.length, 3);
  assert.equal(fb.connections, 3);
  c.close();
  await fb.close();
});

test('the backend refuses DATA after doorman answered 354: the client gets the refusal after its data, nothing leaks', async () => {
  const fb = await startFakeBackend('refuse-data');
  const d = await doorman(fb.port);
  const c = await SmtpClient.open(d.port);
  await c.message({ from: 'a@example.org', to: 'b@example.com' });
  c.write('Subject: x\r\n\r\nMAIL FROM:<smuggle@example.org>\r\nbody\r\n.\r\n');
  const r = await c.reply();
  assert.equal(r.code, 554);
  assert.equal(r.text, '5.5.1 Error: no valid recipients', 'the backend’s own reply');
  assert.ok(!fb.commands.some((x) => x.includes('smuggle')), 'the message text never reached the backend as commands');
  assert.equal(fb.messages.length, 0);
  // The transaction was reset at the backend: the session goes on.
  assert.equal((await c.cmd('MAIL FROM:<next@example.org>')).code, 250);
  // The RSET is sent as soon as the refusal is known, without waiting for the client; the
  // deferred MAIL is answered by doorman itself, so the RSET may still be on its way.
  assert.ok(await eventually(() => fb.commands.includes('RSET'), 2000));
  c.close();
  await fb.close();
});

test('the backend refuses the client’s HELO that doorman answered: the next command gets its refusal, then HELO again', async () => {
  const fb = await startFakeBackend('refuse-helo');
  const d = await doorman(fb.port);
  try {
    const c = await SmtpClient.open(d.port, { ehlo: false });
    const e = await c.cmd('EHLO unknown.example.net');
    assert.equal(e.code, 250, 'answered by doorman from the backend’s capabilities');
    assert.match(e.raw, /PIPELINING/);
    const m = await c.cmd('MAIL FROM:<a@example.org>');
    assert.equal(m.code, 550);
    assert.match(m.text, /<unknown\.example\.net>: Helo command rejected/);
    assert.equal((await c.cmd('MAIL FROM:<a@example.org>')).code, 503, 'the HELO is forgotten: say it again');
    assert.ok(!fb.commands.some((l) => l.startsWith('MAIL')), 'no MAIL reached a backend that refused the HELO');
    c.close();
  } finally {
    await fb.close();
  }
});

test('RSET and NOOP with nothing to reset are answered by doorman; RSET inside a transaction reaches the backend', async () => {
  const fb = await startFakeBackend('none');
  const d = await doorman(fb.port);
  try {
    const c = await SmtpClient.open(d.port, { ehlo: 'client.example.net' });
    assert.equal((await c.cmd('RSET')).code, 250);
    assert.equal((await c.cmd('NOOP')).code, 250);
    // A MAIL without a RCPT never reaches the backend (deferred): its RSET has nothing to reset there.
    assert.equal((await c.cmd('MAIL FROM:<a@example.org>')).code, 250);
    assert.equal((await c.cmd('RSET')).code, 250);
    assert.equal((await c.cmd('MAIL FROM:<b@example.org>')).code, 250);
    assert.equal((await c.cmd('RCPT TO:<c@example.com>')).code, 250);
    assert.equal((await c.cmd('RSET')).code, 250);
    assert.equal((await c.cmd('RSET')).code, 250);
    assert.equal((await c.cmd('QUIT')).code, 221);
    await eventually(() => fb.commands.includes('RSET'));
    const after = fb.commands.slice(fb.commands.indexOf('EHLO client.example.net'));
    assert.deepEqual(after, ['EHLO client.example.net', 'MAIL FROM:<b@example.org>', 'RCPT TO:<c@example.com>', 'RSET'], 'one RSET reached the backend: the one that had a transaction to reset');
  } finally {
    await fb.close();
  }
});

test('a backend that offers XCLIENT but refuses it: 421 4.4.2 at the next command, counted and logged, nothing relayed', async () => {
  const fb = await startFakeBackend('refuse-xclient');
  const d = await doorman(fb.port);
  try {
    const c = await SmtpClient.open(d.port);
    const m = await c.cmd('MAIL FROM:<a@example.org>');
    assert.equal(m.code, 421);
    assert.match(m.text, /4\.4\.2/);
    assert.ok(await c.waitClosed(), 'the session ends');
    assert.ok(!fb.commands.some((l) => l.startsWith('MAIL')), 'no MAIL reached the backend');
    assert.ok((await d.metric('doorman_backend_failures_total', { kind: 'refused' })) >= 1);
    assert.ok(await eventually(() => d.logs().some((l) => l.msg === 'backend refused the client binding')));
  } finally {
    await fb.close();
  }
});

test('XCLIENT carries the HELO name when it fits; a name too long for the line, or xclientHelo: false, goes as EHLO after it', async () => {
  const fb = await startFakeBackend('xclient');
  const d = await doorman(fb.port);
  const plain = await startDoorman({ backendPort: fb.port, config: `${FAST}  xclientHelo: false\n` });
  running.push(plain);
  try {
    const session = async (port: number, name: string) => {
      const c = await SmtpClient.open(port, { ehlo: name });
      assert.equal((await c.cmd('MAIL FROM:<x@example.org>')).code, 250);
      assert.equal((await c.cmd('RCPT TO:<y@example.com>')).code, 250);
      assert.equal((await c.cmd('QUIT')).code, 221);
      const start = fb.commands.map((l) => l.startsWith('XCLIENT ')).lastIndexOf(true);
      return fb.commands.slice(start, fb.commands.indexOf('MAIL FROM:<x@example.org>', start));
    };
    const short = await session(d.port, 'short.example.net');
    assert.equal(short.length, 1, short.join(' | '));
    assert.match(short[0]!, /^XCLIENT ADDR=127\.0\.0\.1 NAME=\[UNAVAILABLE\] HELO=short\.example\.net PROTO=ESMTP$/);
    // '+' is xtext-encoded as +2B: 200 of them make a 600-character attribute.
    const long = `${'+'.repeat(200)}.example.net`;
    const split = await session(d.port, long);
    assert.equal(split.length, 2, split.join(' | '));
    assert.doesNotMatch(split[0]!, /HELO=/);
    assert.equal(split[1], `EHLO ${long}`);
    const off = await session(plain.port, 'short.example.net');
    assert.deepEqual(off.map((l) => l.split(' ')[0]), ['XCLIENT', 'EHLO']);
    assert.doesNotMatch(off[0]!, /HELO=/);
    for (const l of fb.commands.filter((x) => x.startsWith('XCLIENT '))) assert.ok(l.length <= 510, `XCLIENT line of ${l.length} characters`);
  } finally {
    await fb.close();
  }
});

test('a backend connection told one client is never given to another; the EHLO a client is shown is doorman’s, never an earlier client’s', async () => {
  const fb = await startFakeBackend('xclient-per-client');
  // XCLIENT, then the client's own EHLO: the backend answers it per client (SIZE 1000000 for .81).
  // One spare: the second client gets a prepared connection, not the first client's.
  const d = await startDoorman({ backendPort: fb.port, config: `${FAST.replace('spares: 0', 'spares: 1')}  xclientHelo: false\n` });
  running.push(d);
  try {
    const sizes: string[] = [];
    for (const ip of ['127.0.0.81', '127.0.0.82']) {
      const c = await SmtpClient.open(d.port, { localAddress: ip });
      sizes.push(c.keywords.get('SIZE') ?? '');
      assert.equal((await c.cmd('NOOP')).code, 250);
      assert.equal((await c.cmd('MAIL FROM:<a@example.org>')).code, 250);
      assert.equal((await c.cmd('RCPT TO:<b@example.com>')).code, 250);
      assert.equal((await c.cmd('QUIT')).code, 221);
      await sleep(100);
    }
    // Each XCLIENT went to a connection nobody had been bound to: none was refused.
    const xclients = fb.commands.filter((l) => l.startsWith('XCLIENT '));
    assert.deepEqual(xclients.map((l) => /ADDR=(\S+)/.exec(l)?.[1]), ['127.0.0.81', '127.0.0.82']);
    assert.equal(await d.metric('doorman_backend_failures_total'), 0);
    assert.equal(await d.metric('doorman_backend_reused_total'), 1, 'the second client got the spare');
    // What the backend offers doorman on the connection, for both (not .81's SIZE for .82).
    assert.deepEqual(sizes, ['52428800', '52428800']);
  } finally {
    await fb.close();
  }
});

test('BDAT: a backend that refuses a chunk decides the message — the client gets that refusal after its data, never 250', async () => {
  const ok = await startFakeBackend('chunking');
  const refusing = await startFakeBackend('chunking-refuse');
  try {
    for (const [fb, code] of [
      [ok, 250],
      [refusing, 552],
    ] as const) {
      const d = await doorman(fb.port);
      const c = await SmtpClient.open(d.port);
      // Big enough to go in several chunks; dot lines unstuffed on the way.
      const body = `Subject: bdat\r\n\r\n..dot\r\n${'z'.repeat(70).concat('\r\n').repeat(3000)}`;
      const r = await c.message({ from: 'a@example.org', to: 'b@example.com', body });
      assert.equal(r.code, code, r.raw);
      c.close();
    }
    assert.equal(ok.messages.length, 1);
    assert.ok(ok.messages[0]!.startsWith('Subject: bdat\r\n\r\n.dot\r\n'), 'stored unstuffed');
    assert.ok(ok.commands.filter((l) => l.startsWith('BDAT ')).length >= 2, 'several chunks');
    assert.ok(ok.commands.some((l) => / LAST$/.test(l)));
    assert.ok(!ok.commands.includes('DATA'), 'no DATA command');
    assert.equal(refusing.messages.length, 0);
  } finally {
    await ok.close();
    await refusing.close();
  }
});

test('BDAT: a backend that refuses a chunk and then accepts LAST (its refusal came back after LAST went): the client gets the refusal, never 250', async () => {
  const fb = await startFakeBackend('chunking-refuse-late');
  const d = await doorman(fb.port);
  try {
    const c = await SmtpClient.open(d.port);
    const body = `Subject: late\r\n\r\n${'z'.repeat(70).concat('\r\n').repeat(3000)}`;
    const r = await c.message({ from: 'a@example.org', to: 'b@example.com', body });
    assert.equal(r.code, 452, r.raw);
    assert.match(r.text, /^4\.3\.1 /);
    const bdat = fb.commands.filter((l) => l.startsWith('BDAT '));
    assert.ok(bdat.length >= 2 && / LAST$/.test(bdat.at(-1)!), `LAST was sent after the refused chunk: ${bdat.join(' | ')}`);
    assert.equal(fb.messages.length, 1, 'the backend took the message (its fault), yet the client was told the refusal');
    // doorman's log is read from its stdout as it comes: wait for the line, do not race it.
    assert.ok(await eventually(() => d.logs().some((l) => l.msg.startsWith('backend accepted a message after refusing a chunk')), 5000));
    c.close();
  } finally {
    await fb.close();
  }
});

test('the backend dies while doorman waits for it to drain (back-pressure): the client is read again and gets 451, no hang', async () => {
  const fb = await startFakeBackend('stall-then-close');
  const d = await doorman(fb.port);
  try {
    const c = await SmtpClient.open(d.port);
    await c.message({ from: 'a@example.org', to: 'b@example.com' });
    // Far more than the socket buffers hold while the backend reads nothing.
    c.write('Subject: stalled\r\n\r\n' + `${'s'.repeat(78)}\r\n`.repeat(100_000));
    c.write('.\r\n');
    const r = await c.reply(8000);
    assert.equal(r.code, 451, r.raw);
    assert.match(r.text, /^4\.4\.2 /);
    assert.equal(fb.messages.length, 0);
  } finally {
    await fb.close();
  }
});
