/**
 * The resolver's cache (src/net/dns-cache.ts): what is kept and for how long, what is never kept,
 * and lookups in flight shared — against a resolver that counts what it is asked.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { DnsResolver } from '../../src/net/dns.js';
import { cachingResolver } from '../../src/net/dns-cache.js';

function counting(answers: { a?: { address: string; ttl: number }[]; txt?: string[][]; fail?: string }) {
  const asked: string[] = [];
  const err = (code: string) => Object.assign(new Error(code), { code });
  const r: DnsResolver = {
    servers: [],
    resolve: async (name, rrtype) => {
      asked.push(`${rrtype} ${name}`);
      if (answers.fail) throw err(answers.fail);
      if (!answers.txt) throw err('ENODATA');
      return answers.txt;
    },
    resolveA: async (name) => {
      asked.push(`A ${name}`);
      if (answers.fail) throw err(answers.fail);
      return answers.a ?? [];
    },
    resolveAAAA: async (name) => {
      asked.push(`AAAA ${name}`);
      throw err('ENODATA');
    },
    reverse: async (ip) => {
      asked.push(`PTR ${ip}`);
      return ['host.example'];
    },
  };
  return { r, asked };
}

test('A answers are kept for their smallest TTL, at most cacheMaxTtl, handed out with the TTL left; names match whatever their case', async () => {
  let t = 1_000_000;
  const { r, asked } = counting({ a: [{ address: '192.0.2.1', ttl: 30 }, { address: '192.0.2.2', ttl: 10 }] });
  let hits = 0;
  const c = cachingResolver(r, { size: 100, maxTtl: 60, now: () => t, onHit: () => hits++ });
  assert.deepEqual((await c.resolveA('mx.example')).map((x) => x.address), ['192.0.2.1', '192.0.2.2']);
  await c.resolveA('MX.Example');
  t += 9_000;
  assert.deepEqual(await c.resolveA('mx.example'), [{ address: '192.0.2.1', ttl: 21 }, { address: '192.0.2.2', ttl: 1 }], '9 s later: 9 s less');
  assert.deepEqual(asked, ['A mx.example']);
  assert.equal(hits, 2);
  t += 2_000; // 11 s: past the smaller TTL
  await c.resolveA('mx.example');
  assert.deepEqual(asked, ['A mx.example', 'A mx.example']);
  const long = counting({ a: [{ address: '192.0.2.1', ttl: 3600 }] });
  const c2 = cachingResolver(long.r, { size: 100, maxTtl: 60, now: () => t });
  await c2.resolveA('mx.example');
  t += 59_000;
  await c2.resolveA('mx.example');
  t += 2_000;
  await c2.resolveA('mx.example');
  assert.equal(long.asked.length, 2, 'an hour-long TTL is kept cacheMaxTtl (60 s) only');
});

test('TXT and PTR answers, and "no such record", are kept cacheMaxTtl; a failure is never kept', async () => {
  let t = 1_000_000;
  const { r, asked } = counting({ txt: [['v=spf1 -all']] });
  const c = cachingResolver(r, { size: 100, maxTtl: 60, now: () => t });
  assert.deepEqual(await c.resolve('example.org', 'TXT'), [['v=spf1 -all']]);
  assert.deepEqual(await c.resolve('example.org', 'TXT'), [['v=spf1 -all']]);
  assert.deepEqual(await c.reverse('192.0.2.1'), ['host.example']);
  assert.deepEqual(await c.reverse('192.0.2.1'), ['host.example']);
  await assert.rejects(c.resolveAAAA('example.org'), { code: 'ENODATA' });
  await assert.rejects(c.resolveAAAA('example.org'), { code: 'ENODATA' });
  assert.deepEqual(asked, ['TXT example.org', 'PTR 192.0.2.1', 'AAAA example.org']);
  t += 61_000;
  await c.resolve('example.org', 'TXT');
  assert.equal(asked.length, 4);
  for (const code of ['ETIMEOUT', 'ESERVFAIL', 'EREFUSED']) {
    const f = counting({ fail: code });
    const cf = cachingResolver(f.r, { size: 100, maxTtl: 60, now: () => t });
    await assert.rejects(cf.resolve('example.org', 'TXT'), { code });
    await assert.rejects(cf.resolve('example.org', 'TXT'), { code });
    assert.equal(f.asked.length, 2, `${code} is asked again`);
  }
});

test('lookups in flight are shared; a caller that changes its answer does not change the next one’s', async () => {
  const { r, asked } = counting({ txt: [['a'], ['b']] });
  let hits = 0;
  const c = cachingResolver(r, { size: 100, maxTtl: 60, onHit: () => hits++ });
  const [x, y] = await Promise.all([c.resolve('example.org', 'TXT'), c.resolve('example.org', 'TXT')]);
  assert.equal(asked.length, 1);
  assert.equal(hits, 1);
  (x as string[][]).pop();
  assert.deepEqual(y, [['a'], ['b']]);
  assert.deepEqual(await c.resolve('example.org', 'TXT'), [['a'], ['b']]);
});

test('size bounds the answers kept (least recently used out); size 0 or maxTtl 0 is no cache', async () => {
  const { r, asked } = counting({ txt: [['x']] });
  const c = cachingResolver(r, { size: 2, maxTtl: 60 });
  for (const n of ['a', 'b', 'c', 'a']) await c.resolve(`${n}.example`, 'TXT');
  assert.deepEqual(asked, ['TXT a.example', 'TXT b.example', 'TXT c.example', 'TXT a.example']);
  assert.equal(cachingResolver(r, { size: 0, maxTtl: 60 }), r);
  assert.equal(cachingResolver(r, { size: 10, maxTtl: 0 }), r);
});
