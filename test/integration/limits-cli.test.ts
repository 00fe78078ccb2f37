/**
 * `doorman limits show|reset` as an operator uses it, after real SMTP sessions through a running
 * doorman (smtp-sink behind it): a rate limit's used / remaining / next allowed / expiry, a
 * greylist triplet unknown → waiting → passed, in human lines and as JSON — with a real
 * redis-server, and with the in-memory store, where the command asks the running instance on its
 * metrics listener (one process, and the primary of two workers). No instance: a clear error.
 * The instance's /limits/ answers only requests that could come from this machine's operator.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { ROOT, startDoorman, type Doorman } from '../helpers/doorman.js';
import { freePort } from '../helpers/net.js';
import { startRedis, type RedisServer } from '../helpers/redis.js';
import { startSink, type Sink } from '../helpers/sink.js';
import { SmtpClient } from '../helpers/smtp.js';
import { sleep, trackCloser, useCleanup } from '../helpers/procs.js';

useCleanup();
const run = promisify(execFile);
const BIN = path.join(ROOT, 'bin', 'doorman.js');

const RULES = {
  'ratelimit.yaml': `rule: ratelimit
settings:
  limits:
    - name: sender-msgs
      count: messages
      key: sender
      limit: 3
      window: 600000
`,
  'greylist.yaml': `rule: greylist
settings:
  delay: 2000
  retryWindow: 60000
  allowSenderDomains: [rate.example]
`,
};

let redis: RedisServer;
let sink: Sink;
before(async () => {
  redis = await startRedis();
  sink = await startSink();
});
after(async () => {
  await sink?.stop();
  await redis?.stop();
});

/** Runs `doorman limits …`; resolves with stdout, or rejects with the process's error (code, stderr). */
async function limits(env: Record<string, string>, ...args: string[]): Promise<string> {
  const { stdout } = await run(process.execPath, [BIN, 'limits', ...args], { env: { PATH: process.env.PATH ?? '', ...env } });
  return stdout;
}

interface Shown {
  key: string;
  store: string;
  view: Record<string, number | string | null>;
}
async function showJson(env: Record<string, string>, ...args: string[]): Promise<Shown> {
  return JSON.parse(await limits(env, 'show', ...args, '--json')) as Shown;
}

/** One session, one message: the reply to RCPT (or to the end of data when it got that far). */
async function send(d: Doorman, ip: string, from: string): Promise<number> {
  const c = await SmtpClient.open(d.port, { localAddress: ip, ehlo: 'mta.client.example' });
  try {
    const t = await c.transaction({ from, to: 'user@example.com', body: `Subject: limits\r\n\r\nfrom ${from}\r\n` });
    return t.last.code;
  } finally {
    c.close();
  }
}

