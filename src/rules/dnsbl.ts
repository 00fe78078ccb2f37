/**
 * dnsbl — DNS block and allow lists the way list operators expect (RFC 5782; Postfix postscreen's
 * weights and threshold; haraka-plugin-dns-list's defences).
 *
 * Zones of three kinds: `ip` (the client address: reversed octets, or 32 reversed nibbles for
 * IPv6 — DNSBL and DNSWL), `helo` and `sender` (RHSBL on the HELO name and the sender's domain).
 * Each zone counts only answers that pass its `answers` filters (e.g. `127.0.0.[2..11]`) and adds
 * its `weight` (negative for allowlists); the total is compared with `threshold`.
 *
 * When: the `ip` lookups start at connect, `helo` ones at HELO, `sender` ones at MAIL, all
 * concurrently and in the background (the runner's `start`, never awaited); the verdict is applied
 * at `stage` (`connect`; `mail` or `rcpt` do not hold the greeting while lookups run, and the log
 * shows the envelope). Concurrent sessions share one lookup per name, and
 * answers are cached for their TTL clamped to [cacheMinTtl, cacheMaxTtl].
 *
 * Defences: a per-zone `timeout` far below the SMTP deadlines; a timeout or error never rejects
 * (per zone `onError: pass`, or `tempfail` → 451 4.7.1) and never crashes; an answer outside
 * 127/8 or a Spamhaus-style 127.255.255.x is an error, not a listing; the RFC 5782 §5 self-test
 * (127.0.0.2 listed, 127.0.0.1 not; ::FFFF:7F00:2 / :1 for `ipv6` zones; TEST / INVALID for
 * domain zones) runs at start and every `selfTestInterval`, and a zone that fails it is disabled
 * until it passes again (doorman_dnsbl_zone_up, one log line per change). A self-test query that
 * cannot be answered (timeout, SERVFAIL) says nothing about the zone and leaves its state alone:
 * in a DNS outage each query's `onError` decides.
 *
 * Findings: score ≥ threshold → reject with `reply` ({ip}, {zone}: the display name, never a
 * private key in the zone; {text}: the zone's text for the return code); score ≤
 * allowlistThreshold → accept (allowlisted: bypassable rules skip the session); a zone error
 * with onError tempfail → tempfail 451 4.7.1. Bypassable (an access allow skips it).
 * Metrics: doorman_dnsbl_queries_total{zone,result}, doorman_dnsbl_query_duration_seconds{zone},
 * doorman_dnsbl_zone_up{zone}, doorman_dns_cache_hits_total.
 */
import { LRUCache } from 'lru-cache';
import { z } from 'zod';
import ipaddr from 'ipaddr.js';
import { isNoRecord, reversedName, withTimeout, type DnsResolver } from '../net/dns.js';
import { defineRuleType, onStages, PASS, type Finding, type RuleDeps } from '../pipeline/rule.js';
import type { EventOf, SessionEvent } from '../pipeline/events.js';
import { fillReply, replyTemplate } from './shared.js';

/** `127.0.0.2`, `127.0.0.[2..11]`, `127.0.[0..1].[2..255]`, `127.0.0.0/24`. */
export type AnswerFilter = (ip: string) => boolean;

export function parseAnswerFilter(text: string): AnswerFilter | null {
  const t = text.trim();
  if (t.includes('/')) {
    try {
      const [net, bits] = ipaddr.parseCIDR(t);
      return (ip) => {
        const a = ipaddr.parse(ip);
        return a.kind() === net.kind() && (a as ipaddr.IPv4).match(net as ipaddr.IPv4, bits);
      };
    } catch {
      return null;
    }
  }
  const octet = '(\\d{1,3}|\\[\\d{1,3}\\.\\.\\d{1,3}\\])';
  const whole = new RegExp(`^${octet}\\.${octet}\\.${octet}\\.${octet}$`).exec(t);
  if (!whole) return null;
  const ranges: [number, number][] = [];
  for (const p of whole.slice(1)) {
    const m = /^(?:(\d{1,3})|\[(\d{1,3})\.\.(\d{1,3})\])$/.exec(p);
    if (!m) return null;
    const lo = Number(m[1] ?? m[2]);
    const hi = Number(m[1] ?? m[3]);
    if (lo > 255 || hi > 255 || lo > hi) return null;
    ranges.push([lo, hi]);
  }
  return (ip) => {
    const o = ip.split('.').map(Number);
    return o.length === 4 && o.every((v, i) => v >= (ranges[i]?.[0] ?? 0) && v <= (ranges[i]?.[1] ?? -1));
  };
}

