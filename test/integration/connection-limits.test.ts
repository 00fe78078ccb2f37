/**
 * Connection limits hold from accept to close, whatever the connection is doing: an smtps
 * client in its TLS handshake counts in maxClients and maxClientsPerIp like a session does; a
 * handshake has its own short deadline (tlsHandshakeTimeout) and shows in
 * doorman_connections_pending while it lasts; IPv6 clients are counted per /64.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import net from 'node:net';
import { makeCert } from '../helpers/certs.js';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startSink, type Sink } from '../helpers/sink.js';
import { SmtpClient } from '../helpers/smtp.js';
import { eventually, sleep, useCleanup } from '../helpers/procs.js';

useCleanup();
let sink: Sink;
let cert: ReturnType<typeof makeCert>;

before(async () => {
  sink = await startSink();
  cert = makeCert();
});
after(async () => {
  await sink?.stop();
});

function start(limits: string): Promise<Doorman> {
  return startDoorman({
    backendPort: sink.port,
    listen: 'smtp://127.0.0.1:{PORT},smtps://127.0.0.1:{PORT}',
    env: { DOORMAN_TLS_CERT: cert.cert, DOORMAN_TLS_KEY: cert.key },
    config: `limits:\n${limits}`,
  });
}

/** An smtps client that waits for its greeting: the client, or null when doorman closed first. */
async function smtps(port: number, localAddress: string): Promise<SmtpClient | null> {
  const c = await SmtpClient.greet(port, { tls: true, localAddress, timeout: 5000 }).catch(() => null);
  if (c?.greeting.code === 220) return c;
  c?.close();
  return null;
}

test('smtps: with limits 3 per IP / 5 in total, 10 parallel TLS clients from one address: 3 greeted', async () => {
  const dm = await start('  maxClients: 5\n  maxClientsPerIp: 3\n  tlsHandshakeTimeout: 2000\n');
  try {
    const smtpsPort = dm.ports[1]!;
    const tries = await Promise.all(Array.from({ length: 10 }, () => smtps(smtpsPort, '127.0.0.30')));
    const greeted = tries.filter((c): c is SmtpClient => c !== null);
    assert.equal(greeted.length, 3, 'maxClientsPerIp holds for connections still in their handshake');
    assert.equal(await dm.metric('doorman_connections_refused_total', { reason: 'max_clients_per_ip' }), 7);
    // Two more from another address fill maxClients; the next one, from a third, is refused.
    const more = [await smtps(smtpsPort, '127.0.0.31'), await smtps(smtpsPort, '127.0.0.31')];
    assert.ok(more.every((c) => c !== null));
    assert.equal(await smtps(smtpsPort, '127.0.0.32'), null);
    const plain = await SmtpClient.greet(dm.ports[0]!, { localAddress: '127.0.0.32' });
    const r = plain.greeting;
    assert.equal(r.code, 421, 'the limit is one for all listeners');
    assert.match(r.text, /^4\.7\.0 /);
    assert.equal(await dm.metric('doorman_connections_refused_total', { reason: 'max_clients' }), 2);
    for (const c of [...greeted, ...more]) c?.close();
    // Closed sessions give their slots back.
    await eventually(async () => (await dm.metric('doorman_connections_active')) === 0, 5000);
    const again = await smtps(smtpsPort, '127.0.0.30');
    assert.ok(again, 'a client is greeted again once the others left');
    again.close();
  } finally {
    await dm.stop();
  }
});

test('40 half-open TLS handshakes hold their slots, show in doorman_connections_pending, and end at tlsHandshakeTimeout', async () => {
  const dm = await start('  maxClients: 40\n  maxClientsPerIp: 100\n  tlsHandshakeTimeout: 1500\n');
  const sockets: net.Socket[] = [];
  try {
    const smtpsPort = dm.ports[1]!;
    const closed: Promise<number>[] = [];
    const t0 = Date.now();
    for (let i = 0; i < 40; i++) {
      // TCP connect, never a ClientHello.
      const s = net.connect({ port: smtpsPort, host: '127.0.0.1', localAddress: '127.0.0.33' });
      s.on('error', () => undefined);
      closed.push(new Promise((r) => s.once('close', () => r(Date.now() - t0))));
      sockets.push(s);
    }
    const pending = () => dm.metric('doorman_connections_pending', { stage: 'tls_handshake' });
    await eventually(async () => (await pending()) === 40, 5000);
    assert.equal(await pending(), 40);
    // They count in maxClients: a real client is refused while they are held.
    const c = await SmtpClient.greet(dm.ports[0]!, { localAddress: '127.0.0.34' });
    assert.equal(c.greeting.code, 421);
    // doorman closes every one at the handshake deadline, not at the 300 s command timeout.
    const times = await Promise.race([Promise.all(closed), sleep(8000).then(() => null)]);
    assert.ok(times, 'every half-open handshake was closed by doorman');
    assert.ok(Math.min(...times) >= 1300, `closed after the deadline (${Math.min(...times)} ms)`);
    await eventually(async () => (await pending()) === 0, 3000);
    assert.equal(await pending(), 0);
    assert.equal(await dm.metric('doorman_connections_refused_total', { reason: 'tls_timeout' }), 40);
    assert.equal(await dm.metric('doorman_tls_sessions_total', { mode: 'implicit', result: 'timeout' }), 40);
    const ok = await SmtpClient.greet(dm.ports[0]!, { localAddress: '127.0.0.34' });
    assert.equal(ok.greeting.code, 220, 'the slots are free again');
    ok.close();
  } finally {
    for (const s of sockets) s.destroy();
    await dm.stop();
  }
});

