/**
 * Rate and concurrency limits end to end with a real redis-server shared by two doorman
 * instances: a limit holds across both; replies are 4xx and name no internal detail; killing
 * Redis never blocks or crashes mail with onError: pass (fail open) (logged once per outage) and gives 4xx in
 * onError: tempfail (fail closed); limits come back when Redis does; `doorman limits show|reset` works; the
 * in-memory default applies the same limits to a single instance.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import path from 'node:path';
import { promisify } from 'node:util';
import { ROOT, startDoorman, type Doorman } from '../helpers/doorman.js';
import { startFakeBackend, type FakeBackend } from '../helpers/fake-backend.js';
import { startRedis, type RedisServer } from '../helpers/redis.js';
import { SmtpClient } from '../helpers/smtp.js';
import { eventually, sleep, useCleanup } from '../helpers/procs.js';

useCleanup();
const run = promisify(execFile);
let redis: RedisServer;
let fb: FakeBackend;
let a: Doorman;
let b: Doorman;

const LIMITS = `rule: ratelimit
onError: pass
settings:
  limits:
    - name: conn-rate
      count: connections
      limit: 5
      window: 60000
    - name: sessions
      count: concurrency
      limit: 2
    - name: sender-rcpts
      count: messages
      key: sender
      cost: recipient
      limit: 3
      window: 60000
    - name: domain-msgs
      count: messages
      key: sender_domain
      cost: message
      limit: 2
      window: 60000
`;

before(async () => {
  redis = await startRedis();
  fb = await startFakeBackend('none');
  const opts = { backendPort: fb.port, env: { DOORMAN_REDIS_URL: redis.url }, rules: { 'ratelimit.yaml': LIMITS } };
  a = await startDoorman(opts);
  b = await startDoorman(opts);
});
after(async () => {
  await a?.stop();
  await b?.stop();
  await fb?.close();
  await redis?.stop();
});

test('a connection-rate limit holds across two instances sharing Redis', async () => {
  const codes: number[] = [];
  for (const d of [a, b, a, b, a, b]) {
    const g = await SmtpClient.greet(d.port, { localAddress: '127.0.0.31' });
    codes.push(g.greeting.code);
    if (g.greeting.code === 421) assert.equal(g.greeting.text, '4.7.0 Error: too many connections, try again later', 'no internal detail');
    g.close();
    await sleep(50);
  }
  assert.deepEqual(codes, [220, 220, 220, 220, 220, 421]);
  const other = await SmtpClient.greet(b.port, { localAddress: '127.0.0.32' });
  assert.equal(other.greeting.code, 220, 'another client has its own bucket');
  other.close();
  assert.equal((await a.metric('doorman_ratelimit_exceeded_total', { limit: 'conn-rate' })) + (await b.metric('doorman_ratelimit_exceeded_total', { limit: 'conn-rate' })), 1);
});

test('a concurrency limit holds across instances; a closed session gives its slot back', async () => {
  const one = await SmtpClient.greet(a.port, { localAddress: '127.0.0.33' });
  const two = await SmtpClient.greet(b.port, { localAddress: '127.0.0.33' });
  assert.deepEqual([one.greeting.code, two.greeting.code], [220, 220]);
  const three = await SmtpClient.greet(a.port, { localAddress: '127.0.0.33' });
  assert.equal(three.greeting.code, 421);
  three.close();
  one.close();
  await sleep(300);
  const four = await SmtpClient.greet(b.port, { localAddress: '127.0.0.33' });
  assert.equal(four.greeting.code, 220, 'slot released when the session ended');
  two.close();
  four.close();
});

test('message limits: per recipient and per message, 450 4.7.1 at RCPT', async () => {
  const c = await SmtpClient.open(a.port, { localAddress: '127.0.0.34', ehlo: 'sender.example.org' });
  assert.equal((await c.cmd('MAIL FROM:<bulk@rate.example>')).code, 250);
  assert.equal((await c.cmd('RCPT TO:<r1@example.com>')).code, 250);
  assert.equal((await c.cmd('RCPT TO:<r2@example.com>')).code, 250);
  assert.equal((await c.cmd('RSET')).code, 250);
  assert.equal((await c.cmd('MAIL FROM:<bulk@rate.example>')).code, 250);
  assert.equal((await c.cmd('RCPT TO:<r3@example.com>')).code, 250, 'third recipient token');
  const r = await c.cmd('RCPT TO:<r4@example.com>');
  assert.equal(r.code, 450);
  assert.equal(r.text, '4.7.1 Error: too much mail, try again later');
  assert.equal((await c.cmd('RSET')).code, 250);
  // sender_domain, one per message: two transactions from rate.example already counted.
  assert.equal((await c.cmd('MAIL FROM:<other@rate.example>')).code, 250);
  assert.equal((await c.cmd('RCPT TO:<r5@example.com>')).code, 450, 'third message from the domain');
  c.close();
});

test('doorman limits show and reset read and clear the shared state', async () => {
  const env = { PATH: process.env.PATH ?? '', DOORMAN_REDIS_URL: redis.url, DOORMAN_RULES: a.rulesDir };
  const bin = path.join(ROOT, 'bin', 'doorman.js');
  const show = await run(process.execPath, [bin, 'limits', 'show', 'ratelimit', 'conn-rate', '127.0.0.31', '--json'], { env });
  const state = JSON.parse(show.stdout) as { key: string; view: { kind: string; used: number; remaining: number; now: number; expiresAt: number | null } };
  assert.equal(state.key, 'rl:{ratelimit:conn-rate:127.0.0.31}');
  assert.deepEqual([state.view.kind, state.view.used, state.view.remaining], ['rate', 5, 0], 'five connections of five (the sixth was refused: not counted)');
  assert.ok((state.view.expiresAt ?? 0) > state.view.now, 'the key expires');
  const reset = await run(process.execPath, [bin, 'limits', 'reset', 'ratelimit', 'conn-rate', '127.0.0.31'], { env });
  assert.match(reset.stdout, /^reset: ratelimit conn-rate: connections per client 127\.0\.0\.31/);
  const g = await SmtpClient.greet(a.port, { localAddress: '127.0.0.31' });
  assert.equal(g.greeting.code, 220, 'the reset bucket lets the client in again');
  g.close();
});

test('Redis killed: fail-open keeps mail flowing, logged once; fail-closed says 421 4.3.0; limits return with Redis', async () => {
  const closed = await startDoorman({
    backendPort: fb.port,
    env: { DOORMAN_REDIS_URL: redis.url },
    rules: { 'ratelimit.yaml': LIMITS.replace('onError: pass', 'onError: tempfail') },
  });
  try {
    await redis.kill();
    const t0 = Date.now();
    for (let i = 0; i < 4; i++) {
      const g = await SmtpClient.greet(a.port, { localAddress: '127.0.0.35' });
      assert.equal(g.greeting.code, 220, 'fail-open: no refusal, no hang');
      assert.equal((await g.ehlo('x.example.org')).reply.code, 250);
      assert.equal((await g.cmd('MAIL FROM:<down@example.org>')).code, 250);
      assert.equal((await g.cmd('RCPT TO:<b@example.com>')).code, 250);
      g.close();
    }
    assert.ok(Date.now() - t0 < 8000, 'no session waited on the dead Redis');
    assert.ok((await a.metric('doorman_store_fail_open_total', { rule: 'ratelimit' })) >= 4);
    assert.ok((await a.metric('doorman_redis_errors_total')) >= 1);
    assert.equal(await a.metric('doorman_redis_up'), 0);
    const down = a.logs().filter((l) => l.msg.startsWith('redis unreachable'));
    assert.equal(down.length, 1, 'logged once per outage');
    const g = await SmtpClient.greet(closed.port, { localAddress: '127.0.0.36' });
    assert.equal(g.greeting.code, 421);
    assert.equal(g.greeting.text, '4.3.0 Temporary failure, try again later');
    g.close();
    assert.ok((await closed.metric('doorman_store_fail_closed_total', { rule: 'ratelimit' })) >= 1);
    assert.equal(await closed.metric('doorman_store_fail_open_total', { rule: 'ratelimit' }), 0);

    await redis.restart();
    await eventually(async () => (await a.metric('doorman_redis_up')) === 1, 10_000);
    assert.ok(a.logs().some((l) => l.msg === 'redis reachable again'));
    const codes: number[] = [];
    for (let i = 0; i < 6; i++) {
      const x = await SmtpClient.greet(a.port, { localAddress: '127.0.0.37' });
      codes.push(x.greeting.code);
      x.close();
      await sleep(30);
    }
    assert.deepEqual(codes, [220, 220, 220, 220, 220, 421], 'limits enforced again');
  } finally {
    await closed.stop();
  }
});

test('without Redis the in-memory store applies the same limits to one instance', async () => {
  const mem = await startDoorman({ backendPort: fb.port, rules: { 'ratelimit.yaml': LIMITS } });
  try {
    const codes: number[] = [];
    for (let i = 0; i < 6; i++) {
      const g = await SmtpClient.greet(mem.port, { localAddress: '127.0.0.38' });
      codes.push(g.greeting.code);
      g.close();
      await sleep(30);
    }
    assert.deepEqual(codes, [220, 220, 220, 220, 220, 421]);
  } finally {
    await mem.stop();
  }
});
