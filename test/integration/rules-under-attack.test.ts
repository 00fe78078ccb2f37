/**
 * Rules under attack (issue 14): a client that works around a rule's bookkeeping instead of its
 * check. Each test drives doorman as an attacker would and counts what reaches smtp-sink (the
 * backend) or what stays in a real Redis:
 *   - `cost: message` rate limits count every transaction of a session, not the session;
 *   - nullSenderMaxRecipients counts pipelined recipients the backend has not answered yet;
 *   - an allowlist match at MAIL holds for its transaction only, not the rest of the session;
 *   - a concurrency slot taken late (store timeout, client gone) is given back at the session's end;
 *   - a greylisted recipient costs no rate-limit token;
 *   - failed logins are counted across sessions (count: auth_failures), against Postfix with SASL.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { RedisStore } from '../../src/store/redis.js';
import { MemoryStore, type Store } from '../../src/store/store.js';
import { startDoorman } from '../helpers/doorman.js';
import { startPostfix } from '../helpers/postfix.js';
import { startRedis, type RedisServer } from '../helpers/redis.js';
import { startSink, type Sink } from '../helpers/sink.js';
import { SmtpClient } from '../helpers/smtp.js';
import { eventually, sleep, useCleanup } from '../helpers/procs.js';

useCleanup();
const run = promisify(execFile);
let sink: Sink;
let redis: RedisServer;

before(async () => {
  sink = await startSink();
  redis = await startRedis();
});
after(async () => {
  await sink?.stop();
  await redis?.stop();
});

/** One transaction: MAIL, RCPT, and the message when the recipient was accepted (else RSET). RCPT's reply. */
async function transaction(c: SmtpClient, from: string, to: string): Promise<{ code: number; text: string }> {
  const t = await c.transaction({ from, to, body: `Subject: from ${from}\r\n\r\nbody\r\n` });
  assert.equal(t.mail.code, 250);
  const r = t.rcpt[0]!;
  if (r.code !== 250) assert.equal((await c.cmd('RSET')).code, 250);
  else assert.equal(t.end?.code, 250);
  return r;
}

/** Messages smtp-sink received from `from`, once `expected` have arrived (and a moment for more). */
async function delivered(from: string, expected: number): Promise<number> {
  const count = () => sink.messages().filter((m) => m.mail.startsWith(`<${from}>`)).length;
  await eventually(() => count() >= expected, 5000);
  await sleep(300);
  return count();
}

async function redisCli(...args: string[]): Promise<string> {
  const { stdout } = await run('redis-cli', ['-p', String(redis.port), ...args], { timeout: 10_000 });
  return stdout.trim();
}

const MESSAGES_PER_CLIENT = `rule: ratelimit
action: enforce
settings:
  limits:
    - name: client-msgs
      count: messages
      key: client
      cost: message
      limit: 2
      window: 3600000
`;

test('a cost: message limit counts every transaction of one session: limit 2, 6 sent, 2 delivered', async () => {
  const d = await startDoorman({ backendPort: sink.port, rules: { 'ratelimit.yaml': MESSAGES_PER_CLIENT } });
  try {
    const c = await SmtpClient.open(d.port, { localAddress: '127.0.0.61', ehlo: 'mta.example.org' });
    const codes: number[] = [];
    const texts: string[] = [];
    for (let i = 0; i < 6; i++) {
      const r = await transaction(c, 'burst@compromised.example', `r${i}@example.com`);
      codes.push(r.code);
      texts.push(r.text);
    }
    c.close();
    assert.deepEqual(codes, [250, 250, 450, 450, 450, 450]);
    assert.equal(texts[2], '4.7.1 Error: too much mail, try again later');
    assert.equal(await delivered('burst@compromised.example', 2), 2, 'exactly two messages reached the backend');
  } finally {
    await d.stop();
  }
});

test('nullSenderMaxRecipients holds for pipelined recipients: limit 1, 4 sent in one write, 1 delivered', async () => {
  const RELAY = `rule: relay
settings:
  localDomains: [example.com]
  relayNetworks: []
  nullSenderMaxRecipients: 1
`;
  const d = await startDoorman({ backendPort: sink.port, rules: { 'relay.yaml': RELAY } });
  try {
    const c = await SmtpClient.open(d.port, { localAddress: '127.0.0.62', ehlo: 'mta.example.org' });
    c.write(
      'MAIL FROM:<>\r\n' +
        'RCPT TO:<bounce1@example.com>\r\n' +
        'RCPT TO:<bounce2@example.com>\r\n' +
        'RCPT TO:<bounce3@example.com>\r\n' +
        'RCPT TO:<bounce4@example.com>\r\n' +
        'DATA\r\n',
    );
    const replies = [];
    for (let i = 0; i < 6; i++) replies.push(await c.reply());
    assert.deepEqual(
      replies.map((r) => r.code),
      [250, 250, 550, 550, 550, 354],
    );
    assert.equal(replies[2]?.text, '5.5.3 <bounce2@example.com>: Too many recipients for the null sender');
    assert.equal((await c.cmd('Subject: pipelined bounce\r\n\r\nbody\r\n.')).code, 250);
    c.close();
    const m = await sink.bySender('');
    assert.deepEqual(
      m.rcpts.map((r) => r.split(' ')[0]),
      ['<bounce1@example.com>'],
      'one recipient reached the backend',
    );
  } finally {
    await d.stop();
  }
});