test('a client that leaves during its handshake gives its slot back at once', async () => {
  const dm = await start('  maxClients: 3\n  maxClientsPerIp: 3\n  tlsHandshakeTimeout: 60000\n');
  try {
    const smtpsPort = dm.ports[1]!;
    const sockets = Array.from({ length: 3 }, () => {
      const s = net.connect({ port: smtpsPort, host: '127.0.0.1', localAddress: '127.0.0.35' });
      s.on('error', () => undefined);
      return s;
    });
    const pending = () => dm.metric('doorman_connections_pending', { stage: 'tls_handshake' });
    await eventually(async () => (await pending()) === 3, 5000);
    for (const s of sockets) s.destroy();
    await eventually(async () => (await pending()) === 0, 3000);
    assert.equal(await pending(), 0);
    const c = await smtps(smtpsPort, '127.0.0.35');
    assert.ok(c, 'greeted: the three left slots were released on close, not at the 60 s deadline');
    c.close();
  } finally {
    await dm.stop();
  }
});

/**
 * IPv6 test hosts: addresses of two /64 networks of fd00:14:4c::/48 (unique local, RFC 4193) added
 * to lo for this test and removed after it; they never leave the machine. Needs root and `ip`;
 * the test is skipped without them (the keying is also tested in test/unit/client-key.test.ts).
 */
const V6 = ['fd00:14:4c:1::1', 'fd00:14:4c:1::2', 'fd00:14:4c:1::3', 'fd00:14:4c:2::1'];
function addV6(): boolean {
  try {
    for (const a of V6) execFileSync('ip', ['-6', 'addr', 'add', `${a}/128`, 'dev', 'lo', 'nodad'], { stdio: 'pipe' });
    return true;
  } catch {
    delV6();
    return false;
  }
}
function delV6(): void {
  for (const a of V6) {
    try {
      execFileSync('ip', ['-6', 'addr', 'del', `${a}/128`, 'dev', 'lo'], { stdio: 'pipe' });
    } catch {
      // not added
    }
  }
}

test('IPv6 clients are counted per /64: three addresses of one /64 share maxClientsPerIp 2', async (t) => {
  if (!addV6()) return t.skip('cannot add IPv6 test addresses to lo (needs root)');
  let dm: Doorman | null = null;
  const held: SmtpClient[] = [];
  try {
    dm = await startDoorman({ backendPort: sink.port, listen: 'smtp://[::1]:{PORT}', config: 'limits:\n  maxClientsPerIp: 2\n' });
    const open = async (localAddress: string) => {
      const c = await SmtpClient.greet(dm!.port, { host: '::1', localAddress });
      if (c.greeting.code === 220) held.push(c);
      else c.close();
      return c.greeting.code;
    };
    assert.equal(await open('fd00:14:4c:1::1'), 220);
    assert.equal(await open('fd00:14:4c:1::2'), 220);
    assert.equal(await open('fd00:14:4c:1::3'), 421, 'a third address of the same /64 is the same client');
    assert.equal(await open('fd00:14:4c:2::1'), 220, 'another /64 is another client');
    held.shift()?.close();
    const s = await dm.waitSessions(1);
    assert.equal(s[0]?.client, 'fd00:14:4c:1::1', 'the session log names the address, not the network');
    assert.equal(await open('fd00:14:4c:1::3'), 220, 'the slot is back once a session of that /64 ended');
  } finally {
    for (const c of held) c.close();
    await dm?.stop();
    delV6();
  }
});

test('STARTTLS and then no ClientHello: the connection ends at tlsHandshakeTimeout, its slot is free', async () => {
  const dm = await start('  maxClients: 5\n  maxClientsPerIp: 1\n  tlsHandshakeTimeout: 1500\n');
  try {
    const c = await SmtpClient.open(dm.ports[0]!, { localAddress: '127.0.0.36' });
    const t0 = Date.now();
    assert.equal((await c.cmd('STARTTLS')).code, 220);
    // No handshake follows: doorman closes at the handshake deadline, not at commandTimeout (300 s).
    assert.ok(await c.waitClosed(6000), 'closed by doorman');
    const ms = Date.now() - t0;
    assert.ok(ms >= 1300, `closed after the deadline (${ms} ms)`);
    assert.equal(await dm.metric('doorman_tls_sessions_total', { mode: 'starttls', result: 'failure' }), 1);
    const next = await SmtpClient.greet(dm.ports[0]!, { localAddress: '127.0.0.36' });
    assert.equal(next.greeting.code, 220, 'maxClientsPerIp 1: the slot was given back');
    next.close();
  } finally {
    await dm.stop();
  }
});
