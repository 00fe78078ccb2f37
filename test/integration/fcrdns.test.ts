/**
 * Forward-confirmed reverse DNS end to end with a real dnsmasq serving PTR and A records:
 * clients on different 127.0.0.x addresses → doorman (fcrdns rule) → a backend. A confirmed
 * client passes; no PTR or a PTR that does not resolve back gets 550 5.7.25; a DNS failure
 * gets a 4xx with X.7.25 (RFC 7372), never a 5xx. The resolver's cache: a client's next session
 * asks the resolver nothing.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startBlackHole, startDnsmasq, startSlowDns, type Dnsmasq } from '../helpers/dns.js';
import { startFakeBackend, type FakeBackend } from '../helpers/fake-backend.js';
import { SmtpClient } from '../helpers/smtp.js';
import { eventually, useCleanup } from '../helpers/procs.js';

useCleanup();
let dns: Dnsmasq;
let fb: FakeBackend;
let dm: Doorman;

before(async () => {
  dns = await startDnsmasq({
    ptr: [
      ['81.0.0.127.in-addr.arpa', 'good.test'],
      ['82.0.0.127.in-addr.arpa', 'liar.test'],
    ],
    a: [
      ['good.test', '127.0.0.81'],
      ['liar.test', '127.0.0.99'],
    ],
  });
  fb = await startFakeBackend('none');
  dm = await startDoorman({ backendPort: fb.port, env: { DOORMAN_DNS_SERVERS: dns.server }, rules: { 'fcrdns.yaml': 'rule: fcrdns\n' } });
});
after(async () => {
  await dm?.stop();
  await fb?.close();
  await dns?.stop();
});

async function greeting(localAddress: string, port = dm.port) {
  const c = await SmtpClient.greet(port, { localAddress, timeout: 5000 });
  c.close();
  return c.greeting;
}

test('a client whose PTR name resolves back to it passes', async () => {
  assert.equal((await greeting('127.0.0.81')).code, 220);
});

test('no PTR, or a PTR name that does not resolve back: 554 5.7.25 instead of the greeting', async () => {
  for (const ip of ['127.0.0.82', '127.0.0.83']) {
    const r = await greeting(ip);
    assert.equal(r.code, 554, ip);
    assert.equal(r.text, `5.7.25 Reverse DNS validation failed for [${ip}]`);
  }
  const log = await eventually(() => dm.sessions().find((s) => s.client === '127.0.0.82'));
  assert.match(JSON.stringify(log?.rules), /liar\.test do not resolve to 127\.0\.0\.82/);
  assert.equal(await dm.metric('doorman_fcrdns_checks_total', { result: 'fail' }), 2);
  assert.equal(await dm.metric('doorman_fcrdns_checks_total', { result: 'pass' }), 1);
});

test('a DNS failure is temporary: 421 4.7.25 at connect, never 5xx', async () => {
  const hole = await startBlackHole();
  const d = await startDoorman({
    backendPort: fb.port,
    env: { DOORMAN_DNS_SERVERS: hole.server },
    rules: { 'fcrdns.yaml': 'rule: fcrdns\nsettings:\n  timeout: 300\n' },
  });
  try {
    const r = await greeting('127.0.0.81', d.port);
    assert.equal(r.code, 421);
    assert.match(r.text, /^4\.7\.25 /);
  } finally {
    await d.stop();
    await hole.stop();
  }
});

test('DNS answers are kept for their TTL: the next session from a client asks the resolver nothing; dns.cacheSize: 0 asks every time', async () => {
  // dnsmasq answering with a 60 s TTL, and a relay in front of it that counts doorman's queries.
  const ttl60 = await startDnsmasq({ ttl: 60, ptr: [['81.0.0.127.in-addr.arpa', 'good.test'], ['82.0.0.127.in-addr.arpa', 'liar.test']], a: [['good.test', '127.0.0.81'], ['liar.test', '127.0.0.99']] });
  const counter = await startSlowDns(ttl60.server, 0);
  const zero = await startSlowDns(dns.server, 0);
  const rules = { 'fcrdns.yaml': 'rule: fcrdns\n' };
  const cached = await startDoorman({ backendPort: fb.port, env: { DOORMAN_DNS_SERVERS: counter.server }, rules });
  const uncached = await startDoorman({ backendPort: fb.port, env: { DOORMAN_DNS_SERVERS: counter.server }, rules, config: 'dns:\n  cacheSize: 0\n' });
  const ttl0 = await startDoorman({ backendPort: fb.port, env: { DOORMAN_DNS_SERVERS: zero.server }, rules });
  try {
    assert.equal((await greeting('127.0.0.81', cached.port)).code, 220);
    const first = counter.queries();
    assert.equal(first, 2, 'the PTR, then the A records of its name');
    for (let i = 0; i < 3; i++) assert.equal((await greeting('127.0.0.81', cached.port)).code, 220);
    assert.equal(counter.queries(), first, 'answered from the cache');
    assert.equal(await cached.metric('doorman_dns_cache_hits_total'), 6);
    // A refusal from cached answers is the same refusal.
    for (let i = 0; i < 2; i++) assert.equal((await greeting('127.0.0.82', cached.port)).code, 554);
    assert.equal(counter.queries(), first + 2);
    for (let i = 0; i < 2; i++) assert.equal((await greeting('127.0.0.81', uncached.port)).code, 220);
    assert.equal(counter.queries(), first + 6);
    assert.equal(await uncached.metric('doorman_dns_cache_hits_total'), 0);
    // An A record with TTL 0 is asked again every time; its PTR (whose TTL Node does not report) is kept.
    for (let i = 0; i < 3; i++) assert.equal((await greeting('127.0.0.81', ttl0.port)).code, 220);
    assert.equal(zero.queries(), 4);
  } finally {
    await cached.stop();
    await uncached.stop();
    await ttl0.stop();
    await counter.stop();
    await zero.stop();
    await ttl60.stop();
  }
});
