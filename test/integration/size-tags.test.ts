/**
 * The SIZE doorman advertises leaves room for the X-Doorman-Tag headers it adds: a message that
 * fits doorman's SIZE also fits the backend's (Postfix message_size_limit) with them, so the
 * client never gets the backend's 552 for bytes it did not send.
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
let dm: Doorman;

/** Postfix's message_size_limit (and the SIZE it advertises). */
const BACKEND_SIZE = 100_000;
/** Tags every message to tagged.example: doorman adds an X-Doorman-Tag header to it. */
const TAG_RULE = `rule: access
action: tag
settings:
  recipients:
    - deny: "@tagged.example"
      reason: tagged
`;

before(async () => {
  sink = await startSink();
  postfix = await startPostfix({ relayPort: sink.port, domains: ['example.com', 'tagged.example'], main: [`message_size_limit = ${BACKEND_SIZE}`] });
  dm = await startDoorman({ backendPort: postfix.port, rules: { 'tag.yaml': TAG_RULE } });
});
after(async () => {
  await dm?.stop();
  await postfix?.stop();
  await sink?.stop();
});

/** A message of exactly `octets` octets as counted for SIZE (CRLF line ends, no stuffing needed). */
function messageOf(octets: number, subject: string): string {
  const head = `Subject: ${subject}\r\n\r\n`;
  const line = 'x'.repeat(76) + '\r\n';
  let body = '';
  while (head.length + body.length + line.length <= octets) body += line;
  const rest = octets - head.length - body.length;
  if (rest >= 2) body += 'y'.repeat(rest - 2) + '\r\n';
  const text = head + body;
  assert.equal(text.length, octets);
  return text;
}

test('a tagged message of exactly the advertised SIZE reaches a backend with a small message_size_limit', async () => {
  const c = await SmtpClient.open(dm.port);
  const size = Number(c.keywords.get('SIZE'));
  assert.ok(size > 0 && size <= BACKEND_SIZE);
  const r = await c.message({ from: 'fits@example.org', params: `SIZE=${size}`, to: 'user@tagged.example', body: messageOf(size, 'fits') });
  c.close();
  assert.equal(r.code, 250, `a message of the advertised SIZE ${size}: ${r.raw}`);
  const m = await sink.bySender('fits@example.org');
  assert.match(m.body, /^X-Doorman-Tag: tag; tagged$/m);
});

test('one octet over the advertised SIZE: 552 5.3.4 from doorman, nothing delivered', async () => {
  const c = await SmtpClient.open(dm.port);
  const size = Number(c.keywords.get('SIZE'));
  const over = await c.cmd(`MAIL FROM:<over@example.org> SIZE=${size + 1}`);
  assert.equal(over.code, 552, over.raw);
  assert.match(over.text, /^5\.3\.4 /);
  c.close();
  // Without SIZE= the data is counted: refused after the data, never sent to the backend.
  const c2 = await SmtpClient.open(dm.port);
  const r = await c2.message({ from: 'over2@example.org', to: 'user@tagged.example', body: messageOf(size + 1, 'over') });
  assert.equal(r.code, 552, r.raw);
  assert.match(r.text, /^5\.3\.4 /);
  c2.close();
  assert.equal(sink.messages().filter((m) => m.mail.startsWith('<over2@example.org>')).length, 0);
});
