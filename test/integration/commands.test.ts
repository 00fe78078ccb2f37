/**
 * Every command gets the right answer: EHLO capability intersection, local answers (NOOP, HELP,
 * VRFY, EXPN), unknown and obsolete commands, wrong order (503), syntax errors, non-SMTP
 * clients, and a real Postfix refusing a recipient (its reply reaches the client).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startPostfix, type Postfix } from '../helpers/postfix.js';
import { startSink, type Sink } from '../helpers/sink.js';
import { SmtpClient } from '../helpers/smtp.js';
import { useCleanup } from '../helpers/procs.js';

useCleanup();
let sink: Sink;
let postfix: Postfix;
let dm: Doorman; // in front of smtp-sink
let dmPf: Doorman; // in front of Postfix

before(async () => {
  sink = await startSink();
  postfix = await startPostfix({ relayPort: sink.port });
  dm = await startDoorman({ backendPort: sink.port });
  dmPf = await startDoorman({ backendPort: postfix.port });
});
after(async () => {
  await dm?.stop();
  await dmPf?.stop();
  await postfix?.stop();
  await sink?.stop();
});

test('EHLO advertises what doorman implements and the backend offers, never CHUNKING', async () => {
  // smtp-sink offers PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES, DSN, XCLIENT, CHUNKING…
  const c = await SmtpClient.open(dm.port, { ehlo: false });
  assert.match(c.greeting.text, /^mx\.doorman\.test ESMTP/);
  const { reply, keywords } = await c.ehlo();
  assert.equal(reply.code, 250);
  assert.equal(reply.lines[0], 'mx.doorman.test');
  assert.ok(keywords.has('PIPELINING'));
  assert.ok(keywords.has('8BITMIME'));
  assert.ok(keywords.has('ENHANCEDSTATUSCODES'));
  assert.equal(keywords.get('SIZE'), '52428800', 'own limit when the backend has none');
  for (const k of ['CHUNKING', 'BINARYMIME', 'XCLIENT', 'XFORWARD', 'ETRN', 'VRFY', 'STARTTLS', 'AUTH']) assert.equal(keywords.has(k), false, k);
  c.close();
});

test('SIZE is the smaller of doorman’s limit and the backend’s, less room for doorman’s headers', async () => {
  // Postfix advertises SIZE 10240000 (its message_size_limit default); doorman keeps 18340 octets
  // for the X-Doorman-Tag headers it may add (20 × 917).
  const c = await SmtpClient.open(dmPf.port);
  assert.equal(c.keywords.get('SIZE'), '10221660');
  assert.ok(c.keywords.has('SMTPUTF8'));
  const big = await c.cmd('MAIL FROM:<a@example.org> SIZE=10221661');
  assert.equal(big.code, 552);
  assert.match(big.text, /^5\.3\.4 /);
  c.close();
});

test('HELO gets a plain 250 with no extensions', async () => {
  const c = await SmtpClient.open(dm.port, { ehlo: false });
  const r = await c.cmd('HELO client.example.net');
  assert.equal(r.code, 250);
  assert.deepEqual(r.lines, ['mx.doorman.test']);
  c.close();
});

test('local answers: NOOP, HELP, VRFY, EXPN, RSET', async () => {
  const c = await SmtpClient.open(dm.port);
  const expect = async (line: string, code: number, enhanced: string) => {
    const r = await c.cmd(line);
    assert.equal(r.code, code, `${line}: ${r.raw}`);
    assert.ok(r.text.startsWith(enhanced), `${line}: ${r.raw}`);
  };
  await expect('NOOP', 250, '2.0.0');
  await expect('HELP', 214, '2.0.0');
  await expect('VRFY postmaster', 252, '2.0.0 ');
  await expect('VRFY', 501, '5.5.4');
  await expect('EXPN staff', 502, '5.5.1');
  await expect('RSET', 250, '2.'); // relayed: the backend's transaction is reset too
  await expect('RSET now', 501, '5.5.4');
  c.close();
});

test('unknown commands get 500 5.5.2, obsolete ones 502 5.5.1', async () => {
  const c = await SmtpClient.open(dm.port);
  for (const cmd of ['FOO', 'XYZZY bar']) {
    const r = await c.cmd(cmd);
    assert.equal(r.code, 500, cmd);
    assert.match(r.text, /^5\.5\.2 /);
  }
  for (const cmd of ['SEND FROM:<a@b>', 'SOML FROM:<a@b>', 'SAML FROM:<a@b>', 'TURN', 'ETRN example.com', 'BDAT 10 LAST', 'XCLIENT ADDR=1.2.3.4']) {
    const r = await c.cmd(cmd);
    assert.equal(r.code, 502, cmd);
    assert.match(r.text, /^5\.5\.1 /);
  }
  c.close();
});

test('commands out of order get 503 5.5.1', async () => {
  const c = await SmtpClient.open(dm.port, { ehlo: false });
  assert.equal((await c.cmd('MAIL FROM:<a@example.org>')).code, 503, 'MAIL before HELO');
  assert.equal((await c.cmd('RCPT TO:<b@example.com>')).code, 503, 'RCPT before HELO');
  assert.equal((await c.cmd('DATA')).code, 503, 'DATA before HELO');
  await c.ehlo();
  assert.equal((await c.cmd('RCPT TO:<b@example.com>')).code, 503, 'RCPT before MAIL');
  assert.equal((await c.cmd('DATA')).code, 503, 'DATA before MAIL');
  assert.equal((await c.cmd('MAIL FROM:<a@example.org>')).code, 250);
  const nested = await c.cmd('MAIL FROM:<a@example.org>');
  assert.equal(nested.code, 503, 'nested MAIL');
  assert.match(nested.text, /5\.5\.1 Error: nested MAIL command/);
  const noRcpt = await c.cmd('DATA');
  assert.equal(noRcpt.code, 503, 'DATA before RCPT');
  assert.match(noRcpt.text, /need RCPT/);
  c.close();
});

test('syntax errors: 501 with an enhanced code, bad parameters 555', async () => {
  const c = await SmtpClient.open(dm.port, { ehlo: false });
  assert.equal((await c.cmd('EHLO')).code, 501);
  await c.ehlo();
  const cases: [string, number, string][] = [
    ['MAIL TO:<a@example.org>', 501, '5.5.4'],
    ['MAIL FROM:<a@@>', 501, '5.1.7'],
    ['MAIL FROM:<a@example.org> BODY=BINARYMIME', 555, '5.5.4'],
    ['MAIL FROM:<a@example.org> FOO=bar', 555, '5.5.4'],
    ['MAIL FROM:<a@example.org> SIZE=abc', 555, '5.5.4'],
    ['MAIL FROM:<ü@example.org>', 553, '5.6.7'],
  ];
  for (const [line, code, enhanced] of cases) {
    const r = await c.cmd(line);
    assert.equal(r.code, code, `${line}: ${r.raw}`);
    assert.ok(r.text.startsWith(enhanced), `${line}: ${r.raw}`);
  }
  assert.equal((await c.cmd('MAIL FROM:<a@example.org> BODY=8BITMIME SIZE=1000')).code, 250);
  const bad = await c.cmd('RCPT TO:<>');
  assert.equal(bad.code, 501);
  assert.match(bad.text, /^5\.1\.3 /);
  c.close();
});

test('all pipelined recipients refused: DATA gets 554 no valid recipients (Haraka#538)', async () => {
  const c = await SmtpClient.open(dmPf.port);
  c.write('MAIL FROM:<a@example.org>\r\nRCPT TO:<rejected@example.com>\r\nRCPT TO:<x@elsewhere.example>\r\nDATA\r\n');
  const replies = [await c.reply(), await c.reply(), await c.reply(), await c.reply()];
  assert.deepEqual(
    replies.map((r) => r.code),
    [250, 554, 554, 554],
  );
  assert.match(replies[1]!.text, /rejected@example\.com>: Recipient address rejected: Access denied/, 'Postfix’s own reply');
  assert.match(replies[2]!.text, /Relay access denied/, 'Postfix’s own reply');
  assert.match(replies[3]!.text, /^5\.5\.1 Error: no valid recipients/);
  c.close();
});

test('a non-SMTP client (HTTP) is told 421 and disconnected', async () => {
  const c = await SmtpClient.open(dm.port, { ehlo: false });
  c.write('GET / HTTP/1.1\r\nHost: example\r\n\r\n');
  const r = await c.reply();
  assert.equal(r.code, 421);
  assert.equal(await c.waitClosed(), true);
});

test('QUIT: 221 and the connection closes', async () => {
  const c = await SmtpClient.open(dm.port, { ehlo: false });
  const r = await c.cmd('QUIT');
  assert.equal(r.code, 221);
  assert.match(r.text, /^2\.0\.0 /);
  assert.equal(await c.waitClosed(), true);
});
