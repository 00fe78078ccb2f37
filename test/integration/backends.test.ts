/**
 * Several backends, MX-style, with real smtp-sinks: lower preference first, a random spread among
 * equal ones, a dead backend and one answering 421 skipped and marked down, a backend killed
 * during load — and every message the client got a 250 for lands exactly once. Then the same
 * from a domain's MX records served by dnsmasq.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startDnsmasq } from '../helpers/dns.js';
import { startFakeBackend } from '../helpers/fake-backend.js';
import { freePort } from '../helpers/net.js';
import { startSink, type Sink } from '../helpers/sink.js';
import { SmtpClient } from '../helpers/smtp.js';
import { sleep, useCleanup } from '../helpers/procs.js';

useCleanup();
const cleanups: (() => Promise<unknown>)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c().catch(() => undefined);
});

/** One message per connection; returns the reply code. */
async function send(d: Doorman, id: string): Promise<number> {
  try {
    const c = await SmtpClient.greet(d.port);
    if (c.greeting.code !== 220) {
      c.close();
      return c.greeting.code;
    }
    await c.ehlo('load.example.org');
    const t = await c.transaction({ from: `${id}@load.example`, to: 'user@example.com', body: `Subject: ${id}\r\n\r\nbody\r\n`, timeout: 10_000 });
    c.close();
    return t.last.code;
  } catch {
    return 0;
  }
}

function countsBySender(sinks: Sink[]): Map<string, number>[] {
  return sinks.map((s) => {
    const m = new Map<string, number>();
    for (const msg of s.messages()) {
      const id = /^<([^@]+)@/.exec(msg.mail)?.[1] ?? '';
      m.set(id, (m.get(id) ?? 0) + 1);
    }
    return m;
  });
}

test('preference order, random spread among equals, dead and 421 backends skipped, a backend killed under load', { timeout: 120_000 }, async () => {
  const a = await startSink();
  const b = await startSink();
  const c = await startSink();
  // Greets with 421, as a real MTA does when overloaded.
  const fourTwentyOne = await startFakeBackend('busy-greeting');
  const dead = await freePort();
  cleanups.push(() => a.stop(), () => b.stop(), () => c.stop(), () => fourTwentyOne.close());
  const d = await startDoorman({
    backendPort: 1,
    env: { DOORMAN_BACKEND: `5 127.0.0.1:${dead}, 5 127.0.0.1:${fourTwentyOne.port}, 10 127.0.0.1:${a.port}, 10 127.0.0.1:${b.port}, 20 127.0.0.1:${c.port}` },
    config: 'backend:\n  connectTimeout: 1000\n  greetingTimeout: 1000\n  backoff: 60000\n',
  });
  cleanups.push(() => d.stop());
  const ok: string[] = [];
  for (let i = 0; i < 40; i++) {
    const id = `m${i}`;
    if ((await send(d, id)) === 250) ok.push(id);
  }
  assert.equal(ok.length, 40, 'every message delivered despite two bad backends');
  await sleep(300);
  const [ca, cb, cc] = countsBySender([a, b, c]);
  assert.ok((ca?.size ?? 0) >= 5 && (cb?.size ?? 0) >= 5, `random spread among equal preferences: ${ca?.size} / ${cb?.size}`);
  assert.equal(cc?.size ?? 0, 0, 'the backup (preference 20) is not used while 10s work');
  assert.equal(await d.metric('doorman_backend_up', { backend: `127.0.0.1:${dead}` }), 0);
  assert.equal(await d.metric('doorman_backend_up', { backend: `127.0.0.1:${fourTwentyOne.port}` }), 0);
  assert.equal(d.logs().filter((l) => l.msg.startsWith('backend down') && l.backend === `127.0.0.1:${dead}`).length, 1, 'one log line per state change');
  assert.equal(fourTwentyOne.connections, 1, 'marked down after one failure: not retried during the back-off');

  // Kill A during a bounded load; B (and then C) take over. Each 250 lands exactly once.
  const load: Promise<void>[] = [];
  const okDuring: string[] = [];
  for (let i = 0; i < 30; i++) {
    const id = `k${i}`;
    load.push(send(d, id).then((code) => void (code === 250 && okDuring.push(id))));
    if (i === 10) await a.proc.stop('SIGKILL');
    await sleep(10);
  }
  await Promise.all(load);
  await sleep(500);
  const counts = countsBySender([a, b, c]);
  for (const id of [...ok, ...okDuring]) {
    const n = counts.reduce((sum, m) => sum + (m.get(id) ?? 0), 0);
    assert.equal(n, 1, `${id} delivered exactly once (got ${n})`);
  }
  assert.ok(okDuring.length >= 25, `most messages went through during the failure: ${okDuring.length}/30`);
  assert.ok((await d.metric('doorman_backend_sessions_total', { backend: `127.0.0.1:${b.port}` })) >= 5);
});

test('no backend answers: 421 4.4.1 at the first command, never a 250', async () => {
  const d = await startDoorman({ backendPort: 1, env: { DOORMAN_BACKEND: `10 127.0.0.1:${await freePort()}, 20 127.0.0.1:${await freePort()}` } });
  cleanups.push(() => d.stop());
  const c = await SmtpClient.open(d.port, { ehlo: false });
  const r = await c.cmd('EHLO client.example.net');
  assert.equal(r.code, 421);
  assert.match(r.text, /^4\.4\.1 /);
  c.close();
});

test('mx:domain: MX records (dnsmasq) give the order; the next exchange takes over', { timeout: 60_000 }, async () => {
  const port = await freePort();
  const primary = await startSink([], '127.0.0.101', port);
  const secondary = await startSink([], '127.0.0.102', port);
  const dns = await startDnsmasq({
    mx: [
      ['backends.test', 'mx1.backends.test', 10],
      ['backends.test', 'mx2.backends.test', 20],
    ],
    a: [
      ['mx1.backends.test', '127.0.0.101'],
      ['mx2.backends.test', '127.0.0.102'],
    ],
  });
  cleanups.push(() => primary.stop(), () => secondary.stop(), () => dns.stop());
  const d = await startDoorman({ backendPort: 1, env: { DOORMAN_BACKEND: `mx:backends.test:${port}`, DOORMAN_DNS_SERVERS: dns.server } });
  cleanups.push(() => d.stop());
  for (let i = 0; i < 5; i++) assert.equal(await send(d, `mx${i}`), 250);
  await sleep(300);
  assert.equal(primary.messages().length, 5, 'the lower MX preference first');
  await primary.proc.stop('SIGKILL');
  for (let i = 5; i < 10; i++) assert.equal(await send(d, `mx${i}`), 250);
  await sleep(300);
  assert.equal(secondary.messages().length, 5);
});
