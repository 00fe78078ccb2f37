/**
 * The in-memory store's bucket maths with a virtual clock (the Redis scripts implement the same
 * steps; the integration tests run them against a real Redis).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { limitView, MemoryStore } from '../../src/store/store.js';
import { clientKey } from '../../src/rules/shared.js';
import { parseAddress } from '../../src/net/ip.js';

function clock(start = 1_000_000) {
  let t = start;
  return { now: () => t, advance: (ms: number) => (t += ms) };
}

test('GCRA: N per window in a burst, then one every window/N; a refusal costs nothing', async () => {
  const c = clock();
  const s = new MemoryStore(c.now);
  const results = [];
  for (let i = 0; i < 4; i++) results.push(await s.rate('k', 60_000, 3, 1));
  assert.deepEqual(results.map((r) => r.allowed), [true, true, true, false]);
  assert.deepEqual(results.map((r) => r.remaining), [2, 1, 0, 0]);
  assert.equal(results[3]?.retryAfterMs, 20_000);
  c.advance(19_999);
  assert.equal((await s.rate('k', 60_000, 3, 1)).allowed, false);
  c.advance(1);
  assert.equal((await s.rate('k', 60_000, 3, 1)).allowed, true, 'one token back after window/limit');
  c.advance(60_000);
  assert.equal((await s.rate('k', 60_000, 3, 1)).remaining, 2, 'full again after a window');
});

test('a cost larger than the tokens left is refused whole', async () => {
  const s = new MemoryStore(clock().now);
  assert.equal((await s.rate('k', 1000, 5, 3)).allowed, true);
  assert.equal((await s.rate('k', 1000, 5, 3)).allowed, false);
  assert.equal((await s.rate('k', 1000, 5, 2)).allowed, true);
});

test('a refund (negative cost) gives a token back, never beyond a full bucket', async () => {
  const c = clock();
  const s = new MemoryStore(c.now);
  for (let i = 0; i < 3; i++) await s.rate('k', 60_000, 3, 1);
  assert.equal((await s.rate('k', 60_000, 3, 1)).allowed, false);
  assert.equal((await s.rate('k', 60_000, 3, -1)).remaining, 1);
  assert.equal((await s.rate('k', 60_000, 3, 1)).allowed, true, 'the refunded token is spent again');
  assert.equal((await s.rate('k', 60_000, 3, 1)).allowed, false);
  for (let i = 0; i < 5; i++) await s.rate('k', 60_000, 3, -1);
  assert.equal((await s.inspect('k')).state, null, 'a full bucket is forgotten');
  const burst = [];
  for (let i = 0; i < 4; i++) burst.push((await s.rate('k', 60_000, 3, 1)).allowed);
  assert.deepEqual(burst, [true, true, true, false], 'refunds never raise the burst above the limit');
});

test('concurrency slots: limit, release, expiry, idempotent acquire', async () => {
  const c = clock();
  const s = new MemoryStore(c.now);
  assert.equal((await s.acquire('c', 'a', 2, 1000)).ok, true);
  assert.equal((await s.acquire('c', 'a', 2, 1000)).inUse, 1, 'same token twice is one slot');
  assert.equal((await s.acquire('c', 'b', 2, 1000)).ok, true);
  assert.equal((await s.acquire('c', 'x', 2, 1000)).ok, false);
  await s.release('c', 'a');
  assert.equal((await s.acquire('c', 'x', 2, 1000)).ok, true);
  c.advance(1001);
  assert.equal((await s.acquire('c', 'y', 2, 1000)).inUse, 1, 'expired slots free themselves');
});

test('greylist: grey, too early, passed, then remembered', async () => {
  const c = clock();
  const s = new MemoryStore(c.now);
  assert.deepEqual(await s.greylist('t', 300, 1000, 5000), { passed: false, waitMs: 300, firstAttempt: true });
  c.advance(100);
  assert.deepEqual(await s.greylist('t', 300, 1000, 5000), { passed: false, waitMs: 200, firstAttempt: false });
  c.advance(200);
  assert.equal((await s.greylist('t', 300, 1000, 5000)).passed, true);
  c.advance(4000);
  assert.equal((await s.greylist('t', 300, 1000, 5000)).passed, true, 'within its lifetime');
});

test('client keys: IPv6 grouped by prefix, IPv4 by address unless told otherwise', () => {
  assert.equal(clientKey(parseAddress('2001:db8:1:2:aaaa::1'), 32, 64), '2001:db8:1:2::/64');
  assert.equal(clientKey(parseAddress('2001:db8:1:2:ffff::9'), 32, 64), '2001:db8:1:2::/64');
  assert.equal(clientKey(parseAddress('192.0.2.77'), 32, 64), '192.0.2.77');
  assert.equal(clientKey(parseAddress('192.0.2.77'), 24, 64), '192.0.2.0/24');
  assert.equal(clientKey(parseAddress('::ffff:192.0.2.77'), 24, 64), '192.0.2.0/24', 'IPv4-mapped unwrapped');
});

test('limitView reads a bucket with the same arithmetic that charges it: used, remaining, next allowed, expiry', async () => {
  const c = clock();
  const s = new MemoryStore(c.now);
  const spec = { kind: 'rate', limit: 3, windowMs: 60_000 } as const;
  const view = async () => limitView(spec, await s.inspect('k'));
  assert.deepEqual(await view(), { kind: 'rate', now: 1_000_000, limit: 3, windowMs: 60_000, used: 0, remaining: 3, nextAllowedInMs: 0, nextAllowedAt: 1_000_000, fullAt: 1_000_000, expiresAt: null }, 'no key: a full bucket');
  await s.rate('k', 60_000, 3, 1);
  await s.rate('k', 60_000, 3, 1);
  c.advance(1_000);
  const two = await view();
  assert.deepEqual([two.kind === 'rate' && two.used, two.kind === 'rate' && two.remaining, two.kind === 'rate' && two.nextAllowedInMs], [2, 1, 0]);
  assert.equal(two.expiresAt, 1_040_000, 'the key expires when the bucket is full again');
  await s.rate('k', 60_000, 3, 1);
  c.advance(1_000);
  const three = await view();
  assert.ok(three.kind === 'rate');
  assert.deepEqual([three.used, three.remaining, three.nextAllowedInMs, three.nextAllowedAt, three.fullAt], [3, 0, 18_000, 1_020_000, 1_060_000]);
  // What the view announces is what the store does: refused 1 ms before, allowed at nextAllowedAt.
  c.advance(three.nextAllowedInMs - 1);
  const early = await s.rate('k', 60_000, 3, 1);
  assert.deepEqual([early.allowed, early.retryAfterMs], [false, 1]);
  c.advance(1);
  assert.equal((await s.rate('k', 60_000, 3, 1)).allowed, true);
});

test('limitView: greylist triplets unknown → waiting (passes after the delay) → passed (known until its lifetime); slots in use', async () => {
  const c = clock();
  const s = new MemoryStore(c.now);
  const spec = { kind: 'greylist', delayMs: 300_000, retryWindowMs: 3_600_000, lifetimeMs: 86_400_000 } as const;
  const view = async () => limitView(spec, await s.inspect('g'));
  assert.deepEqual(await view(), { kind: 'greylist', now: 1_000_000, state: 'unknown', delayMs: 300_000, firstSeenAt: null, passesAt: null, expiresAt: null });
  await s.greylist('g', 300_000, 3_600_000, 86_400_000);
  c.advance(10_000);
  assert.deepEqual(await view(), { kind: 'greylist', now: 1_010_000, state: 'waiting', delayMs: 300_000, firstSeenAt: 1_000_000, passesAt: 1_300_000, expiresAt: 4_900_000 });
  c.advance(290_000);
  assert.equal((await s.greylist('g', 300_000, 3_600_000, 86_400_000)).passed, true);
  c.advance(5_000);
  assert.deepEqual(await view(), { kind: 'greylist', now: 1_305_000, state: 'passed', delayMs: 300_000, firstSeenAt: null, passesAt: null, expiresAt: 87_700_000 });

  await s.acquire('c', 'a', 2, 60_000);
  c.advance(30_000);
  await s.acquire('c', 'b', 2, 60_000);
  c.advance(30_000);
  const slots = limitView({ kind: 'concurrency', limit: 2 }, await s.inspect('c'));
  assert.deepEqual(slots, { kind: 'concurrency', now: 1_365_000, limit: 2, inUse: 1, expiresAt: 1_395_000 }, "a's slot expired: not counted");
});