/** RFC 5782 §2.3: answers are 127.0.0.0/8; Spamhaus 127.255.255.x are error codes, not listings. */
export function answerProblem(ip: string): string | null {
  if (!/^127\./.test(ip)) return `answer ${ip} outside 127.0.0.0/8`;
  if (/^127\.255\.255\.\d+$/.test(ip)) return `error code ${ip} (query refused by the list)`;
  return null;
}

const filter = z.string().refine((s) => parseAnswerFilter(s) !== null, 'expected an address, a CIDR or a pattern like 127.0.0.[2..11]');

const zoneSchema = z.strictObject({
  zone: z.string().regex(/^[a-z0-9_.-]+$/i, 'a DNS zone'),
  /** What the zone lists: the client address, or the HELO / sender domain (RHSBL). */
  type: z.enum(['ip', 'helo', 'sender']).default('ip'),
  /** Name in replies, logs and metric labels (hide a private key in the zone name). */
  displayName: z.string().regex(/^[A-Za-z0-9_.-]+$/).optional(),
  answers: z.array(filter).default(['127.0.0.[2..254]']),
  weight: z.number().default(1),
  /** Text per return code for {text} in the reply. */
  replies: z.record(z.string(), z.string()).default({}),
  /** The zone lists IPv4 addresses (default; self-test with 127.0.0.2 / 127.0.0.1). */
  ipv4: z.boolean().default(true),
  /** The zone lists IPv6 addresses (queried with nibbles; self-test with ::FFFF:7F00:2 / :1). */
  ipv6: z.boolean().default(false),
  timeout: z.number().int().positive().max(30_000).default(1_500),
  onError: z.enum(['pass', 'tempfail']).default('pass'),
  selfTest: z.boolean().default(true),
});

const settings = z.strictObject({
  zones: z.array(zoneSchema).min(1),
  /** Where the verdict is applied (lookups start at connect, HELO and MAIL whatever it is). */
  stage: z.enum(['connect', 'mail', 'rcpt']).default('connect'),
  threshold: z.number().default(1),
  allowlistThreshold: z.number().nullable().default(null),
  reply: replyTemplate.default('554 5.7.1 Service unavailable; client [{ip}] blocked using {zone}{text}'),
  selfTestInterval: z.number().int().min(1_000).default(300_000),
  cacheMinTtl: z.number().int().nonnegative().default(10),
  cacheMaxTtl: z.number().int().positive().default(3600),
  cacheSize: z.number().int().positive().default(50_000),
});

type ZoneConfig = z.output<typeof zoneSchema>;
type Result = 'listed' | 'clean' | 'timeout' | 'error' | 'disabled';

interface ZoneAnswer {
  zone: Zone;
  result: Result;
  /** Return codes that passed the zone's filters. */
  codes: string[];
  detail?: string;
}

class Zone {
  up = true;
  readonly filters: AnswerFilter[];
  readonly name: string;
  constructor(readonly cfg: ZoneConfig) {
    this.filters = cfg.answers.map((a) => parseAnswerFilter(a) as AnswerFilter);
    this.name = cfg.displayName ?? cfg.zone;
  }
}

interface Lookup {
  addresses: string[];
  /** 'none' for NXDOMAIN / NODATA. */
  state: 'ok' | 'none';
}

/** One zone's lookup for a session: the answer, or the lookup until it is in (then replaced). */
type Pending = ZoneAnswer | Promise<ZoneAnswer>;

/** Per session (runner-owned): the lookups for the client, the current HELO name and sender. */
type State = Record<'ip' | 'helo' | 'sender', Pending[]>;

/** Lookups shared by every session: one query per name in flight, answers cached for their TTL. */
class ListResolver {
  private readonly cache: LRUCache<string, Lookup>;
  private readonly inflight = new Map<string, Promise<Lookup>>();

  constructor(
    private readonly resolver: DnsResolver,
    private readonly minTtl: number,
    private readonly maxTtl: number,
    size: number,
    private readonly onShared: () => void,
  ) {
    this.cache = new LRUCache({ max: size });
  }

  /** A cached answer at once; otherwise the lookup (shared with sessions asking the same). */
  lookup(name: string, timeout: number): Lookup | Promise<Lookup> {
    const hit = this.cache.get(name);
    if (hit) {
      this.onShared();
      return hit;
    }
    const running = this.inflight.get(name);
    if (running) {
      this.onShared();
      return running;
    }
    const p = withTimeout(this.query(name), timeout).finally(() => this.inflight.delete(name));
    this.inflight.set(name, p);
    return p;
  }

