/**
 * protocol/auth-results.ts: the Authentication-Results header value of RFC 8601 (§2.2 syntax,
 * value quoting) and the authserv-id check of §5 that decides which incoming headers to remove.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { claimsAuthservId, formatAuthResults, formatPvalue, formatValue, type AuthResult } from '../../src/protocol/auth-results.js';

test('formatAuthResults: one resinfo per result, in order, separated by "; "', () => {
  const results: AuthResult[] = [
    { method: 'spf', result: 'pass', props: [['smtp.mailfrom', 'a@b.example']] },
    { method: 'dkim', result: 'pass', props: [['header.d', 'b.example'], ['header.i', '@b.example'], ['header.s', 'sel']] },
    { method: 'dmarc', result: 'pass', props: [['header.from', 'b.example']] },
  ];
  assert.equal(
    formatAuthResults('mx.example.com', results),
    'mx.example.com; spf=pass smtp.mailfrom=a@b.example; dkim=pass header.d=b.example header.i=@b.example header.s=sel; dmarc=pass header.from=b.example',
  );
  assert.equal(
    formatAuthResults('mx.example.com', results.slice(0, 2), { fold: true }),
    'mx.example.com;\r\n\tspf=pass smtp.mailfrom=a@b.example;\r\n\tdkim=pass header.d=b.example header.i=@b.example header.s=sel',
  );
});

test('formatAuthResults: no result is "none" (RFC 8601 §2.2 no-result)', () => {
  assert.equal(formatAuthResults('mx.example.com', []), 'mx.example.com; none');
});

test('reason and values: a token as is, anything else a quoted-string with \\ and " escaped', () => {
  const r: AuthResult = { method: 'dmarc', result: 'fail', reason: 'policy "reject"; a\\b', props: [['header.from', 'b.example']] };
  assert.equal(formatAuthResults('mx', [r]), 'mx; dmarc=fail reason="policy \\"reject\\"; a\\\\b" header.from=b.example');
  assert.equal(formatValue('pass'), 'pass');
  assert.equal(formatValue('two words'), '"two words"');
  assert.equal(formatValue('a;b'), '"a;b"');
  assert.equal(formatValue('a=b'), '"a=b"');
  // CR/LF cannot be quoted: a value never breaks the header.
  assert.equal(formatValue('x\r\nInjected: y'), '"x  Injected: y"');
});

test('pvalue: local-part@domain and @domain unquoted, other shapes quoted', () => {
  assert.equal(formatPvalue('user.name+tag@sub.example.org'), 'user.name+tag@sub.example.org');
  assert.equal(formatPvalue('@example.org'), '@example.org');
  assert.equal(formatPvalue('example.org'), 'example.org');
  assert.equal(formatPvalue('"odd local"@example.org'), '"\\"odd local\\"@example.org"');
  assert.equal(formatPvalue('a@b@c'), '"a@b@c"');
  assert.equal(formatPvalue('a@exa mple.org'), '"a@exa mple.org"');
  assert.equal(formatPvalue('192.0.2.1'), '192.0.2.1');
  assert.equal(formatPvalue('2001:db8::1'), '"2001:db8::1"');
});

test('authserv-id that is not a token is quoted; method and property names are sanitised', () => {
  assert.equal(formatAuthResults('mx example', [{ method: 'sp f', result: 'pa;ss', props: [['smtp.mail from', 'x']] }]), '"mx example"; spf=pass smtp.mailfrom=x');
});

test('claimsAuthservId: case-insensitive, after CFWS, token or quoted-string, whole id only', () => {
  assert.equal(claimsAuthservId('mx.example.com; dkim=pass', 'mx.example.com'), true);
  assert.equal(claimsAuthservId('MX.Example.COM; spf=pass', 'mx.example.com'), true);
  assert.equal(claimsAuthservId('  \r\n\t(a (nested) comment \\) still) mx.example.com 1; none', 'mx.example.com'), true);
  assert.equal(claimsAuthservId('"mx.example.com"; none', 'mx.example.com'), true);
  assert.equal(claimsAuthservId('mx.example.com.; none', 'mx.example.com'), true);
  assert.equal(claimsAuthservId('mx.example.com;dkim=pass', 'mx.example.com'), true);
  assert.equal(claimsAuthservId('mx.example.com(comment); none', 'mx.example.com'), true);
  assert.equal(claimsAuthservId('mx.example.com.evil.example; dkim=pass', 'mx.example.com'), false);
  assert.equal(claimsAuthservId('other.example; dkim=pass header.d=mx.example.com', 'mx.example.com'), false);
  assert.equal(claimsAuthservId('(mx.example.com) other.example; none', 'mx.example.com'), false);
  assert.equal(claimsAuthservId('', 'mx.example.com'), false);
  assert.equal(claimsAuthservId('(unclosed mx.example.com; none', 'mx.example.com'), false);
  assert.equal(claimsAuthservId('"mx.example.com; none', 'mx.example.com'), false);
});

test('formatAuthResults then claimsAuthservId: what doorman writes, it recognises as its own', () => {
  const v = formatAuthResults('MX.example.com', [{ method: 'spf', result: 'none', props: [] }]);
  assert.equal(claimsAuthservId(v, 'mx.example.com'), true);
});