/** The whole operator story against one running doorman and the CLI environment that reaches its state. */
async function story(d: Doorman, env: Record<string, string>, ip: string, store: RegExp): Promise<void> {
  const sender = `bulk-${ip}@rate.example`;
  const rate = ['ratelimit', 'sender-msgs', sender];
  // Nothing counted yet.
  const fresh = await limits(env, 'show', ...rate);
  assert.match(fresh, /^ {2}used: +0$/m, fresh);
  assert.match(fresh, /^ {2}key expires: +no key stored/m, fresh);

  // The first message's time bounds every time shown: the bucket's TAT is that time + 200 s per
  // token (GCRA, 3 per 10 min: a token comes back long after the slowest run of this test, each
  // run of the command taking seconds on a loaded machine).
  const t1 = Date.now();
  assert.equal(await send(d, ip, sender), 250);
  const t1end = Date.now();
  assert.equal(await send(d, ip, sender), 250);
  const near = (at: number, from: number, to: number, what: string) => assert.ok(at >= from - 50 && at <= to + 50, `${what}: ${at - from} ms after the first message's start (up to ${to - from})`);
  const shownAt = (text: string, label: string) => Date.parse(new RegExp(`^ {2}${label}: +in [^,]+, at (\\S+Z)`, 'm').exec(text)?.[1] ?? '');
  // The human lines and the JSON asked together (each run of the command takes seconds here).
  const [two, j2] = await Promise.all([limits(env, 'show', ...rate), showJson(env, ...rate)]);
  assert.match(two, new RegExp(`^ratelimit sender-msgs: messages per sender ${sender.replace(/\./g, '\\.')}$`, 'm'), two);
  assert.match(two, store, two);
  assert.match(two, /^ {2}limit: +3 per 10 min$/m, two);
  assert.match(two, /^ {2}used: +2$/m, two);
  assert.match(two, /^ {2}remaining: +1$/m, two);
  assert.match(two, /^ {2}next allowed: +now$/m, two);
  assert.match(two, /^ {2}key expires: +in (\d min )?\d+ s, at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(the bucket is full again then\)$/m, two);
  assert.equal(j2.key, `rl:{ratelimit:sender-msgs:${sender}}`);
  assert.deepEqual([j2.view.kind, j2.view.limit, j2.view.windowMs, j2.view.used, j2.view.remaining, j2.view.nextAllowedInMs], ['rate', 3, 600_000, 2, 1, 0]);
  assert.ok(Math.abs(Number(j2.view.now) - Date.now()) < 10_000, 'times on the store clock, ms since the epoch');
  // Two tokens of 200 s: the key expires (the bucket is full again) 400 s after the first message.
  near(Number(j2.view.expiresAt), t1 + 400_000, t1end + 400_000, 'expiry');
  near(shownAt(two, 'key expires'), t1 + 399_000, t1end + 400_000, 'the human expiry time');

  assert.equal(await send(d, ip, sender), 250, 'the third message of three');
  const [three, j3] = await Promise.all([limits(env, 'show', ...rate), showJson(env, ...rate)]);
  assert.match(three, /^ {2}used: +3$/m, three);
  assert.match(three, /^ {2}remaining: +0$/m, three);
  assert.match(three, /^ {2}next allowed: +in (\d min )?\d+ s, at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/m, three);
  assert.deepEqual([j3.view.used, j3.view.remaining], [3, 0]);
  // One token back 200 s after the first message.
  near(Number(j3.view.nextAllowedAt), t1 + 200_000, t1end + 200_000, 'next allowed');
  assert.equal(Number(j3.view.nextAllowedAt), Number(j3.view.now) + Number(j3.view.nextAllowedInMs));
  near(shownAt(three, 'next allowed'), t1 + 199_000, t1end + 200_000, 'the human next-allowed time');
  assert.equal(await send(d, ip, sender), 450, 'what the command says: the fourth is refused now');
  assert.equal((await showJson(env, ...rate)).view.used, 3, 'a refused message costs nothing');

  // Greylisting: unknown, then waiting after the first attempt, then passed after the delay.
  const grey = ['greylist', ip, `news@${ip}.grey.example`, 'user@example.com'];
  assert.match(await limits(env, 'show', ...grey), /^ {2}state: +unknown: a first attempt is greylisted for 2 s$/m);
  assert.equal(await send(d, ip, `news@${ip}.grey.example`), 451);
  const waiting = await limits(env, 'show', ...grey);
  assert.match(waiting, /^greylist triplet 127\.0\.0\.0\/24 news@/m, waiting);
  assert.match(waiting, /^ {2}state: +waiting: first seen \S+Z; a retry passes (from \S+Z \(in [12] s\)|now)$/m, waiting);
  assert.match(waiting, /^ {2}forgotten: +in \d+ s, at \S+Z unless retried$/m, waiting);
  const jw = await showJson(env, ...grey);
  // Redis's TIME and its PTTL round the millisecond each their own way: ±2 ms.
  assert.ok(Math.abs(Number(jw.view.expiresAt) - Number(jw.view.firstSeenAt) - 62_000) <= 2, 'forgotten after delay + retry window');
  assert.equal(jw.view.state, 'waiting');
  assert.equal(Number(jw.view.passesAt) - Number(jw.view.firstSeenAt), 2000);
  await sleep(Math.max(0, Number(jw.view.passesAt) - Number(jw.view.now)) + 300);
  assert.equal(await send(d, ip, `news@${ip}.grey.example`), 250, 'the retry after the delay passes');
  const passed = await limits(env, 'show', ...grey);
  assert.match(passed, /^ {2}state: +passed: let through$/m, passed);
  assert.match(passed, /^ {2}known until: +in 35 days, at \S+Z \(refreshed by each use\)$/m, passed);
  const jp = await showJson(env, ...grey);
  assert.equal(jp.view.state, 'passed');
  assert.ok(Number(jp.view.expiresAt) - Number(jp.view.now) > 3_023_000_000, 'passLifetime, 35 days');

  // Reset: the bucket is gone, the sender may send again.
  assert.match(await limits(env, 'reset', ...rate), /^reset: ratelimit sender-msgs: messages per sender bulk-/);
  assert.deepEqual((await showJson(env, ...rate)).view.used, 0);
  assert.match(await limits(env, 'reset', ...rate), /^nothing to reset: /);
  assert.equal(await send(d, ip, sender), 250);
}

test('with Redis: used, remaining, next allowed and expiry of a rate limit; a greylist triplet waiting then passed', async () => {
  const d = await startDoorman({ backendPort: sink.port, rules: RULES, env: { DOORMAN_REDIS_URL: redis.url } });
  try {
    const env = { DOORMAN_REDIS_URL: redis.url, DOORMAN_RULES: d.rulesDir };
    await story(d, env, '127.0.0.61', /^ {2}store: +redis, at \S+Z$/m);
  } finally {
    await d.stop();
  }
});

