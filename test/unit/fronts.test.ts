// The parts of the fronts an MTA calls that are pure logic: the bounded, expiring memory of
// transactions (src/fronts/lru.ts), the rule set without the message (fronts/policy/rules.ts),
// and a milter listener answering the MTA's option negotiation (fronts/listen.ts).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import pino from 'pino';
import type { RuleSet } from '../../src/config/rules.js';
import { listenerSchema } from '../../src/config/schema.js';
import { startFrontListener } from '../../src/fronts/listen.js';
import { ExpiringLru, type ForgetReason } from '../../src/fronts/lru.js';
import { withoutMessage } from '../../src/fronts/policy/rules.js';
import { createMetrics } from '../../src/metrics/registry.js';
import type { LoadedRule } from '../../src/pipeline/loaded.js';
import type { Rule } from '../../src/pipeline/rule.js';
import { LIMIT_DEFAULTS } from '../../src/config/defaults.js';

test('the LRU forgets the least recently used past its bound, and each entry after its TTL', async () => {
  const forgotten: [string, ForgetReason][] = [];
  const lru = new ExpiringLru<string, number>(() => ({ max: 2, ttl: 60 }), (k, _v, why) => forgotten.push([k, why]));
  lru.set('a', 1);
  lru.set('b', 2);
  assert.equal(lru.get('a'), 1); // a is now the most recent
  lru.set('c', 3);
  assert.deepEqual(forgotten, [['b', 'evicted']]);
  assert.equal(lru.get('b'), undefined);
  lru.delete('c');
  assert.deepEqual(forgotten.at(-1), ['c', 'deleted']);
  await new Promise((r) => setTimeout(r, 150));
  assert.deepEqual(forgotten.at(-1), ['a', 'expired']);
  assert.equal(lru.size, 0);
  lru.set('d', 4);
  lru.clear();
  assert.deepEqual(forgotten.at(-1), ['d', 'cleared']);
});

test('a get resets the TTL', async () => {
  const forgotten: string[] = [];
  const lru = new ExpiringLru<string, number>(() => ({ max: 10, ttl: 80 }), (k) => forgotten.push(k));
  lru.set('a', 1);
  for (let i = 0; i < 4; i++) {
    await new Promise((r) => setTimeout(r, 40));
    assert.equal(lru.get('a'), 1, `still there after ${(i + 1) * 40} ms of use`);
  }
  lru.clear();
});

function loaded(rule: Rule): LoadedRule {
  return { rule, action: 'enforce', onError: 'pass', timeout: 100, file: `${rule.name}.yaml` };
}

test('policy rules: header checks and body readers are left off, the other stages kept, a message-only rule dropped', () => {
  const calls: string[] = [];
  const checks = {
    mail(this: { tag: string }) {
      calls.push(`mail ${this.tag}`);
      return { kind: 'pass' as const };
    },
    data_headers: () => ({ kind: 'pass' as const }),
    tag: 'own-this',
  };
  const mixed: Rule = { name: 'mixed', type: 't', checks: checks as unknown as Rule['checks'], bypassable: true, body: { chunk: () => undefined, end: () => ({ kind: 'pass' }) } };
  const bodyOnly: Rule = { name: 'scanner', type: 't', checks: {}, bypassable: true, body: { chunk: () => undefined, end: () => ({ kind: 'pass' }) } };
  const plain: Rule = { name: 'plain', type: 't', checks: { connect: () => ({ kind: 'pass' }) }, bypassable: false };
  const set = { rules: [loaded(mixed), loaded(bodyOnly), loaded(plain)], stages: new Set(['mail', 'data_headers', 'data_end', 'connect']) } as unknown as RuleSet;
  const p = withoutMessage(set);
  assert.deepEqual(p.skipped, ['mixed', 'scanner']);
  assert.deepEqual(p.set.rules.map((r) => r.rule.name), ['mixed', 'plain']);
  const kept = p.set.rules[0]?.rule;
  assert.deepEqual(Object.keys(kept?.checks ?? {}), ['mail']);
  assert.equal(kept?.body, undefined);
  assert.deepEqual([...p.set.stages].sort(), ['connect', 'mail']);
  // A check keeps its own `this` (rules call their checks as methods).
  (kept?.checks as Record<string, () => unknown>).mail?.();
  assert.deepEqual(calls, ['mail own-this']);
  assert.equal(withoutMessage(set), p, 'derived once per rule set');
  assert.equal(p.set.rules[1], set.rules[2], 'a rule without message stages is handed on as it is');
});

test('a milter listener starts and answers the MTA\'s option negotiation', async () => {
  const cfg = listenerSchema.parse({ address: '127.0.0.1:0', role: 'milter' });
  const l = await startFrontListener(cfg, { rules: () => ({ rules: [], stages: new Set() }) as unknown as RuleSet, limits: () => ({ ...LIMIT_DEFAULTS }) as never, metrics: createMetrics({ version: 't' }), log: pino({ level: 'silent' }), hostname: 'mx.test' });
  try {
    const port = (l.server.address() as net.AddressInfo).port;
    const sock = net.connect(port, '127.0.0.1');
    // OPTNEG: version 6, every action, every protocol step offered (as Postfix does).
    const body = Buffer.alloc(13);
    body.write('O', 0);
    body.writeUInt32BE(6, 1);
    body.writeUInt32BE(0x1ff, 5);
    body.writeUInt32BE(0x1fffff, 9);
    const len = Buffer.alloc(4);
    len.writeUInt32BE(13);
    sock.write(Buffer.concat([len, body]));
    const got = await new Promise<Buffer>((resolve, reject) => {
      sock.once('data', resolve);
      sock.once('error', reject);
    });
    sock.destroy();
    assert.equal(got.subarray(4, 5).toString(), 'O', 'an OPTNEG reply');
    assert.equal(got.readUInt32BE(5), 6);
  } finally {
    l.close();
  }
});
