/**
 * Greylisting end to end: the in-memory default and a real Redis shared by two instances, and a
 * real three-master Redis Cluster (redis-cli --cluster create) with two doorman instances
 * sharing one rate limit and one greylist; and Redis found through Sentinel.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startFakeBackend, type FakeBackend } from '../helpers/fake-backend.js';
import { startRedis, startRedisCluster, startSentinel, type RedisServer } from '../helpers/redis.js';
import { SmtpClient } from '../helpers/smtp.js';
import { sleep, useCleanup } from '../helpers/procs.js';

useCleanup();
let fb: FakeBackend;
let redis: RedisServer;

const GREY = `rule: greylist
settings:
  delay: 1000
  retryWindow: 60000
  passLifetime: 60000
  ipv4Prefix: 24
  allowSenderDomains: [bigsender.example]
`;

before(async () => {
  fb = await startFakeBackend('none');
  redis = await startRedis();
});
after(async () => {
  await fb?.close();
  await redis?.stop();
});

async function rcpt(d: Doorman, localAddress: string, from: string, to: string): Promise<{ code: number; text: string }> {
  const c = await SmtpClient.open(d.port, { localAddress, ehlo: 'mta.example.org' });
  assert.equal((await c.cmd(`MAIL FROM:<${from}>`)).code, 250);
  const r = await c.cmd(`RCPT TO:<${to}>`);
  c.close();
  return { code: r.code, text: r.text };
}

test('in memory: 451 4.7.1 first, 451 too early, then passed; the same /24 passes, another network does not', async () => {
  const d = await startDoorman({ backendPort: fb.port, rules: { 'greylist.yaml': GREY } });
  try {
    const first = await rcpt(d, '127.0.0.51', 'news@sender.example', 'user@example.com');
    assert.equal(first.code, 451);
    assert.equal(first.text, '4.7.1 Greylisted, try again later');
    assert.equal((await rcpt(d, '127.0.0.51', 'news@sender.example', 'user@example.com')).code, 451, 'retry before the delay');
    await sleep(1100);
    assert.equal((await rcpt(d, '127.0.0.52', 'news@sender.example', 'user@example.com')).code, 250, 'retry from the same /24 after the delay');
    assert.equal((await rcpt(d, '127.0.0.53', 'news@sender.example', 'user@example.com')).code, 250, 'passed triplet');
    assert.equal((await rcpt(d, '127.0.1.51', 'news@sender.example', 'user@example.com')).code, 451, 'another network is a new triplet');
    assert.equal((await rcpt(d, '127.0.0.51', 'a@bigsender.example', 'user@example.com')).code, 250, 'allowlisted sender domain');
    assert.equal(await d.metric('doorman_greylist_total', { result: 'allowlisted' }), 1);
    assert.ok((await d.metric('doorman_greylist_total', { result: 'greylisted' })) >= 3);
  } finally {
    await d.stop();
  }
});

test('with Redis: a triplet greylisted by one instance passes on the other', async () => {
  const opts = { backendPort: fb.port, env: { DOORMAN_REDIS_URL: redis.url }, rules: { 'greylist.yaml': GREY } };
  const a = await startDoorman(opts);
  const b = await startDoorman(opts);
  try {
    assert.equal((await rcpt(a, '127.0.0.54', 'x@shared.example', 'user@example.com')).code, 451);
    await sleep(1100);
    assert.equal((await rcpt(b, '127.0.0.54', 'x@shared.example', 'user@example.com')).code, 250);
  } finally {
    await a.stop();
    await b.stop();
  }
});

test('Redis Cluster: two instances share a rate limit and greylisting across slots', async () => {
  const cluster = await startRedisCluster();
  const rules = {
    'greylist.yaml': GREY,
    'ratelimit.yaml': 'rule: ratelimit\nsettings:\n  limits:\n    - name: conn\n      count: connections\n      limit: 4\n      window: 60000\n',
  };
  const a = await startDoorman({ backendPort: fb.port, env: { DOORMAN_REDIS_URL: cluster.url }, rules });
  const b = await startDoorman({ backendPort: fb.port, env: { DOORMAN_REDIS_URL: cluster.url }, rules });
  try {
    const codes: number[] = [];
    for (const d of [a, b, a, b, a]) {
      const c = await SmtpClient.greet(d.port, { localAddress: '127.0.0.55' });
      codes.push(c.greeting.code);
      c.close();
      await sleep(30);
    }
    assert.deepEqual(codes, [220, 220, 220, 220, 421], 'one limit across both instances');
    // Many triplets land on different slots of the three masters.
    // (One client address per triplet: the connection limit above applies to each address.)
    for (let i = 0; i < 6; i++) assert.equal((await rcpt(a, `127.0.0.${60 + i}`, `s${i}@c.example`, 'user@example.com')).code, 451);
    await sleep(1100);
    for (let i = 0; i < 6; i++) assert.equal((await rcpt(b, `127.0.0.${70 + i}`, `s${i}@c.example`, 'user@example.com')).code, 250, 'same /24, other instance');
    assert.equal(await a.metric('doorman_store_fail_open_total'), 0);
    assert.equal(await b.metric('doorman_store_fail_open_total'), 0);
  } finally {
    await a.stop();
    await b.stop();
    await cluster.stop();
  }
});

test('Redis Sentinel: doorman finds the master through the sentinel', async () => {
  const sentinel = await startSentinel(redis);
  const d = await startDoorman({ backendPort: fb.port, env: { DOORMAN_REDIS_URL: sentinel.url }, rules: { 'greylist.yaml': GREY } });
  try {
    assert.equal((await rcpt(d, '127.0.0.57', 'y@sentinel.example', 'user@example.com')).code, 451);
    await sleep(1100);
    assert.equal((await rcpt(d, '127.0.0.57', 'y@sentinel.example', 'user@example.com')).code, 250);
    assert.equal(await d.metric('doorman_store_fail_open_total'), 0);
  } finally {
    await d.stop();
    await sentinel.stop();
  }
});
