/**
 * SMTP smuggling (CVE-2023-51764 class): a client hides a second message behind a fake end of
 * data (`\n.\n`, `\r.\r`, `\n.\r\n`, `\r\n.\n`, `\r.\r\n`). Through doorman, the backend — here
 * Postfix 3.7, whose own defences are off by default — receives exactly one message, with the
 * would-be second message as its content. Under `bareNewline: reject` the message is refused
 * with 550 5.5.2 and nothing reaches the backend.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startDoorman, type Doorman } from '../helpers/doorman.js';
import { startPostfix, type Postfix } from '../helpers/postfix.js';
import { startSink, type Sink } from '../helpers/sink.js';
import { SmtpClient } from '../helpers/smtp.js';
import { sleep, useCleanup } from '../helpers/procs.js';

useCleanup();
let sink: Sink;
let postfix: Postfix;
let dm: Doorman;
let strict: Doorman;

before(async () => {
  sink = await startSink();
  postfix = await startPostfix({ relayPort: sink.port });
  dm = await startDoorman({ backendPort: postfix.port });
  strict = await startDoorman({ backendPort: postfix.port, config: 'limits:\n  bareNewline: reject\n' });
});
after(async () => {
  await dm?.stop();
  await strict?.stop();
  await postfix?.stop();
  await sink?.stop();
});

const VARIANTS: [string, string][] = [
  ['LF.LF', '\n.\n'],
  ['CR.CR', '\r.\r'],
  ['LF.CRLF', '\n.\r\n'],
  ['CRLF.LF', '\r\n.\n'],
  ['CR.CRLF', '\r.\r\n'],
  ['LF..LF (stuffed)', '\n..\n'],
];

/** One message with `seq` inside, then a second transaction's commands and text, then QUIT. */
async function smuggle(port: number, tag: string, seq: string) {
  const c = await SmtpClient.open(port);
  const body = `Subject: outer\r\n\r\nfirst part${seq}MAIL FROM:<smuggled-${tag}@example.org>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nSubject: smuggled\r\n\r\nspoofed\r\n`;
  const r = await c.message({ from: `outer-${tag}@example.org`, to: 'victim@example.com', body });
  return { r, after: await c.cmd('QUIT') };
}

for (const [name, seq] of VARIANTS) {
  const tag = name.replace(/\W+/g, '').toLowerCase();
  test(`${name}: exactly one message reaches the backend`, async () => {
    const { r, after } = await smuggle(dm.port, tag, seq);
    assert.equal(r.code, 250, r.raw);
    assert.equal(after.code, 221, 'the smuggled commands were not executed');
    const m = await sink.bySender(`outer-${tag}@example.org`);
    assert.match(m.body, new RegExp(`MAIL FROM:<smuggled-${tag}@example\\.org>`), 'the smuggled text is content');
    await sleep(500);
    assert.equal(sink.messages().filter((x) => x.mail.includes(`smuggled-${tag}`)).length, 0, 'no second message');
    assert.equal(postfix.log().includes(`smuggled-${tag}`), false, 'Postfix never saw a smuggled MAIL');
  });
}

test('bareNewline: reject refuses the message with 550 5.5.2; nothing is delivered', async () => {
  const { r } = await smuggle(strict.port, 'strict', '\n.\r\n');
  assert.equal(r.code, 550);
  assert.match(r.text, /^5\.5\.2 /);
  await sleep(500);
  assert.equal(sink.messages().filter((x) => x.mail.includes('strict')).length, 0);
  assert.ok((await strict.metric('doorman_protocol_violations_total', { kind: 'bare_lf' })) >= 1);
});

test('a command ended by a bare LF is accepted under normalize, refused under reject', async () => {
  const c = await SmtpClient.open(dm.port, { ehlo: false });
  c.write('NOOP\n');
  assert.equal((await c.reply()).code, 250);
  c.write('NOOP x\ry\r\n');
  assert.equal((await c.reply()).code, 500, 'bare CR inside a command');
  c.close();
  const s = await SmtpClient.open(strict.port, { ehlo: false });
  s.write('NOOP\n');
  const r = await s.reply();
  assert.equal(r.code, 500);
  assert.match(r.text, /^5\.5\.2 /);
  s.close();
});

test('control: the same attack sent to this Postfix directly does smuggle a second message', async () => {
  // Proves the backend is vulnerable, so the tests above show doorman's protection.
  const c = await SmtpClient.open(postfix.port);
  const body = 'Subject: outer\r\n\r\nfirst part\n.\r\nMAIL FROM:<smuggled-direct@example.org>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nSubject: smuggled\r\n\r\nspoofed\r\n';
  assert.equal((await c.message({ from: 'outer-direct@example.org', to: 'victim@example.com', body })).code, 250);
  c.close();
  const m = await sink.bySender('smuggled-direct@example.org');
  assert.match(m.body, /spoofed/);
});
