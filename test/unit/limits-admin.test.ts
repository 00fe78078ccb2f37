/**
 * Who the running instance's /limits/ answers (src/store/admin.ts): the parts an integration test
 * on loopback cannot reach — a client from another host, IPv4-mapped addresses, Host headers —
 * and the human durations of `doorman limits show` (src/cli-limits.ts).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { instanceAddress, isLiteralHost, isLocalClient } from '../../src/store/admin.js';
import { duration } from '../../src/cli-limits.js';

test('only clients on this machine: loopback, or the connection to one of its own addresses', () => {
  assert.equal(isLocalClient('127.0.0.1', '127.0.0.1'), true);
  assert.equal(isLocalClient('127.0.0.9', '0.0.0.0'), true, 'all of 127/8');
  assert.equal(isLocalClient('::1', '::1'), true);
  assert.equal(isLocalClient('::ffff:127.0.0.1', '::ffff:127.0.0.1'), true, 'IPv4-mapped on a dual-stack listener');
  assert.equal(isLocalClient('192.0.2.10', '192.0.2.10'), true, 'this host to its own interface address');
  assert.equal(isLocalClient('192.0.2.77', '192.0.2.10'), false, 'another host');
  assert.equal(isLocalClient('::ffff:192.0.2.77', '::ffff:192.0.2.10'), false);
  assert.equal(isLocalClient('2001:db8::7', '2001:db8::1'), false);
  assert.equal(isLocalClient('128.0.0.1', '10.0.0.1'), false);
  assert.equal(isLocalClient(undefined, '127.0.0.1'), false, 'a socket already closed');
});

test('Host: localhost or an IP literal, never a name a page could rebind', () => {
  for (const h of ['localhost', 'LOCALHOST:9725', '127.0.0.1', '127.0.0.1:9725', '[::1]:9725', '[::1]', '192.0.2.10:9725']) assert.equal(isLiteralHost(h), true, h);
  for (const h of [undefined, '', 'attacker.example', 'attacker.example:9725', 'localhost.attacker.example', '127.0.0.1.nip.io', '[::1', '::1:9725x']) assert.equal(isLiteralHost(h), false, String(h));
});

test('a wildcard metrics listener is asked on loopback', () => {
  assert.deepEqual(instanceAddress({ host: '0.0.0.0', port: 9725 }), { host: '127.0.0.1', port: 9725 });
  assert.deepEqual(instanceAddress({ host: '::', port: 9725 }), { host: '::1', port: 9725 });
  assert.deepEqual(instanceAddress({ host: '192.0.2.10', port: 9725 }), { host: '192.0.2.10', port: 9725 });
});

test('durations for people, rounded up to the second', () => {
  assert.deepEqual(
    [1, 1000, 1001, 119_000, 120_000, 200_000, 3_599_000, 3_600_000, 90_000_000, 3_024_000_000].map(duration),
    ['1 s', '1 s', '2 s', '119 s', '2 min', '3 min 20 s', '59 min 59 s', '1 h', '25 h', '35 days'],
  );
});
