// The Postfix policy protocol as bytes (src/fronts/policy/protocol.ts), against the format of
// SMTPD_POLICY_README "Protocol description": name=value lines, an empty line ends a request,
// many requests per connection; the answer `action=…` and an empty line.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { actionKind, formatAnswer, PolicyReader, refusalAction, tagAction } from '../../src/fronts/policy/protocol.js';
import { reply } from '../../src/protocol/reply.js';

const BOUNDS = { maxLine: 100, maxAttributes: 5 };

// A request as Postfix 3.7 writes it (abridged), followed by a second one.
const REQ = 'request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.7\nsender=a@b.example\nrecipient=c=d@example.com\n\n';

test('a request is its attributes; a value may hold "=" and be empty; two requests in one chunk', () => {
  const r = new PolicyReader(BOUNDS);
  const { requests, error } = r.push(Buffer.from(REQ + 'request=smtpd_access_policy\nsender=\n\n'));
  assert.equal(error, null);
  assert.equal(requests.length, 2);
  assert.deepEqual([...(requests[0] ?? new Map())], [
    ['request', 'smtpd_access_policy'],
    ['protocol_state', 'RCPT'],
    ['client_address', '192.0.2.7'],
    ['sender', 'a@b.example'],
    ['recipient', 'c=d@example.com'],
  ]);
  assert.equal(requests[1]?.get('sender'), '');
});

test('a request split at every byte is read the same', () => {
  const r = new PolicyReader(BOUNDS);
  const got = [];
  for (const b of Buffer.from(REQ)) {
    const { requests, error } = r.push(Buffer.from([b]));
    assert.equal(error, null);
    got.push(...requests);
  }
  assert.equal(got.length, 1);
  assert.equal(got[0]?.get('recipient'), 'c=d@example.com');
  assert.equal(r.pending, 0);
});

test('CRLF line ends are read like LF (a person with telnet)', () => {
  const { requests } = new PolicyReader(BOUNDS).push(Buffer.from('request=smtpd_access_policy\r\nsender=x@y\r\n\r\n'));
  assert.equal(requests[0]?.get('sender'), 'x@y');
});

test('malformed input is an error, and nothing is read after it', () => {
  for (const [input, why] of [
    ['no equals sign\n', /name=value/],
    ['=value\n', /name=value/],
    ['Name=upper\n', /name=value/],
    ['\n', /empty request/],
    ['a=1\nb=2\nc=3\nd=4\ne=5\nf=6\n', /more than 5 attributes/],
    [`sender=${'x'.repeat(100)}\n`, /longer than 100/],
    ['sender=' + 'x'.repeat(200), /longer than 100/], // no LF yet: the line in progress is bounded too
  ] as const) {
    const r = new PolicyReader(BOUNDS);
    const res = r.push(Buffer.from(input));
    assert.match(res.error ?? '', why, JSON.stringify(input));
    assert.deepEqual(r.push(Buffer.from(REQ)).requests, [], 'nothing read after an error');
  }
});

test('requests before the malformed line are returned with the error', () => {
  const res = new PolicyReader(BOUNDS).push(Buffer.from(REQ + 'garbage\n'));
  assert.equal(res.requests.length, 1);
  assert.match(res.error ?? '', /name=value/);
});

test('a line of exactly maxLine octets is read', () => {
  const line = 'sender=' + 'x'.repeat(100 - 'sender='.length);
  const res = new PolicyReader(BOUNDS).push(Buffer.from(line + '\n\n'));
  assert.equal(res.error, null);
  assert.equal(res.requests[0]?.get('sender')?.length, 93);
});

test('answers byte for byte', () => {
  assert.deepEqual(formatAnswer('DUNNO'), Buffer.from('action=DUNNO\n\n'));
  assert.deepEqual(formatAnswer(refusalAction(reply(554, '5.7.1', '<x@other.example>: Relay access denied'))), Buffer.from('action=554 5.7.1 <x@other.example>: Relay access denied\n\n'));
  assert.deepEqual(formatAnswer(refusalAction(reply(450, '4.7.1', 'Error: too much mail, try again later'))), Buffer.from('action=DEFER_IF_PERMIT 4.7.1 Error: too much mail, try again later\n\n'));
  // A connect-stage 421 is a 4xx like the others: Postfix keeps its connection itself.
  assert.deepEqual(formatAnswer(refusalAction(reply(421, '4.7.0', 'try again later'))), Buffer.from('action=DEFER_IF_PERMIT 4.7.0 try again later\n\n'));
  assert.deepEqual(formatAnswer(tagAction('dnsbl; listed')), Buffer.from('action=PREPEND X-Doorman-Tag: dnsbl; listed\n\n'));
  // Multi-line replies on one line; a newline in the text can never end the answer early.
  assert.deepEqual(formatAnswer(refusalAction(reply(550, '5.7.1', ['one', 'two']))), Buffer.from('action=550 5.7.1 one two\n\n'));
  assert.deepEqual(formatAnswer('PREPEND X-A: a\n\naction=OK'), Buffer.from('action=PREPEND X-A: a  action=OK\n\n'));
  assert.deepEqual(formatAnswer(refusalAction(reply(550, '', 'no enhanced code'))), Buffer.from('action=550 no enhanced code\n\n'));
});

test('action kinds for the metric', () => {
  assert.equal(actionKind('DUNNO'), 'dunno');
  assert.equal(actionKind('554 5.7.1 x'), 'reject');
  assert.equal(actionKind('DEFER_IF_PERMIT 4.7.1 x'), 'defer');
  assert.equal(actionKind('PREPEND X-Doorman-Tag: a'), 'prepend');
});
