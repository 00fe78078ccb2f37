/**
 * pipeline.ts — the rule pipeline alone: events per second through the runner with the shipped
 * rule files (rules/*.yaml), the in-memory store and a resolver stub that answers at once.
 * Each session is connect, helo, mail, rcpt ×2, data_end, quit (7 events); sessions run one
 * after the other, as one client's would. No sockets, no backend.
 *
 * Usage: node --import tsx bench/pipeline.ts [sessions=20000] [rounds=5]
 * Prints events/s per round and the median. Works with the runner before issue 15 (`evaluate`)
 * and after (`openPipeline`), to compare the two.
 */
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Subject } from 'rxjs';
import { loadRuleSet } from '../src/config/rules.js';
import { createMetrics } from '../src/metrics/registry.js';
import type { DnsResolver } from '../src/net/dns.js';
import { parseAddress } from '../src/net/ip.js';
import type { SessionEvent, SessionSnapshot } from '../src/pipeline/events.js';
import * as run from '../src/pipeline/run.js';
import { parsePath, type ParsedPath } from '../src/protocol/address.js';
import { RULE_TYPES } from '../src/rules/index.js';
import { MemoryStore } from '../src/store/store.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const sessions = Number(process.argv[2] ?? 20_000);
const rounds = Number(process.argv[3] ?? 5);

const resolver: DnsResolver = {
  servers: [],
  resolve: (name, rrtype) =>
    rrtype === 'TXT' && name === 'example.org' ? Promise.resolve([['v=spf1 ip4:192.0.2.0/24 -all']]) : Promise.reject(Object.assign(new Error('ENODATA'), { code: 'ENODATA' })),
  resolveA: (name) => (name === 'mail.example.org' ? Promise.resolve([{ address: '192.0.2.5', ttl: 300 }]) : Promise.reject(Object.assign(new Error('ENOTFOUND'), { code: 'ENOTFOUND' }))),
  resolveAAAA: () => Promise.reject(Object.assign(new Error('ENODATA'), { code: 'ENODATA' })),
  reverse: () => Promise.resolve(['mail.example.org']),
};
const metrics = createMetrics({ version: 'bench', defaults: false });
const log = { warn: () => undefined, info: () => undefined };
const set = loadRuleSet(process.env.BENCH_RULES ?? path.join(ROOT, 'rules'), { ownNames: ['mx.test'], ownAddresses: [], resolver, store: new MemoryStore(), metrics, log, now: Date.now }, RULE_TYPES);

const pathOf = (raw: string): ParsedPath => {
  const r = parsePath(raw);
  if (!r.ok) throw new Error(raw);
  return r.path;
};
const sender = pathOf('alice@example.org');
const rcpts = [pathOf('bob@example.net'), pathOf('carol@example.net')];

function events(i: number, ended: AbortSignal): SessionEvent[] {
  const base: SessionSnapshot = {
    id: `b${i}`, client: parseAddress(`192.0.2.${(i % 250) + 1}`), clientPort: 1, listener: { name: 'smtp', role: 'smtp' }, localAddress: '127.0.0.1',
    tls: false, helo: null, esmtp: false, auth: null, transaction: 0, sender: null, recipients: [], recipientsForwarded: 0, acceptedBy: null, authResults: [], ended,
  };
  const helo = { ...base, helo: 'mail.example.org', esmtp: true };
  const txn = { ...helo, transaction: 1, sender };
  return [
    { stage: 'connect', session: base },
    { stage: 'helo', session: helo, verb: 'EHLO', name: 'mail.example.org' },
    { stage: 'mail', session: txn, sender, params: [] },
    { stage: 'rcpt', session: txn, recipient: rcpts[0]!, params: [] },
    { stage: 'rcpt', session: { ...txn, recipients: [rcpts[0]!], recipientsForwarded: 1 }, recipient: rcpts[1]!, params: [] },
    { stage: 'data_end', session: { ...txn, recipients: rcpts, recipientsForwarded: 2 }, size: 1000 },
    { stage: 'quit', session: txn, reason: 'QUIT' },
  ];
}

type Verdict = { reply: unknown };
type Api = { open(i: number): { feed(ev: SessionEvent): Verdict | Promise<Verdict>; end(): void } };

/** The runner as the session drives it, whichever API this tree has. */
function api(): Api {
  const hooks = { metrics, onRuleError: () => undefined };
  const r = run as unknown as Record<string, unknown>;
  if (typeof r.openPipeline === 'function') {
    const open = r.openPipeline as (rules: unknown, hooks: unknown) => { attach(ev$: Subject<SessionEvent>, ended: AbortSignal): { verdict(ev: SessionEvent): Verdict | Promise<Verdict> } };
    const pipeline = open(set.rules, { ...hooks, maxPendingDryRun: 16, late: () => undefined });
    return {
      open() {
        const ev$ = new Subject<SessionEvent>();
        const ended = new AbortController();
        const p = pipeline.attach(ev$, ended.signal);
        return {
          feed: (ev) => {
            ev$.next(ev);
            return p.verdict(ev);
          },
          end: () => {
            ended.abort();
            ev$.complete();
          },
        };
      },
    };
  }
  const evaluate = r.evaluate as (rules: unknown, ev: SessionEvent, hooks: unknown) => Verdict | Promise<Verdict>;
  return {
    open() {
      // As the session did: its `ended` aborted at close, its events$ completed.
      const ev$ = new Subject<SessionEvent>();
      const ended = new AbortController();
      return {
        feed: (ev) => {
          ev$.next(ev);
          return evaluate(set.rules, ev, ev.stage === 'quit' ? { metrics } : { ...hooks, deferred: () => undefined });
        },
        end: () => {
          ended.abort();
          ev$.complete();
        },
      };
    },
  };
}

async function round(a: Api): Promise<number> {
  const started = performance.now();
  let n = 0;
  for (let i = 0; i < sessions; i++) {
    const s = a.open(i);
    for (const ev of events(i, new AbortController().signal)) {
      const v = s.feed(ev);
      if (v instanceof Promise) await v;
      n++;
    }
    s.end();
  }
  return n / ((performance.now() - started) / 1000);
}

const a = api();
await round(a); // warm-up
const results: number[] = [];
for (let r = 0; r < rounds; r++) {
  const eps = await round(a);
  results.push(eps);
  // Live heap after a full collection (node --expose-gc), else whatever garbage is still uncollected.
  (globalThis as { gc?: () => void }).gc?.();
  process.stdout.write(`round ${r + 1}: ${Math.round(eps)} events/s, heap ${Math.round(process.memoryUsage().heapUsed / 1e6)} MB\n`);
}
results.sort((x, y) => x - y);
process.stdout.write(`median: ${Math.round(results[Math.floor(results.length / 2)]!)} events/s (${sessions} sessions × 7 events, rules: ${set.rules.map((r) => r.rule.name).join(', ')})\n`);
for (const r of set.rules) r.rule.close?.();
process.exit(0);