test('in memory: the command asks the running instance on its metrics listener, and says when none answers', async () => {
  const d = await startDoorman({ backendPort: sink.port, rules: RULES });
  try {
    const env = { DOORMAN_RULES: d.rulesDir, DOORMAN_METRICS_LISTEN: `127.0.0.1:${d.metricsPort}` };
    await story(d, env, '127.0.0.62', new RegExp(`^ {2}store: +the running instance at 127\\.0\\.0\\.1:${d.metricsPort}, at \\S+Z$`, 'm'));
  } finally {
    await d.stop();
  }
  // No instance: exit 1, a message that says so, nothing on stdout.
  const port = await freePort();
  const rulesDir = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-limits-rules-'));
  trackCloser(async () => fs.rmSync(rulesDir, { recursive: true, force: true }));
  for (const [name, text] of Object.entries(RULES)) fs.writeFileSync(path.join(rulesDir, name), text);
  const err = (await limits({ DOORMAN_RULES: rulesDir, DOORMAN_METRICS_LISTEN: `127.0.0.1:${port}` }, 'show', 'ratelimit', 'sender-msgs', 'a@rate.example').then(
    () => assert.fail('no instance, yet an answer'),
    (e: unknown) => e,
  )) as { code: number; stdout: string; stderr: string };
  assert.equal(err.code, 1);
  assert.equal(err.stdout, '');
  assert.equal(err.stderr, `doorman: DMN_ERR_STATE: cannot reach the limit state: no running doorman answered at http://127.0.0.1:${port} (metrics.listen): connect ECONNREFUSED 127.0.0.1:${port}\n`);
  const off = (await limits({ DOORMAN_RULES: rulesDir, DOORMAN_METRICS_LISTEN: 'off' }, 'show', 'ratelimit', 'sender-msgs', 'a@rate.example').catch((e: unknown) => e)) as { code: number; stderr: string };
  assert.equal(off.code, 1);
  assert.match(off.stderr, /metrics\.listen is off/);
});

test('in memory with two workers: the primary, which holds the state, answers', async () => {
  const d = await startDoorman({ backendPort: sink.port, rules: RULES, env: { DOORMAN_WORKERS: '2' } });
  try {
    const env = { DOORMAN_RULES: d.rulesDir, DOORMAN_METRICS_LISTEN: `127.0.0.1:${d.metricsPort}` };
    for (let i = 0; i < 3; i++) assert.equal(await send(d, '127.0.0.63', 'w@rate.example'), 250);
    const j = await showJson(env, 'ratelimit', 'sender-msgs', 'w@rate.example');
    assert.deepEqual([j.view.used, j.view.remaining], [3, 0], 'every worker charged the one bucket the primary answers from');
    assert.ok(Number(j.view.nextAllowedInMs) > 10_000);
    assert.match(await limits(env, 'reset', 'ratelimit', 'sender-msgs', 'w@rate.example'), /^reset: /);
    assert.equal(await send(d, '127.0.0.63', 'w@rate.example'), 250, 'reset through the primary');
  } finally {
    await d.stop();
  }
});

/** A raw request to the instance's /limits/, with the headers a test chooses. */
function raw(port: number, method: string, urlPath: string, headers: Record<string, string>): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path: urlPath, headers }, (res) => {
      let body = '';
      res.on('data', (c: Buffer) => (body += c.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

test('/limits/ refuses what an operator on this machine would not send: a named Host, a reset without its header, other keys', async () => {
  const d = await startDoorman({ backendPort: sink.port, rules: RULES });
  try {
    assert.equal(await send(d, '127.0.0.64', 'h@rate.example'), 250);
    const key = encodeURIComponent('rl:{ratelimit:sender-msgs:h@rate.example}');
    const ok = await raw(d.metricsPort, 'GET', `/limits/state?key=${key}`, { host: `127.0.0.1:${d.metricsPort}` });
    assert.equal(ok.status, 200);
    assert.equal((JSON.parse(ok.body) as { state: { type: string } }).state.type, 'bucket');
    const rebound = await raw(d.metricsPort, 'GET', `/limits/state?key=${key}`, { host: `attacker.example:${d.metricsPort}` });
    assert.deepEqual([rebound.status, rebound.body], [403, '{"error":"limits are answered to clients on this machine only"}\n'], 'DNS rebinding: a page whose name now points here');
    const formPost = await raw(d.metricsPort, 'POST', `/limits/reset?key=${key}`, { host: 'localhost' });
    assert.equal(formPost.status, 405, 'a reset without X-Doorman-Limits (a cross-origin form post)');
    const other = await raw(d.metricsPort, 'GET', `/limits/state?key=${encodeURIComponent('session:x')}`, { host: 'localhost' });
    assert.equal(other.status, 400, 'only limit keys');
    assert.equal((await showJson({ DOORMAN_RULES: d.rulesDir, DOORMAN_METRICS_LISTEN: `127.0.0.1:${d.metricsPort}` }, 'ratelimit', 'sender-msgs', 'h@rate.example')).view.used, 1, 'nothing was reset');
  } finally {
    await d.stop();
  }
});
