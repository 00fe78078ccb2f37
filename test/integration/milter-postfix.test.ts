/**
 * The milter server against a real Postfix (smtpd_milters = inet:127.0.0.1:PORT), relaying to an
 * smtp-sink: a tiny handler refuses one recipient with 550 5.7.1 and adds an
 * Authentication-Results field (index 0) and a tag field at end of message. The client must see
 * the refusal, the sink the fields; with the milter stopped Postfix applies
 * milter_default_action (accept here) and the mail goes through untouched.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { serveMilter, type MilterHandler, type MilterMacros, type MilterVerdict, type EomResult, type MilterEnd } from '../../src/fronts/milter/server.js';
import { startPostfix, type Postfix } from '../helpers/postfix.js';
import { startSink, type Sink } from '../helpers/sink.js';
import { SmtpClient } from '../helpers/smtp.js';
import { freePort } from '../helpers/net.js';
import { eventually, trackCloser, useCleanup } from '../helpers/procs.js';

useCleanup();
let sink: Sink;
let postfix: Postfix;
let milter: net.Server;
let milterPort: number;
/** What each milter session saw (startPostfix's port probe is a session of its own). */
const sessions: string[][] = [];
const ends: MilterEnd[] = [];
const sockets = new Set<net.Socket>();
/** Stops listening and drops open milter connections (Postfix's smtpd may still hold one). */
const stopMilter = () =>
  new Promise<void>((r) => {
    for (const s of sockets) s.destroy();
    if (milter.listening) milter.close(() => r());
    else r();
  });

const CONTINUE: MilterVerdict = { kind: 'continue' };

class TestHandler implements MilterHandler {
  private readonly seen: string[] = [];
  constructor() {
    sessions.push(this.seen);
  }
  private headers = 0;
  private bodyBytes = 0;
  async connect(info: { address: string }, m: MilterMacros) {
    this.seen.push(`connect ${info.address} client_addr=${m.get('client_addr')} daemon=${m.get('daemon_name') !== undefined}`);
    return CONTINUE;
  }
  async helo(name: string) {
    this.seen.push(`helo ${name}`);
    return CONTINUE;
  }
  async mail(sender: string, _args: readonly string[], m: MilterMacros) {
    this.seen.push(`mail ${sender} mail_addr=${m.get('mail_addr')}`);
    return CONTINUE;
  }
  async rcpt(r: string): Promise<MilterVerdict> {
    this.seen.push(`rcpt ${r}`);
    if (r === '<refused@example.com>') return { kind: 'reject', code: 550, enhanced: '5.7.1', text: 'Recipient refused by the milter test' };
    // No enhanced code: the codec adds 4.0.0 (Postfix 3.7 would pass on a bare "451 Try later").
    if (r === '<later@example.com>') return { kind: 'tempfail', code: 451, text: 'Try later' };
    return CONTINUE;
  }
  async data() {
    return CONTINUE;
  }
  header() {
    this.headers++;
  }
  async eoh() {
    return CONTINUE;
  }
  body(chunk: Buffer) {
    this.bodyBytes += chunk.length;
  }
  async eom(m: MilterMacros): Promise<EomResult> {
    this.seen.push(`eom headers=${this.headers} body=${this.bodyBytes} queue_id=${m.get('i') ? 'yes' : 'no'}`);
    this.headers = 0;
    this.bodyBytes = 0;
    return {
      verdict: CONTINUE,
      addHeaders: [
        { name: 'Authentication-Results', value: 'doorman.test; spf=pass smtp.mailfrom=example.org', index: 0 },
        { name: 'X-Doorman-Tag', value: 'milter-test' },
      ],
    };
  }
  abort() {
    this.headers = 0;
    this.bodyBytes = 0;
  }
  close() {}
}

before(async () => {
  sink = await startSink();
  milterPort = await freePort();
  milter = net.createServer((s) => {
    sockets.add(s);
    void serveMilter(s, () => new TestHandler()).done.then((e) => ends.push(e));
  });
  await new Promise<void>((r) => milter.listen(milterPort, '127.0.0.1', r));
  trackCloser(stopMilter);
  postfix = await startPostfix({
    relayPort: sink.port,
    main: [`smtpd_milters = inet:127.0.0.1:${milterPort}`, 'milter_default_action = accept', 'milter_command_timeout = 10s'],
  });
});
after(async () => {
  await postfix?.stop();
  await sink?.stop();
  await stopMilter();
});

