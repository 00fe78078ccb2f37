/**
 * SPF end to end: swaks and raw clients on different 127.0.0.x addresses → doorman (spf rule,
 * resolver pointed at a real dnsmasq serving the TXT records) → smtp-sink. fail → 550 5.7.23,
 * softfail → tagged, permerror → 550 5.7.24 when configured, temperror (a DNS server that never
 * answers) → 451 4.7.24, HELO identity, the real client after PROXY protocol, allowlisting.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startBlackHole, startDnsmasq, type Dnsmasq } from '../helpers/dns.js';
import { startFakeBackend, type FakeBackend } from '../helpers/fake-backend.js';
import { SmtpClient } from '../helpers/smtp.js';
import { swaks } from '../helpers/swaks.js';
import { eventually, useCleanup } from '../helpers/procs.js';

useCleanup();
let dns: Dnsmasq;
let fb: FakeBackend;
let dm: Doorman;

const SPF = `rule: spf
timeout: 5000
settings:
  results:
    fail: reject
    softfail: tag
    permerror: reject
    temperror: tempfail
  checkHelo: true
  skipNetworks: [127.0.0.1/32]
`;

before(async () => {
  dns = await startDnsmasq({
    txt: [
      ['strict.test', 'v=spf1 ip4:127.0.0.40 -all'],
      ['soft.test', 'v=spf1 ip4:127.0.0.40 ~all'],
      ['broken.test', 'v=spf1 ip4:127.0.0.40 foo:bar -all'],
      ['inc.test', 'v=spf1 include:strict.test -all'],
      ['mx.test', 'v=spf1 mx -all'],
      ['badhelo.test', 'v=spf1 -all'],
      ['six.test', 'v=spf1 ip6:2001:db8::/32 -all'],
    ],
    a: [['mail.mx.test', '127.0.0.42']],
    mx: [['mx.test', 'mail.mx.test', 10]],
  });
  fb = await startFakeBackend('none');
  dm = await startDoorman({
    backendPort: fb.port,
    listen: 'smtp://127.0.0.1:{PORT},smtp+proxy://127.0.0.1:{PORT}',
    env: { DOORMAN_DNS_SERVERS: dns.server, DOORMAN_TRUSTED_PROXIES: '127.0.0.1' },
    rules: { 'spf.yaml': SPF, 'access.yaml': 'rule: access\nsettings:\n  clients:\n    - allow: 127.0.0.77\n' },
  });
});
after(async () => {
  await dm?.stop();
  await fb?.close();
  await dns?.stop();
});

async function mailFrom(from: string, localAddress: string, helo = 'client.example.org'): Promise<{ code: number; text: string }> {
  const c = await SmtpClient.open(dm.port, { localAddress, ehlo: helo });
  const r = await c.cmd(`MAIL FROM:<${from}>`);
  c.close();
  return r;
}

test('pass and fail: the listed address passes, another gets 550 5.7.23', async () => {
  assert.equal((await mailFrom('a@strict.test', '127.0.0.40')).code, 250);
  const r = await mailFrom('a@strict.test', '127.0.0.41');
  assert.equal(r.code, 550);
  assert.equal(r.text, '5.7.23 <a@strict.test>: Sender address rejected: SPF fail');
  assert.equal((await mailFrom('a@inc.test', '127.0.0.41')).code, 550, 'include: followed');
  assert.equal((await mailFrom('a@mx.test', '127.0.0.42')).code, 250, 'mx mechanism resolved');
  assert.equal((await mailFrom('a@mx.test', '127.0.0.43')).code, 550);
  assert.equal(await dm.metric('doorman_rejections_total', { rule: 'spf', stage: 'mail', code: '550', enhanced_code: '5.7.23' }), 3);
});

test('swaks: a fail is refused; softfail is delivered with a tag header', async () => {
  const fail = await swaks(['--server', `127.0.0.1:${dm.port}`, '--local-interface', '127.0.0.41', '--from', 'x@strict.test', '--to', 'b@example.com', '--helo', 'h.example.org']);
  assert.match(fail.out, /<\*\*\s+550 5\.7\.23 /);
  const soft = await swaks(['--server', `127.0.0.1:${dm.port}`, '--local-interface', '127.0.0.41', '--from', 'x@soft.test', '--to', 'b@example.com', '--helo', 'h.example.org']);
  assert.equal(soft.status, 0, soft.out);
  const msg = await eventually(() => fb.messages.find((m) => m.includes('x@soft.test')));
  assert.match(msg ?? '', /^X-Doorman-Tag: spf; mailfrom softfail: .*127\.0\.0\.41/);
});

test('permerror is refused with 550 5.7.24 when configured; a domain without SPF passes', async () => {
  const r = await mailFrom('a@broken.test', '127.0.0.41');
  assert.equal(r.code, 550);
  assert.match(r.text, /^5\.7\.24 /);
  assert.equal((await mailFrom('a@nospf.test', '127.0.0.41')).code, 250);
});

test('the HELO identity is checked: a failing HELO domain refuses even a null sender', async () => {
  const r = await mailFrom('', '127.0.0.41', 'badhelo.test');
  assert.equal(r.code, 550);
  assert.match(r.text, /<postmaster@badhelo\.test>/);
});

test('SPF judges the real client: a PROXY header naming the listed address passes', async () => {
  const c = await SmtpClient.open(dm.ports[1]!, { proxy: 'TCP4 127.0.0.40 127.0.0.1 40000 25', ehlo: 'client.example.org' });
  assert.equal((await c.cmd('MAIL FROM:<a@strict.test>')).code, 250);
  c.close();
  const d = await SmtpClient.open(dm.ports[1]!, { proxy: 'TCP6 2001:db8::7 2001:db8::25 40000 25', ehlo: 'client.example.org' });
  assert.equal((await d.cmd('MAIL FROM:<a@six.test>')).code, 250, 'IPv6 client matched by ip6:');
  assert.equal((await d.cmd('RSET')).code, 250);
  assert.equal((await d.cmd('MAIL FROM:<a@strict.test>')).code, 550);
  d.close();
});

test('skipNetworks and allowlisted clients are not checked', async () => {
  assert.equal((await mailFrom('a@strict.test', '127.0.0.1')).code, 250);
  assert.equal((await mailFrom('a@strict.test', '127.0.0.77')).code, 250);
});

test('a DNS server that never answers: 451 4.7.24, never a crash or a hang', async () => {
  const hole = await startBlackHole();
  const d = await startDoorman({
    backendPort: fb.port,
    env: { DOORMAN_DNS_SERVERS: hole.server },
    config: 'dns:\n  timeout: 300\n  tries: 1\n',
    rules: { 'spf.yaml': SPF },
  });
  try {
    const c = await SmtpClient.open(d.port, { localAddress: '127.0.0.41', ehlo: 'client.example.org' });
    const r = await c.cmd('MAIL FROM:<a@strict.test>', 10_000);
    assert.equal(r.code, 451);
    assert.match(r.text, /^4\.7\.24 /);
    assert.equal((await c.cmd('NOOP')).code, 250, 'the session goes on');
    c.close();
    assert.ok(hole.queries() >= 1);
  } finally {
    await d.stop();
    await hole.stop();
  }
});
