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
  const c = await SmtpClient.open(dm.port);
  assert.ok(c.keywords.has('PIPELINING'));
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
    const c = await SmtpClient.open(d.port);
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

test('MAIL waits for the first RCPT and goes with it in one write (backend.deferMail); a MAIL without a RCPT never reaches the backend', async () => {
  const fb: FakeBackend = await startFakeBackend('slow-replies');
  const d = await startDoorman({ backendPort: fb.port, config: 'backend:\n  poolSize: 0\n' });
  const eager = await startDoorman({ backendPort: fb.port, config: 'backend:\n  poolSize: 0\n  deferMail: false\n' });
  try {
    // A client that waits for every reply (no pipelining on its side).
    const session = async (port: number, deferred: boolean) => {
      const c = await SmtpClient.open(port);
      assert.equal((await c.cmd('MAIL FROM:<gone@example.org>')).code, 250);
      assert.equal((await c.cmd('RSET')).code, 250);
      const m = await c.cmd('MAIL FROM:<a@example.org>');
      assert.equal(m.code, 250);
      // Doorman's own answer, as Postfix words it; the fake backend says 2.0.0.
      assert.match(m.text, deferred ? /^2\.1\.0 Ok/ : /^2\.0\.0 Ok/);
      assert.equal((await c.cmd('RCPT TO:<b@example.com>')).code, 250);
      assert.equal((await c.cmd('DATA')).code, 354);
      c.write('Subject: deferred\r\n\r\nbody\r\n.\r\n');
      assert.equal((await c.reply()).code, 250);
      assert.equal((await c.cmd('QUIT')).code, 221);
    };
    await session(d.port, true);
    assert.ok(fb.maxOutstanding >= 2, `MAIL and RCPT outstanding together at the backend (at most ${fb.maxOutstanding})`);
    assert.ok(!fb.commands.includes('MAIL FROM:<gone@example.org>'), 'the MAIL that saw no RCPT stayed here');
    assert.equal(fb.messages.length, 1);
    // After HELO the backend never offered PIPELINING to this client: no MAIL deferred, nothing pipelined.
    fb.maxOutstanding = 0;
    const h = await SmtpClient.open(d.port, { ehlo: false });
    assert.equal((await h.cmd('HELO client.example.net')).code, 250);
    assert.equal((await h.cmd('MAIL FROM:<h@example.org>')).text, '2.0.0 Ok');
    assert.equal((await h.cmd('RCPT TO:<b@example.com>')).code, 250);
    assert.equal((await h.cmd('QUIT')).code, 221);
    assert.equal(fb.maxOutstanding, 1, 'one command at a time after HELO');
    fb.maxOutstanding = 0;
    fb.commands.length = 0;
    await session(eager.port, false);
    assert.equal(fb.maxOutstanding, 1, 'deferMail: false waits for each reply');
    assert.ok(fb.commands.includes('MAIL FROM:<gone@example.org>'));
    assert.equal(fb.messages.length, 2);
  } finally {
    await eager.stop();
    await d.stop();
    await fb.close();
  }
});

test('a sender the backend refuses at MAIL (smtpd_delay_reject = no): the deferred MAIL\'s refusal answers each RCPT, nothing is delivered, the session goes on; Postfix never sees improper pipelining', async () => {
  const strict = await startPostfix({
    relayPort: sink.port,
    main: [
      'smtpd_delay_reject = no',
      'smtpd_sender_restrictions = check_sender_access inline:{spammer@example.org=REJECT}',
      // Postfix 3.9's default (3.7.6+ has it): a client that pipelines where it may not is dropped.
      'smtpd_forbid_unauth_pipelining = yes',
    ],
  });
  const d = await startDoorman({ backendPort: strict.port });
  const eager = await startDoorman({ backendPort: strict.port, config: 'backend:\n  deferMail: false\n' });
  try {
    const c = await SmtpClient.open(d.port);
    assert.equal((await c.cmd('MAIL FROM:<spammer@example.org>')).code, 250);
    for (const rcpt of ['one@example.com', 'two@example.com']) {
      const r = await c.cmd(`RCPT TO:<${rcpt}>`);
      assert.equal(r.code, 554, r.text);
      assert.match(r.text, /^5\.7\.1 <spammer@example\.org>: Sender address rejected: Access denied/);
    }
    assert.equal((await c.cmd('DATA')).code, 554);
    assert.equal((await c.cmd('RSET')).code, 250);
    assert.equal((await c.message({ from: 'fine@example.org', to: 'one@example.com', body: 'Subject: fine\r\n\r\nbody\r\n' })).code, 250);
    assert.equal((await c.cmd('QUIT')).code, 221);
    await sink.bySender('fine@example.org');
    assert.equal(sink.messages().filter((m) => m.mail.includes('spammer@example.org')).length, 0);
    // The session log keeps the backend's answer to the MAIL, not doorman's 250.
    const [line] = await d.waitSessions(1);
    assert.deepEqual(
      (line?.transactions as { mail: number }[]).map((t) => t.mail),
      [554, 250],
    );
    // deferMail: false: the refusal comes at MAIL.
    const e = await SmtpClient.open(eager.port);
    const m = await e.cmd('MAIL FROM:<spammer@example.org>');
    assert.equal(m.code, 554);
    assert.match(m.text, /Sender address rejected/);
    e.close();
    // A HELO session: no PIPELINING was offered to it, so nothing goes pipelined.
    const h = await SmtpClient.open(d.port, { ehlo: false });
    assert.equal((await h.cmd('HELO old.example.net')).code, 250);
    assert.equal((await h.message({ from: 'helo@example.org', to: 'one@example.com', body: 'Subject: helo\r\n\r\nbody\r\n' })).code, 250);
    assert.equal((await h.cmd('QUIT')).code, 221);
    await sink.bySender('helo@example.org');
    assert.doesNotMatch(strict.log(), /improper command pipelining/);
  } finally {
    await eager.stop();
    await d.stop();
    await strict.stop();
  }
});