  private async query(name: string): Promise<Lookup> {
    try {
      const answers = await this.resolver.resolveA(name);
      const ttl = Math.min(this.maxTtl, Math.max(this.minTtl, Math.min(...answers.map((a) => a.ttl))));
      const l: Lookup = { addresses: answers.map((a) => a.address), state: 'ok' };
      if (ttl > 0) this.cache.set(name, l, { ttl: ttl * 1000 });
      return l;
    } catch (err) {
      if (!isNoRecord(err)) throw err;
      const l: Lookup = { addresses: [], state: 'none' };
      if (this.minTtl > 0) this.cache.set(name, l, { ttl: this.minTtl * 1000 });
      return l;
    }
  }
}

/** One zone, one query: classified. Never throws; synchronous on a cache hit. */
function queryZone(zone: Zone, subject: string, lists: ListResolver, deps: RuleDeps): ZoneAnswer | Promise<ZoneAnswer> {
  if (!zone.up) {
    deps.metrics.dnsblQueries.inc({ zone: zone.name, result: 'disabled' });
    return { zone, result: 'disabled', codes: [] };
  }
  const started = performance.now();
  const done = (answer: ZoneAnswer): ZoneAnswer => {
    deps.metrics.dnsblQueries.inc({ zone: zone.name, result: answer.result });
    deps.metrics.dnsblDuration.observe({ zone: zone.name }, (performance.now() - started) / 1000);
    return answer;
  };
  const classify = (l: Lookup): ZoneAnswer => {
    const problems = l.addresses.map(answerProblem).filter((x): x is string => x !== null);
    if (problems.length) return { zone, result: 'error', codes: [], detail: problems.join('; ') };
    const codes = l.addresses.filter((a) => zone.filters.some((f) => f(a)));
    return { zone, result: codes.length ? 'listed' : 'clean', codes };
  };
  const failed = (err: unknown): ZoneAnswer => {
    const timeout = (err as { code?: string }).code === 'ETIMEOUT';
    return { zone, result: timeout ? 'timeout' : 'error', codes: [], detail: (err as Error).message };
  };
  let l: Lookup | Promise<Lookup>;
  try {
    l = lists.lookup(`${subject}.${zone.cfg.zone}`, zone.cfg.timeout);
  } catch (err) {
    return done(failed(err));
  }
  if (l instanceof Promise) return l.then(classify, failed).then(done);
  return done(classify(l));
}

/** The name a zone is queried with for a subject, or null when the subject does not apply. */
function subjectFor(zone: Zone, kind: 'ip' | 'helo' | 'sender', value: string): string | null {
  if (zone.cfg.type !== kind) return null;
  if (kind === 'ip') {
    const v6 = ipaddr.process(value).kind() === 'ipv6';
    if (v6 ? !zone.cfg.ipv6 : !zone.cfg.ipv4) return null;
    return reversedName(value);
  }
  const d = value.toLowerCase().replace(/\.$/, '');
  return /^[a-z0-9_-]+(\.[a-z0-9_-]+)+$/.test(d) ? d : null;
}

