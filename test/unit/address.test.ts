import { test } from 'node:test';
import assert from 'node:assert/strict';
import { addressOf, parsePath } from '../../src/protocol/address.js';
import { parseMailRcpt, formatMailRcpt } from '../../src/protocol/params.js';

const ok = (raw: string) => {
  const r = parsePath(raw);
  if (!r.ok) throw new Error(`${raw}: ${r.reason}`);
  return r.path;
};

test('domains are normalised: case and one trailing dot', () => {
  assert.equal(ok('User@Example.COM.').domain, 'example.com');
  assert.equal(addressOf(ok('User@Example.COM.')), 'User@example.com');
});

test('quoted local parts keep their content; @ inside quotes is not a separator', () => {
  const p = ok('"relaytest@domain"@example.com');
  assert.equal(p.quoted, true);
  assert.equal(p.local, 'relaytest@domain');
  assert.equal(p.domain, 'example.com');
  assert.equal(ok('"a\\"b"@x.example').local, 'a"b');
});

test('source routes are recognised and kept apart (RFC 5321 §3.6.1)', () => {
  const p = ok('@relay1.example,@Relay2.example:user@final.example');
  assert.deepEqual(p.route, ['relay1.example', 'relay2.example']);
  assert.equal(p.domain, 'final.example');
});

test('address literals: IPv4 and IPv6', () => {
  assert.equal(ok('u@[192.0.2.1]').literal, '192.0.2.1');
  assert.equal(ok('u@[IPv6:2001:DB8::1]').literal, '2001:db8::1');
  assert.equal(ok('u@[IPv6:2001:DB8::1]').domain, '[ipv6:2001:db8::1]');
});

test('the null path and bad paths', () => {
  assert.equal(ok('').isNull, true);
  for (const bad of ['@', 'a@', '@x:', 'a b@c.example', '"unterminated@x', 'a@b..c', 'x'.repeat(65) + '@a.example', 'a@\x01.example']) {
    assert.equal(parsePath(bad).ok, false, bad);
  }
});

test('UTF-8 is flagged (needs SMTPUTF8)', () => {
  assert.equal(ok('jörg@example.com').utf8, true);
  assert.equal(ok('j@example.com').utf8, false);
});

test('MAIL/RCPT arguments: path, parameters, tolerant space after the colon', () => {
  const m = parseMailRcpt('FROM: <a@b.example> SIZE=100 BODY=8BITMIME', 'FROM');
  assert.ok(m.ok);
  if (m.ok) {
    assert.deepEqual(m.params, [{ key: 'SIZE', value: '100' }, { key: 'BODY', value: '8BITMIME' }]);
    assert.equal(formatMailRcpt('MAIL FROM', m.path, m.params), 'MAIL FROM:<a@b.example> SIZE=100 BODY=8BITMIME');
  }
  assert.equal(parseMailRcpt('FROM:<a@b.example>SIZE=1', 'FROM').ok, false);
  assert.equal(parseMailRcpt('TO:<>', 'TO').ok, false);
  assert.equal(parseMailRcpt('TO:<a@b.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@b.example', 'TO').ok, true);
  assert.equal(parseMailRcpt('FROM:<a@b.example> X=\x7f', 'FROM').ok, false);
});
