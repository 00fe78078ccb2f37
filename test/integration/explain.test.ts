/**
 * `doorman explain` end to end: the built CLI against a real rbldnsd (the configured resolver), a
 * real redis-server (the configured store) and the rule files of a running doorman. A listed
 * address is refused at connect by the dnsbl rule (its reply shown, exit 1); a clean one passes
 * every rule (exit 0); a rate limit one message from its end is reported — its refusal of the
 * second recipient included — without being consumed: a real session through the running doorman
 * is still accepted afterwards, and the one after it refused; bad input names its option (exit 3).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ROOT, startDoorman, type Doorman } from '../helpers/doorman.js';
import { startFakeBackend, type FakeBackend } from '../helpers/fake-backend.js';
import { startRbldnsd, type Rbldnsd } from '../helpers/rbldnsd.js';
import { startRedis, type RedisServer } from '../helpers/redis.js';
import { SmtpClient } from '../helpers/smtp.js';
import { useCleanup } from '../helpers/procs.js';

useCleanup();
const BIN = path.join(ROOT, 'bin', 'doorman.js');

let rbl: Rbldnsd;
let redis: RedisServer;
let fb: FakeBackend;
let dm: Doorman;
let env: Record<string, string>;

const RULES = {
  'site.yaml': 'localDomains: [example.com]\nrelayNetworks: []\n',
  'dnsbl.yaml': `rule: dnsbl
settings:
  threshold: 1
  zones:
    - zone: bl.test
      weight: 1
`,
  'helo.yaml': 'rule: helo\naction: enforce\n',
  'ratelimit.yaml': `rule: ratelimit
settings:
  limits:
    - name: client-rcpts
      count: messages
      key: client
      cost: recipient
      limit: 2
      window: 3600000
`,
  'relay.yaml': 'rule: relay\n',
};

before(async () => {
  rbl = await startRbldnsd([{ name: 'bl.test', type: 'ip4set', lines: [':127.0.0.2:Listed by bl.test', '127.0.0.2', '127.0.0.66'] }]);
  redis = await startRedis();
  fb = await startFakeBackend('none');
  dm = await startDoorman({ backendPort: fb.port, env: { DOORMAN_REDIS_URL: redis.url, DOORMAN_DNS_SERVERS: rbl.server }, rules: RULES });
  // The running instance's configuration, as an operator's shell has it.
  env = {
    PATH: process.env.PATH ?? '',
    DOORMAN_LISTEN: `smtp://127.0.0.1:${dm.port}`,
    DOORMAN_HOSTNAME: 'mx.doorman.test',
    DOORMAN_RULES: dm.rulesDir,
    DOORMAN_REDIS_URL: redis.url,
    DOORMAN_DNS_SERVERS: rbl.server,
  };
});

after(async () => {
  await dm?.stop();
  await fb?.close();
  await redis?.stop();
  await rbl?.stop();
});

function explain(args: string[]): Promise<{ code: number; out: string; err: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [BIN, 'explain', ...args], { env, cwd: os.tmpdir(), timeout: 30_000 }, (e, stdout, stderr) => {
      resolve({ code: e ? (typeof e.code === 'number' ? e.code : -1) : 0, out: stdout, err: stderr });
    });
  });
}

test('doorman --help lists explain and its options', async () => {
  const out = await new Promise<string>((resolve, reject) => execFile(process.execPath, [BIN, '--help'], { env, timeout: 30_000 }, (e, stdout) => (e ? reject(e) : resolve(stdout))));
  assert.match(out, /doorman explain --ip IP \[--helo NAME\] \[--from ADDR\] \[--rcpt ADDR\]… \[--listener NAME\|ROLE\]/);
  for (const opt of ['--login', '--tls', '--message FILE.eml', '--json']) assert.ok(out.includes(opt), opt);
});

test('a DNSBL-listed address: the dnsbl rule refuses at connect, its reply is shown, exit 1', async () => {
  const r = await explain(['--ip', '127.0.0.66', '--helo', 'mx.example.net', '--from', 'a@example.net', '--rcpt', 'b@example.com']);
  assert.equal(r.code, 1, r.out + r.err);
  assert.match(r.out, /^connect\n {2}dnsbl +reject +action enforce +effect reject +reason: .*bl\.test.*reply: 554 5\.7\.1 /m);
  assert.match(r.out, /→ decided by dnsbl: 554 5\.7\.1 /);
  // The conversation: the refusal instead of the greeting, then only QUIT.
  const conv = r.out.slice(r.out.indexOf('Conversation'));
  assert.match(conv, /\n {2}S: 554 5\.7\.1 .*\n {2}C: QUIT\n {2}S: 221 2\.0\.0 mx\.doorman\.test closing connection\n/);
  assert.doesNotMatch(r.out, /^(helo|mail|rcpt)/m, 'nothing after connect is evaluated');
  assert.match(r.out, /Result: refused \(exit 1\)/);

  const j = await explain(['--ip', '127.0.0.66', '--json']);
  assert.equal(j.code, 1);
  const report = JSON.parse(j.out) as { result: string; refusedAt: string; exit: number; stages: { stage: string; decidedBy: string; reply: { code: number } }[] };
  assert.deepEqual([report.result, report.refusedAt, report.exit], ['refused', 'connect', 1]);
  assert.deepEqual([report.stages[0]?.stage, report.stages[0]?.decidedBy, report.stages[0]?.reply.code], ['connect', 'dnsbl', 554]);
});

test('a clean address: exit 0, and every rule passes at each stage it acts on', async () => {
  const r = await explain(['--ip', '127.0.0.41', '--helo', 'mx.example.net', '--from', 'a@example.net', '--rcpt', 'b@example.com', '--json']);
  assert.equal(r.code, 0, r.out + r.err);
  const report = JSON.parse(r.out) as { result: string; stages: { stage: string; outcomes: { rule: string; finding: string }[]; skipped: unknown[] }[] };
  assert.equal(report.result, 'accepted');
  const seen = report.stages.flatMap((s) => s.outcomes.map((o) => `${s.stage} ${o.rule} ${o.finding}`));
  for (const want of ['connect dnsbl pass', 'helo helo pass', 'mail relay pass', 'rcpt relay pass', 'rcpt ratelimit pass']) assert.ok(seen.includes(want), `${want} in ${seen.join(', ')}`);
  assert.ok(seen.every((x) => x.endsWith(' pass')), seen.join(', '));
  assert.ok(report.stages.every((s) => s.skipped.length === 0));

  const human = await explain(['--ip', '127.0.0.41', '--helo', 'mx.example.net', '--from', 'a@example.net', '--rcpt', 'b@example.com']);
  assert.equal(human.code, 0);
  for (const rule of ['dnsbl', 'helo', 'relay', 'ratelimit']) assert.match(human.out, new RegExp(`^ {2}${rule} +pass +action enforce +effect none$`, 'm'));
  assert.match(human.out, /Conversation \(as the client would see it\):\n {2}S: 220 mx\.doorman\.test ESMTP\n {2}C: EHLO mx\.example\.net\n/);
  assert.match(human.out, /C: RCPT TO:<b@example\.com>\n {2}S: 250 2\.1\.5 Ok {4}\(the backend's answer, assumed\)/);
  assert.match(human.out, /Result: accepted \(exit 0\)/);
});

test('a rate limit one message from its end: reported, not consumed — the next real session is still accepted', async () => {
  const ip = '127.0.0.42';
  // A real session takes the first of the two recipients per hour.
  const c = await SmtpClient.open(dm.port, { localAddress: ip, ehlo: 'mx.example.net' });
  assert.equal((await c.message({ from: 'a@example.net', to: 'b@example.com', body: 'Subject: one\r\n\r\nhi\r\n' })).code, 250);
  await c.cmd('QUIT');
  c.close();
  // explain, three times: each sees one token left; its second recipient is over the limit.
  for (let i = 0; i < 3; i++) {
    const r = await explain(['--ip', ip, '--helo', 'mx.example.net', '--from', 'a@example.net', '--rcpt', 'b@example.com', '--rcpt', 'c@example.com']);
    assert.equal(r.code, 2, r.out + r.err);
    assert.match(r.out, /^rcpt TO:<b@example\.com>\n(?: {2}.*\n)*? {2}ratelimit +pass +action enforce +effect none\n/m);
    assert.match(r.out, /^rcpt TO:<c@example\.com>\n(?: {2}.*\n)*? {2}ratelimit +tempfail +action enforce +effect tempfail +reason: client-rcpts exceeded +reply: 450 4\.7\.1 Error: too much mail, try again later\n/m);
    assert.match(r.out, /C: RCPT TO:<c@example\.com>\n {2}S: 450 4\.7\.1 Error: too much mail, try again later\n/);
    assert.match(r.out, /Result: tempfailed \(exit 2\)/);
  }
  // Had explain counted even once, the limit would be spent: the real session is still accepted.
  const d = await SmtpClient.open(dm.port, { localAddress: ip, ehlo: 'mx.example.net' });
  assert.equal((await d.message({ from: 'a@example.net', to: 'b@example.com', body: 'Subject: two\r\n\r\nhi\r\n' })).code, 250);
  // And the limit is real: the next recipient is refused.
  const t = await d.transaction({ from: 'a@example.net', to: 'c@example.com' });
  assert.equal(t.last.code, 450, t.last.raw);
  await d.cmd('QUIT');
  d.close();
  assert.equal(fb.messages.length >= 2, true);
});

test('bad input: exit 3 and a message naming the option', async () => {
  const cases: [string[], RegExp][] = [
    [['--ip', '300.1.2.3'], /^doorman explain: --ip: not an IP address/],
    [['--ip', '127.0.0.41', '--listener', 'nope'], /^doorman explain: --listener: no listener named "nope".*the configured listeners are smtp@127\.0\.0\.1:\d+ \(smtp\)/],
    [['--ip', '127.0.0.41', '--from', 'a b@example.net'], /^doorman explain: --from: "a b@example\.net" does not parse/],
    [['--ip', '127.0.0.41', '--from', 'a@example.net', '--rcpt', 'b@'], /^doorman explain: --rcpt: "b@" does not parse/],
    [['--ip', '127.0.0.41', '--from', 'a@example.net', '--rcpt', 'b@example.com', '--message', '/nonexistent/m.eml'], /^doorman explain: --message: cannot read \/nonexistent\/m\.eml: ENOENT/],
    [['--helo', 'x'], /^doorman explain: --ip: the client address is required/],
    [['--ip', '127.0.0.41', '--bogus'], /^doorman explain: --bogus: unknown option/],
  ];
  for (const [args, want] of cases) {
    const r = await explain(args);
    assert.equal(r.code, 3, `${args.join(' ')}: ${r.out}${r.err}`);
    assert.match(r.err, want);
    assert.equal(r.out, '');
  }
});

test('--message: the header and end-of-data rules see the file (LF line ends made CRLF)', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-explain-'));
  const file = path.join(dir, 'm.eml');
  fs.writeFileSync(file, 'Subject: hi\nFrom: a@example.net\n\nbody\n');
  try {
    const r = await explain(['--ip', '127.0.0.43', '--helo', 'mx.example.net', '--from', 'a@example.net', '--rcpt', 'b@example.com', '--message', file, '--json']);
    assert.equal(r.code, 0, r.out + r.err);
    const report = JSON.parse(r.out) as { conversation: { client?: string; server: string }[]; transactions: { data: { evaluated: string } }[] };
    assert.equal(report.transactions[0]?.data.evaluated, 'message');
    const size = Buffer.byteLength('Subject: hi\r\nFrom: a@example.net\r\n\r\nbody\r\n');
    assert.deepEqual(report.conversation.at(-2), { client: `(the message, ${size} bytes) .`, server: '250 2.0.0 Ok: queued', assumed: true });
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