test('an allowlisted sender holds for its transaction only: after RSET or end of data, greylisting applies again', async () => {
  const ACCESS = `rule: access
settings:
  senders:
    - allow: x@partner.example
`;
  const GREY = `rule: greylist
settings:
  delay: 600000
`;
  const d = await startDoorman({ backendPort: sink.port, rules: { 'access.yaml': ACCESS, 'greylist.yaml': GREY } });
  try {
    const c = await SmtpClient.open(d.port, { localAddress: '127.0.0.63', ehlo: 'mta.example.org' });
    assert.equal((await transaction(c, 'x@partner.example', 'u1@example.com')).code, 250, 'allowlisted: not greylisted');
    // After the end of data, a new transaction from another sender in the same session.
    const after = await transaction(c, 'spam@elsewhere.example', 'u1@example.com');
    assert.equal(after.code, 451);
    assert.equal(after.text, '4.7.1 Greylisted, try again later');
    // The allowlisted sender again, then RSET, then another sender.
    assert.equal((await c.cmd('MAIL FROM:<x@partner.example>')).code, 250);
    assert.equal((await c.cmd('RCPT TO:<u2@example.com>')).code, 250);
    assert.equal((await c.cmd('RSET')).code, 250);
    assert.equal((await c.cmd('MAIL FROM:<spam@elsewhere.example>')).code, 250);
    assert.equal((await c.cmd('RCPT TO:<u2@example.com>')).code, 451, 'RSET ended the allowlisted transaction');
    c.close();
    assert.equal(await delivered('spam@elsewhere.example', 0), 0, 'nothing from the other sender reached the backend');
  } finally {
    await d.stop();
  }
});

test('a concurrency slot taken after the deadline or after the client left is given back: none leaks, the client is let in again', async () => {
  // One session per client; the rule gives up after 300 ms (fail open), Redis answers after
  // 1000 ms (commandTimeout) — but it is paused for 1500 ms, so it takes the slot after both.
  const LIMIT = `rule: ratelimit
action: enforce
timeout: 300
settings:
  limits:
    - name: sessions
      count: concurrency
      key: client
      limit: 1
`;
  const d = await startDoorman({
    backendPort: sink.port,
    env: { DOORMAN_REDIS_URL: redis.url },
    config: 'redis:\n  commandTimeout: 1000\n',
    rules: { 'ratelimit.yaml': LIMIT },
  });
  const key = (ip: string) => `doorman:rl:{ratelimit:sessions:${ip}}`;
  try {
    // The store is reachable: a first session takes its slot and gives it back.
    const warm = await SmtpClient.open(d.port, { localAddress: '127.0.0.64', ehlo: 'mta.example.org' });
    assert.equal(await redisCli('ZCARD', key('127.0.0.64')), '1');
    warm.send('QUIT');
    await warm.waitClosed();
    assert.ok(await eventually(async () => (await redisCli('ZCARD', key('127.0.0.64'))) === '0', 3000));

    assert.equal(await redisCli('CLIENT', 'PAUSE', '1500', 'ALL'), 'OK');
    const paused = Date.now();
    // Leaves while the slot is being taken.
    const gone = await SmtpClient.connect(d.port, { localAddress: '127.0.0.65' });
    // Stays: its session goes on without the slot (the rule failed open) and ends after Redis took it.
    const stays = await SmtpClient.connect(d.port, { localAddress: '127.0.0.66' });
    assert.equal((await gone.reply()).code, 220, 'the rule failed open');
    gone.close();
    assert.equal((await stays.reply()).code, 220, 'the rule failed open');
    await sleep(Math.max(0, 1700 - (Date.now() - paused)));
    assert.equal((await stays.ehlo('mta.example.org')).reply.code, 250);
    stays.send('QUIT');
    await stays.waitClosed();

    for (const ip of ['127.0.0.65', '127.0.0.66']) {
      const n = await eventually(async () => (await redisCli('ZCARD', key(ip))) === '0', 3000);
      assert.ok(n, `no slot left for ${ip}: ZCARD ${await redisCli('ZCARD', key(ip))}`);
      const again = await SmtpClient.greet(d.port, { localAddress: ip });
      const g = again.greeting;
      again.close();
      assert.equal(g.code, 220, `a new session from ${ip} is not refused: ${g.raw}`);
    }
  } finally {
    await d.stop();
  }
});