export const dnsblRule = defineRuleType({
  type: 'dnsbl',
  description: 'DNS block/allow lists on the client address (DNSBL/DNSWL) and on HELO and sender domains (RHSBL)',
  settings,
  create(name, s, deps) {
    const zones = s.zones.map((z) => new Zone(z));
    const lists = new ListResolver(deps.resolver, s.cacheMinTtl, s.cacheMaxTtl, s.cacheSize, () => deps.metrics.dnsCacheHits.inc());
    const start = (entry: State, kind: 'ip' | 'helo' | 'sender', value: string | null) => {
      // A new HELO or a new transaction replaces the earlier lookups of its kind.
      const list: Pending[] = (entry[kind] = []);
      for (const z of zones) {
        const subject = value === null ? null : subjectFor(z, kind, value);
        if (subject !== null) {
          const at = list.push(queryZone(z, subject, lists, deps)) - 1;
          const a = list[at];
          // Once in, the answer replaces its lookup (unless a newer HELO/MAIL replaced the list).
          if (a instanceof Promise) void a.then((x) => (list[at] = x));
        }
      }
    };
    if (!deps.checkOnly) {
      for (const z of zones) {
        deps.metrics.dnsblZoneUp.set({ zone: z.name }, 1);
        for (const result of ['listed', 'clean', 'timeout', 'error', 'disabled']) deps.metrics.dnsblQueries.inc({ zone: z.name, result }, 0);
      }
    }

    // RFC 5782 §5 self-test, on an unref'd timer.
    const selfTest = async (z: Zone) => {
      const probes: [string, boolean][] =
        z.cfg.type === 'ip'
          ? [
              ...(z.cfg.ipv4 ? ([[reversedName('127.0.0.2'), true], [reversedName('127.0.0.1'), false]] as [string, boolean][]) : []),
              ...(z.cfg.ipv6 ? ([[reversedName('::ffff:7f00:2', false), true], [reversedName('::ffff:7f00:1', false), false]] as [string, boolean][]) : []),
            ]
          : [
              ['test', true],
              ['invalid', false],
            ];
      let ok = true;
      let why = '';
      for (const [subject, listed] of probes) {
        try {
          const l = await withTimeout(deps.resolver.resolveA(`${subject}.${z.cfg.zone}`), z.cfg.timeout);
          const problem = l.map((a) => answerProblem(a.address)).find((x) => x !== null);
          if (problem) [ok, why] = [false, problem];
          else if (!listed) [ok, why] = [false, `${subject} must not be listed`];
        } catch (err) {
          // A DNS failure says nothing about the zone: keep its state (onError decides per query).
          if (!isNoRecord(err)) return;
          if (listed) [ok, why] = [false, `${subject} must be listed`];
        }
        if (!ok) break;
      }
      if (ok !== z.up) {
        z.up = ok;
        deps.metrics.dnsblZoneUp.set({ zone: z.name }, ok ? 1 : 0);
        if (ok) deps.log.info({ rule: name, zone: z.name }, 'DNS list zone passed its self-test; enabled');
        else deps.log.warn({ rule: name, zone: z.name, why }, 'DNS list zone failed its self-test (RFC 5782 §5); disabled');
      }
    };
    const testAll = () => void Promise.all(zones.filter((z) => z.cfg.selfTest).map(selfTest)).catch(() => undefined);
    let timer: NodeJS.Timeout | null = null;
    if (!deps.checkOnly) {
      testAll();
      timer = setInterval(testAll, s.selfTestInterval);
      timer.unref();
    }

    /** The verdict; synchronous when every answer is in (cache hits, or lookups done by now). */
    const verdict = (entry: State, ip: string): Finding | Promise<Finding> => {
      const all = [...entry.ip, ...entry.helo, ...entry.sender];
      if (all.every((x): x is ZoneAnswer => !(x instanceof Promise))) return decide(all, ip);
      return Promise.all(all).then((answers) => decide(answers, ip));
    };
    const decide = (answers: readonly ZoneAnswer[], ip: string): Finding => {
      let score = 0;
      const hits: ZoneAnswer[] = [];
      let failed: ZoneAnswer | undefined;
      for (const a of answers) {
        if (a.result === 'listed') {
          score += a.zone.cfg.weight;
          hits.push(a);
        } else if ((a.result === 'timeout' || a.result === 'error') && a.zone.cfg.onError === 'tempfail') failed ??= a;
      }
      const names = hits.map((h) => `${h.zone.name}=${h.codes.join(',')}`).join(' ');
      if (s.allowlistThreshold !== null && hits.length && score <= s.allowlistThreshold) {
        return { kind: 'accept', reason: `score ${score} ≤ ${s.allowlistThreshold}: ${names}` };
      }
      if (score >= s.threshold && hits.length) {
        const top = hits.filter((h) => h.zone.cfg.weight > 0).sort((a, b) => b.zone.cfg.weight - a.zone.cfg.weight)[0] ?? hits[0];
        const code = top?.codes[0] ?? '';
        const text = top?.zone.cfg.replies[code];
        const reply = fillReply(s.reply, { ip, zone: top?.zone.name ?? '', text: text ? `; ${text}` : '' });
        return { kind: 'reject', reason: `score ${score} ≥ ${s.threshold}: ${names}`, reply };
      }
      if (failed) {
        return { kind: 'tempfail', reason: `${failed.zone.name} ${failed.result}: ${failed.detail ?? ''}`, reply: { code: 451, enhanced: '4.7.1', text: 'Temporary lookup failure, try again later' } };
      }
      return PASS;
    };

    const needHelo = zones.some((z) => z.cfg.type === 'helo');
    const needSender = zones.some((z) => z.cfg.type === 'sender');
    return {
      name,
      type: 'dnsbl',
      bypassable: true,
      // Per session: the lookups for the client, the current HELO name and the current sender.
      session: (): State => ({ ip: [], helo: [], sender: [] }),
      // Lookups start as soon as their subject is known; the verdict waits for `stage`.
      starts: {
        connect: (ev, st: State) => start(st, 'ip', ev.session.client.text),
        ...(needHelo ? { helo: (ev: EventOf<'helo'>, st: State) => start(st, 'helo', ev.name) } : {}),
        ...(needSender || s.stage !== 'connect'
          ? { mail: (ev: EventOf<'mail'>, st: State) => start(st, 'sender', !ev.sender.isNull && ev.sender.domain && ev.sender.literal === undefined ? ev.sender.domain : null) }
          : {}),
      },
      checks: onStages([s.stage], (ev: SessionEvent, st: State) => verdict(st, ev.session.client.text)),
      close() {
        if (timer) clearInterval(timer);
      },
    };
  },
});
