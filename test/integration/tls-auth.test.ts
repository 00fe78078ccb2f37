/**
 * TLS and AUTH against a real Postfix with Cyrus SASL (sasldb): STARTTLS with swaks, the
 * STARTTLS injection case (CVE-2011-0411), a second STARTTLS, implicit TLS (smtps), AUTH not
 * offered on plaintext, AUTH PLAIN/LOGIN relayed to Postfix (235 lets the session relay,
 * 535 does not), and XCLIENT showing the real client address in Postfix's log and headers.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { makeCert } from '../helpers/certs.js';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startPostfix, type Postfix } from '../helpers/postfix.js';
import { startSink, type Sink } from '../helpers/sink.js';
import { SmtpClient } from '../helpers/smtp.js';
import { swaks } from '../helpers/swaks.js';
import { eventually, useCleanup } from '../helpers/procs.js';

useCleanup();
let sink: Sink;
let postfix: Postfix;
let dm: Doorman;
let cert: ReturnType<typeof makeCert>;

before(async () => {
  cert = makeCert();
  sink = await startSink();
  postfix = await startPostfix({ relayPort: sink.port, sasl: { alice: 'wonderland' } });
  dm = await startDoorman({
    backendPort: postfix.port,
    listen: 'smtp://127.0.0.1:{PORT},submission://127.0.0.1:{PORT},smtps://127.0.0.1:{PORT}',
    env: { DOORMAN_TLS_CERT: cert.cert, DOORMAN_TLS_KEY: cert.key },
  });
});
after(async () => {
  await dm?.stop();
  await postfix?.stop();
  await sink?.stop();
  if (cert) fs.rmSync(cert.dir, { recursive: true, force: true });
});

test('STARTTLS is offered on plaintext; AUTH only after TLS', async () => {
  const c = await SmtpClient.open(dm.port);
  assert.ok(c.keywords.has('STARTTLS'));
  assert.equal(c.keywords.has('AUTH'), false, 'no AUTH on plaintext');
  const a = await c.cmd('AUTH PLAIN AGFsaWNlAHdvbmRlcmxhbmQ=');
  assert.equal(a.code, 530);
  assert.match(a.text, /^5\.7\.0 Must issue a STARTTLS command first/);
  assert.equal((await c.cmd('STARTTLS')).code, 220);
  await c.upgrade();
  const secure = await c.ehlo();
  assert.equal(secure.keywords.has('STARTTLS'), false, 'no STARTTLS under TLS');
  assert.match(secure.keywords.get('AUTH') ?? '', /PLAIN/);
  const again = await c.cmd('STARTTLS');
  assert.equal(again.code, 554);
  assert.match(again.text, /^5\.5\.1 Error: TLS already active/);
  c.close();
});

test('swaks over STARTTLS delivers a message through doorman and Postfix', async () => {
  const r = await swaks(['--server', `127.0.0.1:${dm.port}`, '--tls', '--from', 'tls@example.org', '--to', 'bob@example.com', '--helo', 'client.example.net']);
  assert.equal(r.status, 0, r.out);
  // Postfix's own reply to the end of the message, relayed as BDAT: "Ok: <n> bytes queued as …".
  assert.match(r.out, /<~\s+250 2\.0\.0 Ok: \d+ bytes queued as/);
  const m = await sink.bySender('tls@example.org');
  assert.deepEqual(m.rcpts.map((x) => x.split(' ')[0]), ['<bob@example.com>']);
});

test('STARTTLS injection: plaintext pipelined after STARTTLS is discarded and state reset', async () => {
  const c = await SmtpClient.open(dm.port);
  // A man in the middle appends commands to STARTTLS in the same segment.
  c.write('STARTTLS\r\nMAIL FROM:<injected@example.org>\r\nRCPT TO:<bob@example.com>\r\n');
  const r = await c.reply();
  assert.equal(r.code, 220);
  await c.upgrade();
  // Had the injected MAIL run, this would be "503 nested MAIL"; had HELO survived, 250.
  const mail = await c.cmd('MAIL FROM:<after@example.org>');
  assert.equal(mail.code, 503, 'HELO forgotten after TLS (RFC 3207 §4.2)');
  assert.match(mail.text, /send HELO\/EHLO first/);
  await c.ehlo();
  assert.equal((await c.cmd('MAIL FROM:<after@example.org>')).code, 250, 'no injected transaction is open');
  assert.equal((await c.cmd('RCPT TO:<bob@example.com>')).code, 250);
  c.close();
  const metrics = await dm.metric('doorman_protocol_violations_total', { kind: 'starttls_injection' });
  assert.equal(metrics, 1);
});

test('implicit TLS (smtps role) greets inside TLS', async () => {
  const c = await SmtpClient.open(dm.ports[2]!, { tls: true });
  assert.equal(c.keywords.has('STARTTLS'), false);
  assert.match(c.keywords.get('AUTH') ?? '', /LOGIN/);
  c.close();
});

test('AUTH PLAIN is relayed to Postfix; 235 lets the session relay to a foreign domain', async () => {
  const r = await swaks([
    '--server', `127.0.0.1:${dm.ports[1]}`, '--tls', '--auth', 'PLAIN', '--auth-user', 'alice@backend.test', '--auth-password', 'wonderland',
    '--from', 'alice@example.org', '--to', 'someone@elsewhere.example', '--helo', 'laptop.example.net',
  ]);
  assert.equal(r.status, 0, r.out);
  assert.match(r.out, /<~\s+235 2\.7\.0 Authentication successful/);
  assert.match(r.out, /<~\s+250 2\.1\.5 Ok/, 'relay allowed by Postfix for the authenticated session');
  const logs = await eventually(() => dm.sessions().find((s) => s.login === 'alice@backend.test'));
  assert.ok(logs, 'session log names the login');
  assert.equal(logs.tls, true);
});

test('AUTH LOGIN with a wrong password: 535 from Postfix, no relaying', async () => {
  const r = await swaks([
    '--server', `127.0.0.1:${dm.ports[1]}`, '--tls', '--auth', 'LOGIN', '--auth-user', 'alice@backend.test', '--auth-password', 'wrong',
    '--from', 'alice@example.org', '--to', 'someone@elsewhere.example',
  ]);
  assert.notEqual(r.status, 0);
  assert.match(r.out, /<~\*\s+535 5\.7\.8 Error: authentication failed/);
});

test('AUTH cancelled by the client with "*"', async () => {
  const c = await SmtpClient.open(dm.ports[1]!, { starttls: true });
  const ch = await c.cmd('AUTH LOGIN');
  assert.equal(ch.code, 334);
  const r = await c.cmd('*');
  assert.equal(r.code, 501);
  // The session goes on.
  assert.equal((await c.cmd('NOOP')).code, 250);
  c.close();
});

test('XCLIENT: Postfix logs and stamps the real client address, not doorman’s', async () => {
  const c = await SmtpClient.open(dm.port, { localAddress: '127.0.0.7', ehlo: 'seven.example.net' });
  const r = await c.message({ from: 'xclient@example.org', to: 'bob@example.com', body: 'Subject: xclient\r\n\r\nhi\r\n' });
  assert.equal(r.code, 250);
  const queueId = /queued as ([A-F0-9]+)/.exec(r.text)?.[1];
  assert.ok(queueId, r.raw);
  await c.cmd('QUIT');
  const logLine = await eventually(() => postfix.log().split('\n').find((l) => l.includes(`${queueId}: client=`)));
  assert.match(logLine ?? '', /client=unknown\[127\.0\.0\.7\]/);
  const m = await sink.bySender('xclient@example.org');
  assert.match(m.body, /Received: from seven\.example\.net \(unknown \[127\.0\.0\.7\]\)/);
  const s = await eventually(() => dm.sessions().find((x) => (x.transactions as { queueId?: string }[]).some((mm) => mm.queueId === queueId)));
  assert.ok(s, 'session log carries the backend queue id');
  assert.equal(s.client, '127.0.0.7');
});

test('STARTTLS towards the backend when it offers it; `require` refuses a backend without it', async () => {
  const tlsPf = await startPostfix({ relayPort: sink.port, tls: { cert: cert.cert, key: cert.key } });
  const d = await startDoorman({ backendPort: tlsPf.port });
  const strict = await startDoorman({ backendPort: postfix.port, config: 'backend:\n  starttls: require\n' });
  try {
    const c = await SmtpClient.open(d.port);
    assert.equal((await c.message({ from: 'backend-tls@example.org', to: 'bob@example.com', body: 'Subject: backend tls\r\n\r\nhi\r\n' })).code, 250);
    c.close();
    const line = await eventually(() => tlsPf.log().split('\n').find((l) => /TLS connection established from/.test(l)));
    assert.ok(line, 'Postfix logged a TLS session from doorman');
    const s = await SmtpClient.open(strict.port, { ehlo: false });
    const r = await s.cmd('EHLO client.example.net');
    assert.equal(r.code, 421, 'no STARTTLS at the backend: the client is told to come back later');
    assert.ok((await strict.metric('doorman_backend_failures_total', { kind: 'tls' })) >= 1);
  } finally {
    await d.stop();
    await strict.stop();
    await tlsPf.stop();
  }
});

test('authPlaintext: a listener configured for it offers AUTH without TLS', async () => {
  const d = await startDoorman({
    backendPort: postfix.port,
    env: { DOORMAN_LISTEN: '' },
    config: 'listen:\n  - address: 127.0.0.1:0\n    role: submission\n    authPlaintext: true\n',
  }).catch((e: unknown) => e as Error);
  // Port 0 cannot be named in advance: use the address doorman logged.
  assert.ok(!(d instanceof Error), String(d));
  try {
    const port = ((d.logs().find((l) => l.msg === 'doorman started')?.listeners as { port: number }[])[0]?.port) ?? 0;
    const c = await SmtpClient.open(port);
    assert.match(c.keywords.get('AUTH') ?? '', /PLAIN/);
    const r = await c.cmd('AUTH PLAIN ' + Buffer.from('\0alice@backend.test\0wonderland').toString('base64'));
    assert.equal(r.code, 235);
    c.close();
  } finally {
    await d.stop();
  }
});

test('each client session gets a prepared backend connection, bound by one XCLIENT (HELO included, no EHLO) and never given to another client', async () => {
  // Postfix authorizes XCLIENT from doorman's address only (as in production) and judges a second
  // XCLIENT on a connection by the client the first one named: a connection told one client
  // serves that client to its end; the next client gets a spare (greeted, doorman's own EHLO).
  const d = await startDoorman({ backendPort: postfix.port, config: 'backend:\n  spares: 1\n' });
  try {
    const ids: string[] = [];
    const send = async (ip: string, again = false) => {
      const c = await SmtpClient.open(d.port, { localAddress: ip, ehlo: `host-${ip.split('.')[3]}.example.net` });
      // A second EHLO from the same client goes to Postfix as sent: no second XCLIENT.
      if (again) assert.equal((await c.ehlo(`host-${ip.split('.')[3]}.example.net`)).reply.code, 250);
      const r = await c.message({ from: `pool-${ip}@example.org`, to: 'bob@example.com', body: 'Subject: pooled\r\n\r\nhi\r\n' });
      assert.equal(r.code, 250, r.raw);
      ids.push(/queued as ([A-F0-9]+)/.exec(r.text)?.[1] ?? '');
      assert.equal((await c.cmd('QUIT')).code, 221);
      await new Promise((res) => setTimeout(res, 100));
    };
    await send('127.0.0.21');
    await send('127.0.0.22', true);
    // A client that leaves in the middle of a transaction: the next one still gets a clean session.
    const c = await SmtpClient.open(d.port, { localAddress: '127.0.0.24', ehlo: 'host-24.example.net' });
    assert.equal((await c.cmd('MAIL FROM:<left@example.org>')).code, 250);
    assert.equal((await c.cmd('RCPT TO:<bob@example.com>')).code, 250);
    assert.equal((await c.cmd('QUIT')).code, 221);
    await new Promise((res) => setTimeout(res, 100));
    await send('127.0.0.23');
    for (const [i, ip] of ['127.0.0.21', '127.0.0.22', '127.0.0.23'].entries()) {
      const line = await eventually(() => postfix.log().split('\n').find((l) => l.includes(`${ids[i]}: client=`)));
      assert.match(line ?? '', new RegExp(`client=unknown\\[${ip.replace(/\./g, '\\.')}\\]`), `session ${i + 1} carries its own client`);
      const m = await sink.bySender(`pool-${ip}@example.org`);
      assert.match(m.body, new RegExp(`Received: from host-${ip.split('.')[3]}\\.example\\.net \\(unknown \\[${ip.replace(/\./g, '\\.')}\\]\\)\\s+by backend\\.test \\(Postfix\\) with ESMTP`), 'Postfix stamps the client’s own HELO name and ESMTP');
    }
    // Sessions 2–4 were served by the spare prepared after the one before took its connection.
    assert.equal(await d.metric('doorman_backend_reused_total'), 3);
    assert.equal(await d.metric('doorman_backend_failures_total'), 0);
    // Postfix's counters per connection (it counts the XCLIENT that restarted the session as
    // 0/1): doorman's own EHLO, one XCLIENT, the client's second EHLO as sent, the message as
    // BDAT (Postfix offers CHUNKING); no second, refused XCLIENT (0/2).
    const bye = (ip: string) => eventually(() => postfix.log().split('\n').find((l) => l.includes(`disconnect from unknown[${ip}]`)));
    for (const ip of ['127.0.0.21', '127.0.0.23']) assert.match((await bye(ip)) ?? '', / ehlo=1 xclient=0\/1 mail=1 rcpt=1 bdat=1 quit=1 commands=5\/6$/, ip);
    assert.match((await bye('127.0.0.22')) ?? '', / ehlo=2 xclient=0\/1 mail=1 rcpt=1 bdat=1 quit=1 commands=6\/7$/);
    assert.match((await bye('127.0.0.24')) ?? '', / ehlo=1 xclient=0\/1 mail=1 rcpt=1 quit=1 /);
  } finally {
    await d.stop();
  }
});

test('a client that says HELO, not EHLO: Postfix is told so (XCLIENT PROTO=SMTP) and stamps “with SMTP”', async () => {
  const c = await SmtpClient.open(dm.port, { localAddress: '127.0.0.9', ehlo: false });
  const h = await c.cmd('HELO old.example.net');
  assert.equal(h.code, 250);
  assert.doesNotMatch(h.raw, /PIPELINING|SIZE/, 'no extensions after HELO');
  assert.equal((await c.message({ from: 'helo-only@example.org', to: 'bob@example.com', body: 'Subject: helo\r\n\r\nhi\r\n' })).code, 250);
  await c.cmd('QUIT');
  const m = await sink.bySender('helo-only@example.org');
  assert.match(m.body, /Received: from old\.example\.net \(unknown \[127\.0\.0\.9\]\)\s+by backend\.test \(Postfix\) with SMTP /);
});

test('BDAT towards Postfix (it offers CHUNKING): a large message with dot lines and 8-bit bytes arrives byte for byte; chunking: false sends DATA', async () => {
  const bdat = await startDoorman({ backendPort: postfix.port, config: 'backend:\n  poolSize: 0\n' });
  const data = await startDoorman({ backendPort: postfix.port, config: 'backend:\n  poolSize: 0\n  chunking: false\n' });
  try {
    const filler = Array.from({ length: 4000 }, (_, i) => `line ${i} ${'x'.repeat(60)}`);
    const body = ['.leading dot', '..two dots', '.', 'Grüße — ✓'.normalize(), 'y'.repeat(998), ...filler, '. last', ''].join('\r\n');
    const send = async (port: number, ip: string, from: string) => {
      const message = `From: <${from}>\r\nTo: <bob@example.com>\r\nDate: Sun, 22 Nov 2026 04:00:00 +0000\r\nMessage-ID: <${from}>\r\nSubject: chunks\r\n\r\n${body}`;
      const c = await SmtpClient.open(port, { localAddress: ip, ehlo: 'chunks.example.net' });
      const stuffed = Buffer.from(message.replace(/^\./gm, '..'), 'utf8');
      const r = await c.message({ from, params: 'BODY=8BITMIME', to: 'bob@example.com', body: stuffed });
      assert.equal(r.code, 250, r.raw);
      assert.equal((await c.cmd('QUIT')).code, 221);
      const m = await sink.bySender(from);
      // Postfix adds its Received header; everything from the message's own first header on is the client's.
      const stored = Buffer.from(m.body, 'latin1').toString('utf8');
      assert.equal(stored.slice(stored.indexOf(`From: <${from}>`)), message.split('\r\n').join('\n'), 'smtp-sink stores LF line ends');
      return await eventually(() => postfix.log().split('\n').find((l) => l.includes(`disconnect from unknown[${ip}]`)));
    };
    const viaBdat = await send(bdat.port, '127.0.0.31', 'chunks-bdat@example.org');
    const bdats = Number(/ bdat=(\d+)/.exec(viaBdat ?? '')?.[1] ?? 0);
    assert.ok(bdats >= 2, `the message went in several BDAT chunks: ${viaBdat}`);
    assert.doesNotMatch(viaBdat ?? '', / data=/);
    const viaData = await send(data.port, '127.0.0.32', 'chunks-data@example.org');
    assert.match(viaData ?? '', / data=1 /);
    assert.doesNotMatch(viaData ?? '', / bdat=/);
  } finally {
    await bdat.stop();
    await data.stop();
  }
});
