/**
 * PIPELINING (RFC 2920): replies come in order; a recipient refused inside a group (by a rule
 * or by the backend) does not desynchronise the rest; the backend gets the group pipelined too.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startFakeBackend, type FakeBackend } from '../helpers/fake-backend.js';
import { startPostfix, type Postfix } from '../helpers/postfix.js';
import { startSink, type Sink } from '../helpers/sink.js';
import { SmtpClient } from '../helpers/smtp.js';
import { useCleanup } from '../helpers/procs.js';

useCleanup();
let sink: Sink;
let postfix: Postfix;
let dm: Doorman;

const ACCESS = `rule: access
settings:
  recipients:
    - deny: blocked@example.com
      reply: "550 5.7.1 <blocked@example.com>: Recipient address rejected: blocked here"
`;

before(async () => {
  sink = await startSink();
  postfix = await startPostfix({ relayPort: sink.port });
  dm = await startDoorman({ backendPort: postfix.port, rules: { 'access.yaml': ACCESS } });
});
after(async () => {
  await dm?.stop();
  await postfix?.stop();
  await sink?.stop();
});

test('a whole transaction in one write: replies in order, refusals in place', async () => {
  const c = await SmtpClient.connect(dm.port);
  await c.reply();
  const { keywords } = await c.ehlo();
  assert.ok(keywords.has('PIPELINING'));
  c.write(
    'MAIL FROM:<pipe@example.org>\r\n' +
      'RCPT TO:<one@example.com>\r\n' +
      'RCPT TO:<blocked@example.com>\r\n' + // refused by doorman's rule
      'RCPT TO:<rejected@example.com>\r\n' + // refused by Postfix
      'RCPT TO:<two@example.com>\r\n' +
      'DATA\r\n',
  );
  const codes: number[] = [];
  const texts: string[] = [];
  for (let i = 0; i < 6; i++) {
    const r = await c.reply();
    codes.push(r.code);
    texts.push(r.text);
  }
  assert.deepEqual(codes, [250, 250, 550, 554, 250, 354]);
  assert.match(texts[2]!, /blocked here/);
  assert.match(texts[3]!, /rejected@example\.com>: Recipient address rejected/);
  c.write('Subject: pipelined\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n');
  const end = [await c.reply(), await c.reply(), await c.reply()];
  assert.deepEqual(
    end.map((r) => r.code),
    [250, 250, 221],
  );
  const m = await sink.bySender('pipe@example.org');
  assert.deepEqual(
    m.rcpts.map((r) => r.split(' ')[0]),
    ['<one@example.com>', '<two@example.com>'],
  );
});

test('the backend receives the group pipelined (commands sent before earlier replies)', async () => {
  const fb: FakeBackend = await startFakeBackend('slow-replies');
  const d = await startDoorman({ backendPort: fb.port });
  try {
    const c = await SmtpClient.connect(d.port);
    await c.reply();
    await c.ehlo();
    c.write('MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nRCPT TO:<d@example.com>\r\nDATA\r\n');
    const codes = [];
    for (let i = 0; i < 5; i++) codes.push((await c.reply()).code);
    assert.deepEqual(codes, [250, 250, 250, 250, 354]);
    assert.ok(fb.maxOutstanding >= 4, `at most ${fb.maxOutstanding} command(s) outstanding at the backend`);
    c.close();
  } finally {
    await d.stop();
    await fb.close();
  }
});
