/**
 * DNS lists end to end with a real rbldnsd: clients on different 127.0.0.x addresses (and IPv6
 * clients through a PROXY header) → doorman (dnsbl rule) → a backend. Listed clients are refused
 * with the configured code and text (never the private key in the zone name); weights, threshold
 * and allowlists behave as documented; RHSBL on HELO and sender at RCPT; a zone that answers
 * Spamhaus error codes or outside 127/8 fails its self-test and is disabled; a dead DNS server
 * never blocks mail.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startBlackHole } from '../helpers/dns.js';
import { startFakeBackend, type FakeBackend } from '../helpers/fake-backend.js';
import { startRbldnsd, type Rbldnsd } from '../helpers/rbldnsd.js';
import { SmtpClient } from '../helpers/smtp.js';
import { swaks } from '../helpers/swaks.js';
import { eventually, useCleanup } from '../helpers/procs.js';

useCleanup();
let rbl: Rbldnsd;
let fb: FakeBackend;
let dm: Doorman;
let late: Doorman;

const ZONES = `rule: dnsbl
settings:
  threshold: 1
  allowlistThreshold: -1
  selfTestInterval: 1000
  zones:
    - zone: k3y.bl.test          # a "private key" in the zone name
      displayName: bl.test
      answers: ["127.0.0.[2..11]"]
      weight: 1
      replies:
        "127.0.0.10": "policy listing, see https://bl.test/"
    - zone: half.test
      weight: 0.5
    - zone: half2.test
      weight: 0.5
    - zone: wl.test
      weight: -2
    - zone: six.test
      ipv4: false
      ipv6: true
    - zone: err.test
    - zone: lie.test
`;

const HELO = 'rule: helo\naction: enforce\n';

before(async () => {
  rbl = await startRbldnsd([
    { name: 'k3y.bl.test', type: 'ip4set', lines: [':127.0.0.2:Listed by bl.test', '127.0.0.2', '127.0.0.66', '127.0.0.68', '127.0.0.69 :127.0.0.10:'] },
    { name: 'half.test', type: 'ip4set', lines: [':127.0.0.2:half', '127.0.0.2', '127.0.0.67', '127.0.0.70'] },
    { name: 'half2.test', type: 'ip4set', lines: [':127.0.0.2:half2', '127.0.0.2', '127.0.0.70'] },
    { name: 'wl.test', type: 'ip4set', lines: [':127.0.0.2:allow', '127.0.0.2', '127.0.0.68', '127.0.0.72'] },
    { name: 'six.test', type: 'ip6trie', lines: [':127.0.0.2:v6', '::ffff:7f00:2', '2001:db8::66'] },
    { name: 'err.test', type: 'ip4set', lines: [':127.255.255.254:refused', '127.0.0.0/8'] },
    { name: 'lie.test', type: 'ip4set', lines: [':10.0.0.2:lying', '127.0.0.0/8'] },
    { name: 'dbl.test', type: 'dnset', lines: [':127.0.1.2:domain listed', 'test', 'bad-helo.example', 'bad-sender.example', '.bad-sender.example'] },
  ]);
  fb = await startFakeBackend('none');
  dm = await startDoorman({
    backendPort: fb.port,
    listen: 'smtp://127.0.0.1:{PORT},smtp+proxy://127.0.0.1:{PORT}',
    env: { DOORMAN_DNS_SERVERS: rbl.server, DOORMAN_TRUSTED_PROXIES: '127.0.0.1' },
    rules: { 'dnsbl.yaml': ZONES, 'helo.yaml': HELO },
  });
  late = await startDoorman({
    backendPort: fb.port,
    env: { DOORMAN_DNS_SERVERS: rbl.server },
    rules: {
      'rhsbl.yaml': `rule: dnsbl
settings:
  stage: rcpt
  reply: "554 5.7.1 Service unavailable; {zone} lists you{text}"
  zones:
    - zone: dbl.test
      type: helo
      answers: [127.0.1.2]
    - zone: dbl.test
      type: sender
      answers: [127.0.1.2]
      replies:
        "127.0.1.2": "sender domain listed"
`,
    },
  });
});
after(async () => {
  await dm?.stop();
  await late?.stop();
  await fb?.close();
  await rbl?.stop();
});

test('a listed client is refused at connect with the code and text; the key stays hidden', async () => {
  const c = await SmtpClient.greet(dm.port, { localAddress: '127.0.0.66' });
  assert.equal(c.greeting.code, 554);
  assert.equal(c.greeting.text, '5.7.1 Service unavailable; client [127.0.0.66] blocked using bl.test');
  assert.doesNotMatch(c.greeting.raw, /k3y/);
  c.close();
  const p = await SmtpClient.greet(dm.port, { localAddress: '127.0.0.69' });
  assert.equal(p.greeting.text, '5.7.1 Service unavailable; client [127.0.0.69] blocked using bl.test; policy listing, see https://bl.test/', 'text per return code');
  p.close();
  const log = await eventually(() => dm.sessions().find((s) => s.client === '127.0.0.66'));
  assert.match(JSON.stringify(log?.rules), /"rule":"dnsbl".*bl\.test=127\.0\.0\.2/);
  assert.equal(fb.commands.length, 0, 'refused clients cost the backend nothing');
});

test('an unlisted client passes and its mail is delivered (swaks)', async () => {
  const r = await swaks(['--server', `127.0.0.1:${dm.port}`, '--local-interface', '127.0.0.65', '--from', 'clean@example.org', '--to', 'b@example.com', '--helo', 'clean.example.org']);
  assert.equal(r.status, 0, r.out);
  assert.ok(fb.messages.some((m) => m.includes('From: clean@example.org')));
});

test('weights add up to the threshold: 0.5 passes, 0.5 + 0.5 is refused', async () => {
  const one = await SmtpClient.greet(dm.port, { localAddress: '127.0.0.67' });
  assert.equal(one.greeting.code, 220);
  one.close();
  const two = await SmtpClient.greet(dm.port, { localAddress: '127.0.0.70' });
  assert.equal(two.greeting.code, 554);
  two.close();
});

test('an allowlist (negative weight) outweighs a listing and allowlists the session', async () => {
  const c = await SmtpClient.greet(dm.port, { localAddress: '127.0.0.68' });
  assert.equal(c.greeting.code, 220, 'score 1 − 2 = −1 < threshold');
  // allowlistThreshold −1: the session skips bypassable rules, here the enforced helo check.
  assert.equal((await c.cmd('EHLO localhost')).code, 250);
  c.close();
  const other = await SmtpClient.open(dm.port, { localAddress: '127.0.0.65', ehlo: false });
  assert.equal((await other.cmd('EHLO localhost')).code, 504, 'not allowlisted: helo enforced');
  other.close();
});

test('IPv6 clients are queried with 32 reversed nibbles', async () => {
  const c = await SmtpClient.greet(dm.ports[1]!, { proxy: 'TCP6 2001:db8::66 2001:db8::25 40000 25' });
  assert.equal(c.greeting.code, 554);
  assert.match(c.greeting.text, /client \[2001:db8::66\] blocked using six\.test/);
  c.close();
  const ok = await SmtpClient.greet(dm.ports[1]!, { proxy: 'TCP6 2001:db8::67 2001:db8::25 40000 25' });
  assert.equal(ok.greeting.code, 220);
  ok.close();
});

test('zones answering 127.255.255.x or outside 127/8 fail the self-test and are disabled', async () => {
  await eventually(async () => (await dm.metric('doorman_dnsbl_zone_up', { zone: 'err.test' })) === 0 && (await dm.metric('doorman_dnsbl_zone_up', { zone: 'lie.test' })) === 0, 5000);
  assert.equal(await dm.metric('doorman_dnsbl_zone_up', { zone: 'err.test' }), 0);
  assert.equal(await dm.metric('doorman_dnsbl_zone_up', { zone: 'lie.test' }), 0);
  assert.equal(await dm.metric('doorman_dnsbl_zone_up', { zone: 'bl.test' }), 1);
  assert.equal(await dm.metric('doorman_dnsbl_zone_up', { zone: 'six.test' }), 1, 'IPv6 self-test ::FFFF:7F00:2 passes');
  const lines = dm.logs().filter((l) => l.msg.startsWith('DNS list zone failed its self-test'));
  assert.ok(lines.some((l) => l.zone === 'err.test' && /127\.255\.255\.254/.test(String(l.why))));
  assert.ok(lines.some((l) => l.zone === 'lie.test' && /outside 127/.test(String(l.why))));
  assert.equal(lines.filter((l) => l.zone === 'err.test').length, 1, 'one log line per state change');
  // 127.0.0.71 is "listed" only by the broken zones: not refused.
  const c = await SmtpClient.greet(dm.port, { localAddress: '127.0.0.71' });
  assert.equal(c.greeting.code, 220);
  c.close();
  assert.ok((await dm.metric('doorman_dnsbl_queries_total', { zone: 'err.test', result: 'disabled' })) >= 1);
});

test('metrics: queries by zone and result, durations, shared lookups', async () => {
  for (let i = 0; i < 2; i++) (await SmtpClient.greet(dm.port, { localAddress: '127.0.0.65' })).close();
  assert.ok((await dm.metric('doorman_dnsbl_queries_total', { zone: 'bl.test', result: 'listed' })) >= 2);
  assert.ok((await dm.metric('doorman_dnsbl_queries_total', { zone: 'bl.test', result: 'clean' })) >= 2);
  assert.ok((await dm.metric('doorman_dnsbl_query_duration_seconds_count', { zone: 'bl.test' })) >= 4);
  assert.ok((await dm.metric('doorman_dns_cache_hits_total')) >= 1, 'the second session from one address reused the answer');
  assert.ok((await dm.metric('doorman_rejections_total', { rule: 'dnsbl', stage: 'connect', code: '554' })) >= 3);
});

test('RHSBL on HELO and sender, applied at RCPT so the log shows the envelope', async () => {
  const c = await SmtpClient.open(late.port, { localAddress: '127.0.0.65', ehlo: 'bad-helo.example' });
  assert.equal((await c.cmd('MAIL FROM:<a@example.org>')).code, 250);
  const r = await c.cmd('RCPT TO:<b@example.com>');
  assert.equal(r.code, 554);
  assert.equal(r.text, '5.7.1 Service unavailable; dbl.test lists you');
  c.close();
  const s = await SmtpClient.open(late.port, { localAddress: '127.0.0.65', ehlo: 'good.example.org' });
  assert.equal((await s.cmd('MAIL FROM:<x@mail.bad-sender.example>')).code, 250);
  const rs = await s.cmd('RCPT TO:<b@example.com>');
  assert.equal(rs.code, 554);
  assert.equal(rs.text, '5.7.1 Service unavailable; dbl.test lists you; sender domain listed');
  assert.equal((await s.cmd('RSET')).code, 250);
  assert.equal((await s.cmd('MAIL FROM:<x@fine.example>')).code, 250);
  assert.equal((await s.cmd('RCPT TO:<b@example.com>')).code, 250, 'the next transaction is judged on its own sender');
  s.close();
  const log = await eventually(() => late.sessions().find((x) => (x.transactions as { from: string }[]).some((t) => t.from === 'a@example.org')));
  assert.deepEqual((log?.transactions as { rcpts: unknown[] }[])[0]?.rcpts, [{ to: 'b@example.com', code: 554 }]);
});

test('a DNS server that never answers never blocks mail; onError tempfail gives 4xx', async () => {
  const hole = await startBlackHole();
  const rules = (onError: string) => `rule: dnsbl\nsettings:\n  zones:\n    - zone: bl.test\n      timeout: 300\n      onError: ${onError}\n`;
  const open = await startDoorman({ backendPort: fb.port, env: { DOORMAN_DNS_SERVERS: hole.server }, rules: { 'd.yaml': rules('pass') } });
  const strict = await startDoorman({ backendPort: fb.port, env: { DOORMAN_DNS_SERVERS: hole.server }, rules: { 'd.yaml': rules('tempfail') } });
  try {
    const t0 = Date.now();
    const c = await SmtpClient.greet(open.port, { localAddress: '127.0.0.66', timeout: 5000 });
    assert.equal(c.greeting.code, 220, 'a timeout is not a listing');
    assert.ok(Date.now() - t0 < 3000, 'the per-zone timeout holds');
    c.close();
    const s = await SmtpClient.greet(strict.port, { localAddress: '127.0.0.66', timeout: 5000 });
    const r = s.greeting;
    assert.equal(r.code, 421);
    assert.match(r.text, /^4\.7\.1 /);
    s.close();
    assert.ok((await open.metric('doorman_dnsbl_queries_total', { zone: 'bl.test', result: 'timeout' })) >= 1);
  } finally {
    await open.stop();
    await strict.stop();
    await hole.stop();
  }
});
