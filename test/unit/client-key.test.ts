/**
 * The key a client is counted under for maxClientsPerIp (src/net/ip.ts clientKey): an IPv4
 * address, an IPv6 network of limits.clientIpv6Prefix bits (a host usually holds a /64), and an
 * IPv4-mapped IPv6 address as the IPv4 address it wraps.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { clientKey, parseAddress } from '../../src/net/ip.js';

const key = (a: string, bits = 64) => clientKey(parseAddress(a), bits);

test('IPv6 addresses of one /64 share a key; another /64 has its own', () => {
  assert.equal(key('2001:db8:1:2::1'), '2001:db8:1:2::/64');
  assert.equal(key('2001:db8:1:2:ffff:ffff:ffff:ffff'), '2001:db8:1:2::/64');
  assert.equal(key('2001:db8:1:2:a:b:c:d'), key('2001:db8:1:2::99'));
  assert.notEqual(key('2001:db8:1:3::1'), key('2001:db8:1:2::1'));
});

test('other prefix lengths, including ones not on a byte boundary, and 128 = per address', () => {
  assert.equal(key('2001:db8:1:2::1', 48), '2001:db8:1::/48');
  assert.equal(key('2001:db8:1:2ff::1', 56), '2001:db8:1:200::/56');
  assert.equal(key('2001:db8:1:2ff::1', 60), '2001:db8:1:2f0::/60');
  assert.equal(key('2001:db8::5', 128), '2001:db8::5');
});

test('IPv4 is per address, also when it arrives IPv4-mapped on a dual-stack socket', () => {
  assert.equal(key('192.0.2.7'), '192.0.2.7');
  assert.equal(key('::ffff:192.0.2.7'), '192.0.2.7');
  assert.notEqual(key('192.0.2.7'), key('192.0.2.8'));
});