const BODY = 'From: <sender@example.org>\r\nSubject: milter test\r\n\r\nHello through the milter.\r\n';
const BODY2 = 'From: <second@example.org>\r\nSubject: second\r\n\r\nSecond.\r\n';

test('Postfix: the milter refuses and tempfails recipients with its own replies and adds header fields', async () => {
  const c = await SmtpClient.open(postfix.port, { ehlo: 'client.example.net' });
  const mail = await c.cmd('MAIL FROM:<sender@example.org>');
  assert.equal(mail.code, 250, mail.raw);
  const refused = await c.cmd('RCPT TO:<refused@example.com>');
  assert.equal(refused.code, 550, refused.raw);
  assert.match(refused.raw, /^550 5\.7\.1 Recipient refused by the milter test/);
  const later = await c.cmd('RCPT TO:<later@example.com>');
  assert.match(later.raw, /^451 4\.0\.0 Try later/);
  const ok = await c.cmd('RCPT TO:<ok@example.com>');
  assert.equal(ok.code, 250, ok.raw);
  const data = await c.cmd('DATA');
  assert.equal(data.code, 354, data.raw);
  c.write(BODY + '.\r\n');
  const end = await c.reply(15_000);
  assert.equal(end.code, 250, end.raw);
  // A second message in the same SMTP session, so on the same milter connection.
  const end2 = await c.message({ from: 'second@example.org', to: 'ok2@example.com', body: BODY2 });
  assert.equal(end2.code, 250, end2.raw);
  await c.cmd('QUIT');
  c.close();
  const msg2 = await sink.bySender('second@example.org', 15_000);
  assert.match(msg2.body, /^X-Doorman-Tag: milter-test$/m);
  assert.match(msg2.body, /^Authentication-Results: doorman\.test; spf=pass/m);
  const msg = await sink.bySender('sender@example.org', 15_000);
  assert.equal(msg.rcpts.length, 1, msg.rcpts.join(' '));
  assert.match(msg.rcpts[0]!, /^<ok@example\.com>/);
  const head = msg.body.split('\n\n')[0]!;
  const lines = head.split('\n');
  const ar = lines.findIndex((l) => l.startsWith('Authentication-Results: doorman.test; spf=pass'));
  const from = lines.findIndex((l) => l.startsWith('From:'));
  assert.ok(ar >= 0, head);
  assert.ok(ar < from, `Authentication-Results above the message's own fields:\n${head}`);
  assert.ok(lines.includes('X-Doorman-Tag: milter-test'), head);
  const seen = sessions.find((x) => x.some((l) => l.startsWith('mail ')))!;
  assert.deepEqual(
    seen.filter((s) => !s.startsWith('eom')),
    [
      'connect 127.0.0.1 client_addr=127.0.0.1 daemon=true',
      'helo client.example.net',
      'mail <sender@example.org> mail_addr=sender@example.org',
      'rcpt <refused@example.com>',
      'rcpt <later@example.com>',
      'rcpt <ok@example.com>',
      'mail <second@example.org> mail_addr=second@example.org',
      'rcpt <ok2@example.com>',
    ],
  );
  // Each message's own header fields and body: the handler starts afresh after end of message.
  const eoms = seen.filter((s) => s.startsWith('eom'));
  assert.equal(eoms.length, 2, eoms.join('\n'));
  assert.match(eoms[0]!, new RegExp(`^eom headers=[1-9]\\d* body=${Buffer.byteLength('Hello through the milter.\r\n')} queue_id=yes$`));
  assert.match(eoms[1]!, new RegExp(`^eom headers=[1-9]\\d* body=${Buffer.byteLength('Second.\r\n')} queue_id=yes$`));
  // Postfix ends the milter connection with QUIT at the end of the SMTP session.
  await eventually(() => ends.length === sessions.length, 5000);
  assert.deepEqual(ends, sessions.map(() => 'quit'));
});

test('Postfix: with the milter down, milter_default_action = accept lets mail through untouched', async () => {
  await stopMilter();
  const c = await SmtpClient.open(postfix.port, { ehlo: 'client.example.net' });
  const end = await c.message({ from: 'nomilter@example.org', to: 'refused@example.com', body: BODY });
  assert.equal(end.code, 250, end.raw);
  await c.cmd('QUIT');
  c.close();
  const msg = await sink.bySender('nomilter@example.org', 15_000);
  assert.ok(!msg.body.includes('X-Doorman-Tag'), msg.body);
  assert.match(postfix.log(), /connect to Milter service inet:127\.0\.0\.1:\d+: Connection refused/);
});
