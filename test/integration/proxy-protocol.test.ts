/**
 * PROXY protocol: accepted from a trusted load balancer (v1 text, v2 binary, IPv4 and IPv6;
 * the real client then reaches Postfix by XCLIENT), never from anyone else; and sent to a
 * Postfix that expects it (smtpd_upstream_proxy_protocol = haproxy) instead of XCLIENT.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { proxyHeaderV2 } from '../../src/backend/proxy-protocol.js';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startPostfix, type Postfix } from '../helpers/postfix.js';
import { startSink, type Sink } from '../helpers/sink.js';
import { SmtpClient } from '../helpers/smtp.js';
import { eventually, useCleanup } from '../helpers/procs.js';

useCleanup();
let sink: Sink;
let postfix: Postfix;
let pfProxy: Postfix;
let dm: Doorman;

before(async () => {
  sink = await startSink();
  postfix = await startPostfix({ relayPort: sink.port });
  pfProxy = await startPostfix({ relayPort: sink.port, proxyProtocol: true, xclient: false });
  dm = await startDoorman({
    backendPort: postfix.port,
    listen: 'smtp+proxy://127.0.0.1:{PORT}',
    env: { DOORMAN_TRUSTED_PROXIES: '127.0.0.1/32' },
  });
});
after(async () => {
  await dm?.stop();
  await postfix?.stop();
  await pfProxy?.stop();
  await sink?.stop();
});

/** One message from `from` on a client past EHLO; Postfix's queue id. */
async function deliver(c: SmtpClient, from: string): Promise<string> {
  const r = await c.message({ from, to: 'bob@example.com', body: 'Subject: proxy\r\n\r\nhi\r\n' });
  assert.equal(r.code, 250, r.raw);
  c.close();
  return /queued as ([A-F0-9]+)/.exec(r.text)?.[1] ?? '';
}

async function postfixClient(pf: Postfix, queueId: string): Promise<string> {
  const line = await eventually(() => pf.log().split('\n').find((l) => l.includes(`${queueId}: client=`)), 5000);
  return /client=(\S+)/.exec(line ?? '')?.[1] ?? `(no log line for ${queueId})`;
}

test('PROXY v1 from a trusted balancer: Postfix sees the client it names', async () => {
  const c = await SmtpClient.open(dm.port, { proxy: 'TCP4 192.0.2.10 127.0.0.1 40000 25', ehlo: 'lb-client.example.net' });
  const id = await deliver(c, 'v1@example.org');
  assert.equal(await postfixClient(postfix, id), 'unknown[192.0.2.10]');
  const s = await eventually(() => dm.sessions().find((x) => x.client === '192.0.2.10'));
  assert.ok(s);
});

test('PROXY v2 with an IPv6 client', async () => {
  const proxy = proxyHeaderV2({ address: '2001:db8::5', port: 40001, family: 6, destAddress: '2001:db8::25', destPort: 25, destFamily: 6 });
  const c = await SmtpClient.open(dm.port, { proxy, ehlo: 'lb-client.example.net' });
  const id = await deliver(c, 'v2@example.org');
  assert.equal(await postfixClient(postfix, id), 'unknown[2001:db8::5]');
});

test('a PROXY header from an untrusted address is just an unknown command', async () => {
  const c = await SmtpClient.open(dm.port, { localAddress: '127.0.0.9', ehlo: false }); // untrusted peers are greeted at once
  const r = await c.cmd('PROXY TCP4 192.0.2.66 127.0.0.1 40000 25');
  assert.equal(r.code, 500);
  await c.ehlo('lb-client.example.net');
  const id = await deliver(c, 'untrusted@example.org');
  assert.equal(await postfixClient(postfix, id), 'unknown[127.0.0.9]');
});

test('commands in the same packet as the PROXY header are talking before the greeting: 521, never executed', async () => {
  const before = await dm.metric('doorman_protocol_violations_total', { kind: 'pregreet' });
  const c = await SmtpClient.connect(dm.port);
  c.write('PROXY TCP4 192.0.2.11 127.0.0.1 40000 25\r\nEHLO early.example\r\nMAIL FROM:<early@example.org>\r\nRCPT TO:<bob@example.com>\r\n');
  const r = await c.reply();
  assert.equal(r.code, 521, r.raw);
  assert.match(r.text, /^5\.5\.1 /);
  assert.equal(await c.waitClosed(), true);
  assert.equal(c.pending(), '', 'no reply to the early commands');
  assert.equal(await dm.metric('doorman_protocol_violations_total', { kind: 'pregreet' }), before + 1);
  const s = await eventually(() => dm.sessions().find((x) => x.client === '192.0.2.11'));
  assert.equal(s?.outcome, 'pregreet');
});

test('a trusted peer that sends garbage instead of a header is disconnected, no greeting', async () => {
  const c = await SmtpClient.connect(dm.port);
  c.write('EHLO not-a-proxy-header\r\n');
  assert.equal(await c.waitClosed(), true);
  assert.equal(c.pending(), '');
  assert.ok((await dm.metric('doorman_connections_refused_total', { reason: 'proxy_header' })) >= 1);
});

for (const version of ['v1', 'v2'] as const) {
  test(`PROXY ${version} towards a Postfix that expects it`, async () => {
    const d = await startDoorman({ backendPort: pfProxy.port, config: `backend:\n  proxyProtocol: ${version}\n  xclient: false\n` });
    try {
      const c = await SmtpClient.open(d.port, { localAddress: '127.0.0.8', ehlo: 'lb-client.example.net' });
      const id = await deliver(c, `out-${version}@example.org`);
      assert.equal(await postfixClient(pfProxy, id), 'unknown[127.0.0.8]');
    } finally {
      await d.stop();
    }
  });
}
