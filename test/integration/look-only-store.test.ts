// The look-only store (src/store/look-only.ts) over the in-memory store and a real redis-server:
// it answers what the store would answer — a rate limit reached, a slot taken, a triplet new or
// passed — and the store holds afterwards exactly what it held before.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { lookOnly } from '../../src/store/look-only.js';
import { RedisStore } from '../../src/store/redis.js';
import { MemoryStore, type Store } from '../../src/store/store.js';
import { startRedis, type RedisServer } from '../helpers/redis.js';

let redis: RedisServer;
let redisStore: RedisStore;

before(async () => {
  redis = await startRedis();
  redisStore = new RedisStore({ url: redis.url, prefix: 'lo:', commandTimeout: 1000 });
  assert.ok(await redisStore.ready(5000));
});

after(async () => {
  await redisStore.close();
  await redis.stop();
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

for (const kind of ['memory', 'redis'] as const) {
  describe(`look-only over the ${kind} store`, () => {
    const store = (): Store => (kind === 'memory' ? new MemoryStore() : redisStore);
    let n = 0;
    const key = (what: string) => `${what}:${kind}:${++n}`;

    test('rate: answers as the bucket would, counts its own session, writes nothing', async () => {
      const s = store();
      const k = key('rl');
      // 3 per minute, 2 already taken by real sessions.
      assert.equal((await s.rate(k, 60_000, 3, 1)).allowed, true);
      assert.equal((await s.rate(k, 60_000, 3, 1)).allowed, true);
      const before = await raw(s, k);
      const look = lookOnly(s);
      const first = await look.rate(k, 60_000, 3, 1);
      assert.deepEqual([first.allowed, first.remaining], [true, 0]);
      const second = await look.rate(k, 60_000, 3, 1);
      assert.equal(second.allowed, false, 'the explained session spent the last token');
      assert.ok(second.retryAfterMs > 0 && second.retryAfterMs <= 20_000, `retry after ${second.retryAfterMs}`);
      // A refund gives back what the explained session spent, never the real sessions' tokens.
      await look.rate(k, 60_000, 3, -1);
      await look.rate(k, 60_000, 3, -1);
      assert.equal((await look.rate(k, 60_000, 3, 1)).allowed, true);
      assert.equal(await raw(s, k), before, 'the bucket is as it was');
      // The real store still has exactly one token left.
      assert.equal((await s.rate(k, 60_000, 3, 1)).allowed, true);
      assert.equal((await s.rate(k, 60_000, 3, 1)).allowed, false);
    });

    test('concurrency: a slot is granted or not as acquire would; none is taken', async () => {
      const s = store();
      const k = key('slots');
      assert.equal((await s.acquire(k, 'real-1', 2, 60_000)).ok, true);
      const look = lookOnly(s);
      assert.deepEqual(await look.acquire(k, 'explained', 2, 60_000), { ok: true, inUse: 2 });
      assert.deepEqual(await look.acquire(k, 'explained', 2, 60_000), { ok: true, inUse: 2 }, 'refreshing its own slot');
      assert.deepEqual(await look.acquire(k, 'explained-2', 2, 60_000), { ok: false, inUse: 2 }, 'its own first slot counts');
      await look.release(k, 'explained');
      assert.deepEqual(await raw(s, k), ['real-1'], 'the store holds the real slot only');
      assert.equal((await s.acquire(k, 'real-2', 2, 60_000)).ok, true);
      assert.equal((await lookOnly(s).acquire(k, 'explained', 2, 60_000)).ok, false, 'full');
    });

    test('greylist: a new triplet is refused and not recorded; one past its delay would pass and stays grey', async () => {
      const s = store();
      const k = key('grey');
      const look = lookOnly(s);
      assert.deepEqual(await look.greylist(k, 150, 60_000, 600_000), { passed: false, waitMs: 150, firstAttempt: true });
      assert.equal(await raw(s, k), null, 'no triplet recorded');
      await s.greylist(k, 150, 60_000, 600_000);
      const first = await raw(s, k);
      const early = await look.greylist(k, 150, 60_000, 600_000);
      assert.equal(early.passed, false);
      assert.equal(early.firstAttempt, false);
      await sleep(200);
      assert.deepEqual(await look.greylist(k, 150, 60_000, 600_000), { passed: true, waitMs: 0, firstAttempt: false });
      assert.equal(await raw(s, k), first, 'still grey: not marked passed');
      await expectReject(look.reset(k));
      assert.notEqual(await raw(s, k), null);
    });
  });
}

/** A key's stored value (a bucket's TAT, the slots' tokens, a triplet), null when none. */
async function raw(s: Store, k: string): Promise<number | string | string[] | null> {
  const st = (await s.inspect(k)).state;
  if (!st) return null;
  return st.type === 'bucket' ? st.tat : st.type === 'slots' ? st.tokens : st.value;
}

async function expectReject(p: Promise<unknown>): Promise<void> {
  await assert.rejects(p, /changes nothing/);
}
