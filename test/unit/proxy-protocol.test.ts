import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseProxyHeader, proxyHeaderV1, proxyHeaderV2, type ProxiedAddress } from '../../src/backend/proxy-protocol.js';

const v4: ProxiedAddress = { address: '192.0.2.1', port: 1234, family: 4, destAddress: '198.51.100.2', destPort: 25, destFamily: 4 };
const v6: ProxiedAddress = { address: '2001:db8::1', port: 1234, family: 6, destAddress: '2001:db8::25', destPort: 25, destFamily: 6 };

test('v1 and v2 headers round-trip, with bytes after the header left alone', () => {
  for (const a of [v4, v6]) {
    for (const h of [Buffer.from(proxyHeaderV1(a)), proxyHeaderV2(a)]) {
      const r = parseProxyHeader(Buffer.concat([h, Buffer.from('EHLO x\r\n')]));
      assert.equal(r.state, 'done');
      if (r.state === 'done') {
        assert.deepEqual(r.address, a);
        assert.equal(r.consumed, h.length);
      }
    }
  }
  assert.equal(proxyHeaderV1(v4), 'PROXY TCP4 192.0.2.1 198.51.100.2 1234 25\r\n');
});

test('incomplete headers wait; IPv4-mapped sources are unwrapped', () => {
  const h = proxyHeaderV2(v4);
  assert.equal(parseProxyHeader(h.subarray(0, 10)).state, 'incomplete');
  assert.equal(parseProxyHeader(Buffer.from('PROXY TCP4 1.2')).state, 'incomplete');
  const r = parseProxyHeader(Buffer.from('PROXY TCP6 ::ffff:192.0.2.9 ::ffff:192.0.2.10 5 25\r\n'));
  assert.equal(r.state === 'done' && r.address?.address, '192.0.2.9');
});

test('LOCAL and UNKNOWN mean: use the real peer', () => {
  const local = Buffer.from(proxyHeaderV2(v4));
  local[12] = 0x20;
  const r = parseProxyHeader(local);
  assert.equal(r.state === 'done' && r.address, null);
  const u = parseProxyHeader(Buffer.from('PROXY UNKNOWN\r\n'));
  assert.equal(u.state === 'done' && u.address, null);
});

test('garbage and oversize headers are errors', () => {
  for (const bad of ['EHLO x\r\n', 'PROXY TCP4 1.2.3.4 5.6.7.8 99999 25\r\n', 'PROXY TCP4 ::1 5.6.7.8 1 25\r\n', 'PROXY TCP4 ' + 'x'.repeat(200)]) {
    assert.equal(parseProxyHeader(Buffer.from(bad)).state, 'error', bad);
  }
  const big = Buffer.from(proxyHeaderV2(v4));
  big.writeUInt16BE(5000, 14);
  assert.equal(parseProxyHeader(big).state, 'error');
});
