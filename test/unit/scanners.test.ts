/**
 * The content scanners' answers as the rules read them (clamd, spamd, rspamd), the envelope rspamd
 * is sent, and the settings schemas. Over the real daemons: test/integration/content-scanners.test.ts.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { clamavRule, clamdVerdict } from '../../src/rules/clamav.js';
import { parseSpamd, spamassassinRule, spamdVerdict } from '../../src/rules/spamassassin.js';
import { rspamdHeaders, rspamdRule, rspamdVerdict } from '../../src/rules/rspamd.js';
import { pathOf, snapshot } from '../helpers/rule-fixtures.js';

const reply554 = (virus: string) => ({ code: 554, enhanced: '5.7.1', text: `virus ${virus}` });

test('clamd: FOUND names the signature, OK is clean, ERROR and anything else are errors', () => {
  const v = clamdVerdict('stream: Eicar-Test-Signature.UNOFFICIAL FOUND\0', reply554);
  assert.equal(v.result, 'virus');
  assert.deepEqual(v.finding, { kind: 'reject', reason: 'clamav: Eicar-Test-Signature.UNOFFICIAL', reply: reply554('Eicar-Test-Signature.UNOFFICIAL') });
  assert.deepEqual(clamdVerdict('stream: OK', reply554), { result: 'clean', finding: { kind: 'pass' } });
  assert.throws(() => clamdVerdict('INSTREAM size limit exceeded. ERROR', reply554), /clamd: INSTREAM size limit exceeded\. ERROR/);
  assert.throws(() => clamdVerdict('', reply554), /clamd: no answer/);
  // A signature name with control characters is echoed printable.
  assert.equal((clamdVerdict('stream: Bad\x07Name FOUND', reply554).finding as { reason: string }).reason, 'clamav: Bad?Name');
});

test('spamd: the Spam header and the rules; thresholds for tag and reject', () => {
  const a = parseSpamd('SPAMD/1.1 0 EX_OK\r\nContent-length: 20\r\nSpam: True ; 1003.3 / 5.0\r\n\r\nGTUBE,MISSING_DATE');
  assert.deepEqual(a, { score: 1003.3, required: 5, symbols: ['GTUBE', 'MISSING_DATE'] });
  assert.throws(() => parseSpamd('SPAMD/1.1 76 Bad header line: x\r\n\r\n'), /spamd: error 76/);
  assert.throws(() => parseSpamd('HTTP/1.1 200 OK\r\n\r\n'), /unexpected answer/);
  assert.throws(() => parseSpamd('SPAMD/1.1 0 EX_OK\r\n\r\n'), /no Spam header/);
  const r = { code: 550, enhanced: '5.7.1', text: 'spam' };
  const th = { tagScore: null, rejectScore: 10 };
  assert.equal(spamdVerdict(a, th, r).result, 'reject');
  assert.match((spamdVerdict(a, th, r).finding as { reason: string }).reason, /^spamassassin: score 1003\.3\/5; GTUBE,MISSING_DATE$/);
  assert.equal(spamdVerdict({ score: 6, required: 5, symbols: [] }, th, r).result, 'tag', "over spamd's required score");
  assert.equal(spamdVerdict({ score: 4, required: 5, symbols: [] }, th, r).result, 'clean');
  assert.equal(spamdVerdict({ score: 4, required: 5, symbols: [] }, { tagScore: 3, rejectScore: null }, r).result, 'tag');
  assert.equal(spamdVerdict({ score: 1000, required: 5, symbols: [] }, { tagScore: 3, rejectScore: null }, r).result, 'tag', 'rejectScore null: never refused');
});

test('rspamd: actions mapped; its own message in the reply; symbols by weight in the reason', () => {
  const s = { reply: '550 5.7.1 {message}', tempfailReply: '451 4.7.1 {message}', greylistReply: '451 4.7.1 Greylisted, try again later' };
  const answer = (action: string, messages: object = {}) =>
    JSON.stringify({ action, score: 15, required_score: 15, symbols: { A: { score: 0.5 }, BIG: { score: 9 }, NEG: { score: -3 } }, messages });
  const rej = rspamdVerdict(answer('reject', { smtp_message: 'Gtube pattern' }), s);
  assert.deepEqual(rej, {
    result: 'reject',
    finding: { kind: 'reject', reason: 'rspamd: reject, score 15.00/15.00; BIG(9.00),NEG(-3.00),A(0.50)', reply: { code: 550, enhanced: '5.7.1', text: 'Gtube pattern' } },
  });
  assert.equal((rspamdVerdict(answer('reject'), s).finding as { reply: { text: string } }).reply.text, 'Spam message rejected');
  assert.deepEqual((rspamdVerdict(answer('soft reject'), s).finding as { reply: object }).reply, { code: 451, enhanced: '4.7.1', text: 'Try again later' });
  assert.equal(rspamdVerdict(answer('greylist'), s).result, 'tempfail');
  assert.equal(rspamdVerdict(answer('add header'), s).result, 'tag');
  assert.equal(rspamdVerdict(answer('rewrite subject'), s).finding.kind, 'tag');
  assert.deepEqual(rspamdVerdict(answer('no action'), s), { result: 'clean', finding: { kind: 'pass' } });
  assert.throws(() => rspamdVerdict('<html>', s), /not JSON/);
  assert.throws(() => rspamdVerdict('{}', s), /no action/);
  assert.throws(() => rspamdVerdict(answer('discard'), s), /unknown action/);
});

test('rspamd: the envelope as request headers, one Rcpt per recipient', () => {
  const snap = snapshot({
    id: 'abc123',
    ip: '198.51.100.7',
    helo: 'mail.example.org',
    sender: pathOf('a@example.org'),
    recipients: [pathOf('u1@example.com'), pathOf('u2@example.com')],
    auth: { mechanism: 'PLAIN', login: 'alice' },
  });
  assert.deepEqual(rspamdHeaders(snap, 'mx.test'), {
    IP: '198.51.100.7',
    'Queue-Id': 'abc123',
    'MTA-Name': 'mx.test',
    Helo: 'mail.example.org',
    From: 'a@example.org',
    Rcpt: ['u1@example.com', 'u2@example.com'],
    User: 'alice',
  });
  assert.equal(rspamdHeaders(snapshot({ sender: pathOf('') }), 'mx').From, '<>', 'the null sender');
});

test('settings: defaults, and what the schemas refuse', () => {
  assert.deepEqual(clamavRule.settings.parse({}), { host: '127.0.0.1', port: 3310, socket: null, maxSize: 20 * 1024 * 1024, reply: '554 5.7.1 Message rejected: virus found: {virus}' });
  const sa = spamassassinRule.settings.parse({});
  assert.equal(sa.maxSize, 512_000);
  assert.equal(sa.port, 783);
  assert.equal(sa.rejectScore, 10);
  assert.equal(rspamdRule.settings.parse({}).port, 11333);
  assert.equal(spamassassinRule.settings.safeParse({ tagScore: 12, rejectScore: 10 }).success, false, 'tag above reject');
  assert.equal(clamavRule.settings.safeParse({ reply: '250 ok' }).success, false);
  assert.equal(rspamdRule.settings.safeParse({ port: 0 }).success, false);
  assert.equal(rspamdRule.settings.safeParse({ maxsize: 1 }).success, false, 'unknown keys');
});
