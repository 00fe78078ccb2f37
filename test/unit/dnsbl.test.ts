/**
 * The dnsbl rule with a resolver built from a zone literal (mailauth's dns-zone style): which
 * queries it makes, how concurrent sessions share one lookup, and how answers are judged.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { dnsblRule } from '../../src/rules/dnsbl.js';
import type { DnsResolver } from '../../src/net/dns.js';
import type { SessionEvent, SessionSnapshot } from '../../src/pipeline/events.js';
import type { Finding, Rule, RuleDeps } from '../../src/pipeline/rule.js';
import { checkRule } from '../helpers/rule-fixtures.js';
import { parseAddress } from '../../src/net/ip.js';
import { createMetrics } from '../../src/metrics/registry.js';
import { MemoryStore } from '../../src/store/store.js';

function zoneResolver(zone: Record<string, string[]>, delay = 20): DnsResolver & { calls: string[] } {
  const calls: string[] = [];
  const answer = (name: string) =>
    new Promise<{ address: string; ttl: number }[]>((resolve, reject) =>
      setTimeout(() => {
        const a = zone[name];
        if (a) resolve(a.map((address) => ({ address, ttl: 300 })));
        else reject(Object.assign(new Error('not found'), { code: 'ENOTFOUND' }));
      }, delay),
    );
  return {
    calls,
    servers: [],
    resolve: () => Promise.reject(new Error('unused')),
    resolveA: (name) => {
      calls.push(name);
      return answer(name);
    },
    resolveAAAA: () => Promise.reject(new Error('unused')),
    reverse: () => Promise.reject(new Error('unused')),
  };
}

function deps(resolver: DnsResolver): RuleDeps {
  return { ownNames: ['mx.test'], ownAddresses: [], resolver, store: new MemoryStore(), metrics: createMetrics({ version: 't', defaults: false }), log: { warn: () => undefined, info: () => undefined }, now: Date.now, checkOnly: true };
}

const snap = (id: string, ip: string): SessionSnapshot => ({
  id, client: parseAddress(ip), clientPort: 1, listener: { name: 'l', role: 'smtp' }, localAddress: '127.0.0.1',
  tls: false, helo: null, esmtp: false, auth: null, transaction: 0, sender: null, recipients: [], recipientsForwarded: 0, acceptedBy: null, authResults: [],
  ended: new AbortController().signal,
});
const connect = (id: string, ip: string): SessionEvent => ({ stage: 'connect', session: snap(id, ip) });
/** What the runner does at a stage: start the rule's lookups, then ask for its verdict. */
function run(rule: Rule, ev: SessionEvent) {
  return checkRule(rule, ev);
}

test('concurrent sessions from one address share one lookup per zone; later ones hit the cache', async () => {
  const r = zoneResolver({ '5.2.0.192.bl.test': ['127.0.0.2'] });
  const rule = dnsblRule.create('dnsbl', dnsblRule.settings.parse({ zones: [{ zone: 'bl.test' }, { zone: 'other.test' }] }), deps(r));
  const results = (await Promise.all([1, 2, 3].map((i) => run(rule, connect(`s${i}`, '192.0.2.5'))))) as Finding[];
  assert.deepEqual(results.map((f) => f.kind), ['reject', 'reject', 'reject']);
  assert.deepEqual(r.calls.sort(), ['5.2.0.192.bl.test', '5.2.0.192.other.test']);
  await run(rule, connect('s4', '192.0.2.5'));
  assert.equal(r.calls.length, 2, 'cached for its TTL');
  rule.close?.();
});

test('IPv6 clients: nibble names only for zones that list IPv6', async () => {
  const r = zoneResolver({});
  const rule = dnsblRule.create('dnsbl', dnsblRule.settings.parse({ zones: [{ zone: 'v4.test' }, { zone: 'v6.test', ipv6: true }] }), deps(r));
  await run(rule, connect('a', '2001:db8::1'));
  assert.deepEqual(r.calls, ['1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.v6.test']);
  rule.close?.();
});

test('error codes and foreign answers are never listings', async () => {
  const r = zoneResolver({ '5.2.0.192.zen.test': ['127.255.255.254'], '5.2.0.192.lie.test': ['10.0.0.2'] });
  const rule = dnsblRule.create('dnsbl', dnsblRule.settings.parse({ zones: [{ zone: 'zen.test' }, { zone: 'lie.test' }] }), deps(r));
  const f = (await run(rule, connect('a', '192.0.2.5'))) as Finding;
  assert.equal(f.kind, 'pass');
  rule.close?.();
});