test('greylisted recipients cost no rate-limit token: after the delay the full budget of 2 messages goes through', async () => {
  const GREY = `rule: greylist
settings:
  delay: 1000
`;
  const d = await startDoorman({
    backendPort: sink.port,
    env: { DOORMAN_REDIS_URL: redis.url },
    rules: { 'greylist.yaml': GREY, 'ratelimit.yaml': MESSAGES_PER_CLIENT },
  });
  try {
    const c = await SmtpClient.open(d.port, { localAddress: '127.0.0.67', ehlo: 'mta.example.org' });
    const grey: number[] = [];
    for (let i = 0; i < 3; i++) grey.push((await transaction(c, 'news@grey.example', 'u@example.com')).code);
    assert.deepEqual(grey, [451, 451, 451], 'greylisted: first attempt and retries too early');
    await sleep(1100);
    const codes: number[] = [];
    for (let i = 0; i < 3; i++) codes.push((await transaction(c, 'news@grey.example', 'u@example.com')).code);
    c.close();
    assert.deepEqual(codes, [250, 250, 450], 'two messages within the limit, the third over it');
    assert.equal(await delivered('news@grey.example', 2), 2);
    // One rate-limit script per recipient checked; a refund only for the three greylisted ones.
    assert.equal(await d.metric('doorman_store_operations_total', { op: 'rate', store: 'redis' }), 6);
    assert.equal(await d.metric('doorman_store_operations_total', { op: 'refund', store: 'redis' }), 3);
  } finally {
    await d.stop();
  }
});

test('a refund gives one token back in the Redis script as in the memory store, never beyond a full bucket', async () => {
  const redisStore = new RedisStore({ url: redis.url, prefix: 'refund-test:', commandTimeout: 2000 });
  try {
    assert.ok(await redisStore.ready(5000));
    for (const store of [redisStore, new MemoryStore()] as Store[]) {
      const allowed = async (cost: number) => (await store.rate('k', 3_600_000, 3, cost)).allowed;
      const burst = async () => {
        const r: boolean[] = [];
        for (let i = 0; i < 4; i++) r.push(await allowed(1));
        return r;
      };
      assert.deepEqual(await burst(), [true, true, true, false], store.kind);
      assert.equal((await store.rate('k', 3_600_000, 3, -1)).remaining, 1, `${store.kind}: one token back`);
      assert.deepEqual([await allowed(1), await allowed(1)], [true, false], `${store.kind}: spent again`);
      for (let i = 0; i < 5; i++) await store.rate('k', 3_600_000, 3, -1);
      assert.equal((await store.inspect('k')).state, null, `${store.kind}: a full bucket is forgotten`);
      assert.deepEqual(await burst(), [true, true, true, false], `${store.kind}: refunds never raise the burst`);
    }
  } finally {
    await redisStore.close();
  }
});

test('failed logins are counted across sessions: past 2, AUTH gets 454 4.7.0 before the backend; logins that succeed cost nothing', async () => {
  const postfix = await startPostfix({ relayPort: sink.port, sasl: { alice: 'wonderland' } });
  const LIMIT = `rule: ratelimit
action: enforce
settings:
  limits:
    - name: auth-failures
      count: auth_failures
      key: client
      limit: 2
      window: 3600000
`;
  const d = await startDoorman({
    backendPort: postfix.port,
    env: { DOORMAN_LISTEN: '' },
    config: 'listen:\n  - address: 127.0.0.1:0\n    role: submission\n    authPlaintext: true\n',
    rules: { 'ratelimit.yaml': LIMIT },
  });
  const port = (d.logs().find((l) => l.msg === 'doorman started')?.listeners as { port: number }[])[0]?.port ?? 0;
  const plain = (password: string) => 'AUTH PLAIN ' + Buffer.from(`\0alice@backend.test\0${password}`).toString('base64');
  const login = async (ip: string, password: string, mail = false): Promise<{ code: number; text: string }> => {
    const c = await SmtpClient.open(port, { localAddress: ip, ehlo: 'mta.example.org' });
    const r = await c.cmd(plain(password));
    if (mail && r.code === 235) assert.equal((await c.cmd('MAIL FROM:<alice@example.org>')).code, 250);
    c.send('QUIT');
    await c.waitClosed();
    return { code: r.code, text: r.text };
  };
  const failedAtBackend = () => postfix.log().split('\n').filter((l) => /\[127\.0\.0\.70\]: SASL PLAIN authentication failed/.test(l)).length;
  try {
    const guesses = [];
    for (const pw of ['guess1', 'guess2', 'guess3', 'wonderland']) guesses.push(await login('127.0.0.70', pw));
    assert.deepEqual(
      guesses.map((g) => g.code),
      [535, 535, 454, 454],
    );
    assert.equal(guesses[2]?.text, '4.7.0 Temporary authentication failure, try again later');
    assert.ok(await eventually(() => failedAtBackend() === 2, 3000), `Postfix saw ${failedAtBackend()} failed logins from 127.0.0.70, expected 2`);
    // Another client logs in successfully three times (the first goes on to MAIL): none counted.
    const ok = [await login('127.0.0.71', 'wonderland', true), await login('127.0.0.71', 'wonderland'), await login('127.0.0.71', 'wonderland')];
    assert.deepEqual(
      ok.map((g) => g.code),
      [235, 235, 235],
    );
    assert.equal((await login('127.0.0.71', 'bad')).code, 535, 'its own failures are still let through up to the limit');
    assert.equal(await d.metric('doorman_ratelimit_exceeded_total', { limit: 'auth-failures' }), 2);
  } finally {
    await d.stop();
    await postfix.stop();
  }
});
