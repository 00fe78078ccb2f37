/**
 * replay.ts — `doorman replay RECORDS… --rules NEWDIR`: every recorded session (record files,
 * src/record/format.ts) run again through another rule set with the offline runner
 * (fronts/offline.ts), and the difference in verdicts.
 *
 * The sessions run one after the other in the order of their recorded start times, through one
 * rule set loaded once from NEWDIR, with
 *   - DNS answered from the records (`RecordedResolver`): the session's own recorded answer; else
 *     the answer another session recorded for the same query, the latest before this session
 *     (else the earliest after) — what the rule's cache or a lookup shared in flight gave the live
 *     session, which then made no query of its own; else the lookup is "unrecorded": counted,
 *     shown, and answered SERVFAIL (a DNS failure: the rule's onError decides, and a DNSBL
 *     self-test leaves its zone alone), or asked of the real resolver with `--live-dns`;
 *   - rates, concurrency and greylisting counted in a scratch MemoryStore, with the clock at each
 *     session's recorded start (rules' `now` and the store's);
 *   - the listeners of the configuration and those the records name.
 *
 * What is compared, per recipient (a transaction without recipients, a session without
 * transactions: as one unit): the first refusal on its way — connect, HELO, its MAIL, its RCPT,
 * and its header block when it was recorded (`record.headers`). The body is never recorded, so
 * data_end rules are not replayed and their recorded verdicts are not compared; AUTH's verdict
 * shows only through what follows it. A unit changes when the refusal's class (accepted, 4xx,
 * 5xx), code, enhanced code or deciding rule differs; the change's direction is one of
 * DIRECTIONS, its rule the new deciding rule (the old one for → accepted).
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { closeRuleSet, loadRuleSet, type RuleSet, type RuleTypes } from '../config/rules.js';
import type { Metrics } from '../metrics/registry.js';
import type { DnsResolver } from '../net/dns.js';
import type { SessionSnapshot } from '../pipeline/events.js';
import type { RuleDeps } from '../pipeline/rule.js';
import { RECORD_SCHEMA, type DnsRecord, type SessionRecord } from '../record/format.js';
import { MemoryStore } from '../store/store.js';
import { OfflineInputError, runOffline, type SessionReport } from './offline.js';

/** Examples kept per change (direction and rule). */
export const REPLAY_EXAMPLES = 3;
/** Unrecorded lookups listed in the report (all are counted). */
export const REPLAY_UNRECORDED_SHOWN = 10;

export const DIRECTIONS = ['accepted → refused', 'accepted → tempfailed', 'refused → accepted', 'tempfailed → accepted', '5xx → 4xx', '4xx → 5xx', 'other refusal'] as const;
export type Direction = (typeof DIRECTIONS)[number];

type Role = SessionSnapshot['listener']['role'];

/** Bad input (a file that cannot be read, a line that is not a record): `doorman replay` exits 3. */
export class ReplayInputError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ReplayInputError';
  }
}

/** What a unit (recipient, transaction, session) came to: accepted, or refused by a rule. */
export interface Fate {
  readonly code: number | null;
  readonly enhanced: string;
  readonly text: string;
  readonly rule: string | null;
  readonly stage: string | null;
}

export interface ReplayExample {
  session: string;
  client: string;
  from: string | null;
  rcpt: string | null;
  old: string;
  new: string;
}

export interface ReplayChange {
  direction: Direction;
  rule: string;
  sessions: number;
  transactions: number;
  recipients: number;
  examples: ReplayExample[];
}

export interface ReplayReport {
  rules: string;
  files: string[];
  sessions: number;
  transactions: number;
  recipients: number;
  changed: { sessions: number; transactions: number; recipients: number };
  changes: ReplayChange[];
  dns: { own: number; otherSessions: number; unrecorded: number; unrecordedAnswer: 'SERVFAIL' | 'live'; unrecordedQueries: string[] };
  /** Records the runner could not take (an address that no longer parses…), with why. */
  skipped: { session: string; reason: string }[];
}

export interface ReplayOptions {
  readonly files: readonly string[];
  readonly rulesDir: string;
  readonly ruleTypes: RuleTypes;
  /** The rules' dependencies as `doorman start` builds them: resolver, store and clock are replaced. */
  readonly deps: RuleDeps;
  readonly listeners: readonly { readonly name: string; readonly role: Role }[];
  readonly hostname: string;
  readonly metrics: Metrics;
  readonly log: Logger;
  readonly maxHeaderBytes?: number;
  /** Unrecorded lookups go to this resolver (--live-dns); absent: SERVFAIL. */
  readonly live?: DnsResolver;
}

/** Every record of the files, in order of their start time; throws ReplayInputError naming file:line. */
export function readRecords(files: readonly string[]): SessionRecord[] {
  if (files.length === 0) throw new ReplayInputError('no record files given');
  const out: { r: SessionRecord; t: number; n: number }[] = [];
  for (const file of files) {
    let text: string;
    try {
      text = fs.readFileSync(file, 'utf8');
    } catch (e) {
      throw new ReplayInputError(`${file}: ${(e as Error).message}`);
    }
    text.split('\n').forEach((line, i) => {
      if (!line.trim()) return;
      let json: unknown;
      try {
        json = JSON.parse(line);
      } catch {
        throw new ReplayInputError(`${file}:${i + 1}: not JSON`);
      }
      const p = RECORD_SCHEMA.safeParse(json);
      if (!p.success) {
        const issue = p.error.issues[0];
        throw new ReplayInputError(`${file}:${i + 1}: not a session record (version 1): ${issue?.path.join('.') || 'line'}: ${issue?.message ?? 'invalid'}`);
      }
      const t = Date.parse(p.data.time);
      if (Number.isNaN(t)) throw new ReplayInputError(`${file}:${i + 1}: time: not a date`);
      out.push({ r: p.data as SessionRecord, t, n: out.length });
    });
  }
  return out.sort((a, b) => a.t - b.t || a.n - b.n).map((x) => x.r);
}

const dnsKey = (type: string, name: string) => `${type.toUpperCase()} ${name.toLowerCase().replace(/\.$/, '')}`;

/**
 * A resolver answering from the records: the current session's own answers first, then the
 * nearest other session's, else unrecorded (SERVFAIL, or the live resolver).
 */
export class RecordedResolver implements DnsResolver {
  readonly servers: readonly string[] = [];
  private readonly all = new Map<string, { t: number; e: DnsRecord }[]>();
  private own = new Map<string, DnsRecord>();
  private now = 0;
  readonly counts = { own: 0, otherSessions: 0, unrecorded: 0 };
  readonly unrecordedQueries = new Set<string>();

  constructor(
    records: readonly SessionRecord[],
    private readonly live?: DnsResolver,
  ) {
    for (const r of records) {
      const t = Date.parse(r.time);
      for (const e of r.dns) {
        const k = dnsKey(e.type, e.name);
        const list = this.all.get(k) ?? [];
        list.push({ t, e });
        this.all.set(k, list);
      }
    }
  }

  /** The session whose lookups are answered now. */
  use(r: SessionRecord): void {
    this.now = Date.parse(r.time);
    this.own = new Map();
    // The first answer the session got for a query is the one its rules saw first.
    for (const e of r.dns) if (!this.own.has(dnsKey(e.type, e.name))) this.own.set(dnsKey(e.type, e.name), e);
  }

  private find(type: string, name: string): DnsRecord | null {
    const k = dnsKey(type, name);
    const mine = this.own.get(k);
    if (mine) {
      this.counts.own++;
      return mine;
    }
    const list = this.all.get(k);
    if (list?.length) {
      let best: { t: number; e: DnsRecord } | null = null;
      for (const x of list) if (x.t <= this.now && (!best || x.t >= best.t)) best = x;
      best ??= list.reduce((a, b) => (b.t < a.t ? b : a));
      this.counts.otherSessions++;
      return best.e;
    }
    this.counts.unrecorded++;
    if (this.unrecordedQueries.size < REPLAY_UNRECORDED_SHOWN) this.unrecordedQueries.add(k);
    return null;
  }

  private answer<T>(type: string, name: string, map: (e: DnsRecord) => T, live: (r: DnsResolver) => Promise<T>): Promise<T> {
    const e = this.find(type, name);
    if (!e) {
      if (this.live) return live(this.live);
      return Promise.reject(Object.assign(new Error(`query${type} ESERVFAIL ${name} (not in the records)`), { code: 'ESERVFAIL', hostname: name }));
    }
    if (e.error !== undefined) return Promise.reject(Object.assign(new Error(`query${type} ${e.error} ${name}`), { code: e.error, hostname: name }));
    return Promise.resolve(map(e));
  }

  resolve(name: string, rrtype: string): Promise<string[] | string[][]> {
    return this.answer(rrtype.toUpperCase(), name, (e) => e.answer as string[] | string[][], (r) => r.resolve(name, rrtype));
  }

  resolveA(name: string): Promise<{ address: string; ttl: number }[]> {
    return this.answer('A', name, withTtl, (r) => r.resolveA(name));
  }

  resolveAAAA(name: string): Promise<{ address: string; ttl: number }[]> {
    return this.answer('AAAA', name, withTtl, (r) => r.resolveAAAA(name));
  }

  reverse(ip: string): Promise<string[]> {
    return this.answer('PTR', ip, (e) => e.answer as string[], (r) => r.reverse(ip));
  }
}

/** A recorded A/AAAA answer with its TTLs (a plain resolve() record: 60 s). */
function withTtl(e: DnsRecord): { address: string; ttl: number }[] {
  const list = Array.isArray(e.answer) ? (e.answer as unknown[]) : [];
  return list.map((a, i) => ({ address: typeof a === 'string' ? a : String((a as { address?: unknown }).address), ttl: e.ttls?.[i] ?? 60 }));
}

const ACCEPTED: Fate = { code: null, enhanced: '', text: '', rule: null, stage: null };

/** One unit of comparison: a recipient, a transaction without recipients, or a session without transactions. */
interface Unit {
  txn: number | null;
  rcpt: number | null;
}

function unitsOf(r: SessionRecord): Unit[] {
  const t = r.session.transactions;
  if (!t.length) return [{ txn: null, rcpt: null }];
  return t.flatMap((x, i): Unit[] => (x.rcpts.length ? x.rcpts.map((_, j) => ({ txn: i, rcpt: j })) : [{ txn: i, rcpt: null }]));
}

/** The stages that decide a unit, in order, and whether the replay evaluates them (data_headers: only with a recorded header block). */
function chain(r: SessionRecord, u: Unit): { stage: string; txn?: number; rcpt?: number }[] {
  const c: { stage: string; txn?: number; rcpt?: number }[] = [{ stage: 'connect' }, { stage: 'helo' }];
  if (u.txn === null) return c;
  c.push({ stage: 'mail', txn: u.txn });
  if (u.rcpt !== null) c.push({ stage: 'rcpt', txn: u.txn, rcpt: u.rcpt });
  if (r.session.transactions[u.txn]?.headers !== undefined) c.push({ stage: 'data_headers', txn: u.txn });
  return c;
}

type Refusal = { code: number; enhanced: string; text: string; rule: string | null; stage: string };

/** The recorded fate of each unit. */
function recordedFates(r: SessionRecord, units: readonly Unit[]): Fate[] {
  const find = (stage: string, txn?: number, rcpt?: number): Refusal | null => {
    const v = r.verdicts.find((x) => x.stage === stage && x.txn === txn && x.rcpt === rcpt && x.reply);
    return v?.reply ? { ...v.reply, rule: v.decidedBy, stage } : null;
  };
  return units.map((u) => firstRefusal(chain(r, u).map((s) => find(s.stage, s.txn, s.rcpt))));
}

/** The replayed fate of each unit, from the runner's stage reports. */
function replayedFates(r: SessionRecord, units: readonly Unit[], rep: SessionReport): Fate[] {
  // The runner reports recipients by address, in order: the k-th rcpt report of a transaction is its k-th recipient.
  const rcptSeen = new Map<number, number>();
  const refusals = new Map<string, Refusal>();
  for (const s of rep.stages) {
    let key = s.stage;
    if (s.transaction !== undefined) key += `/${s.transaction}`;
    if (s.stage === 'rcpt' && s.transaction !== undefined) {
      const k = rcptSeen.get(s.transaction) ?? 0;
      rcptSeen.set(s.transaction, k + 1);
      key += `/${k}`;
    }
    if (s.reply && !refusals.has(key)) refusals.set(key, { ...s.reply, rule: s.decidedBy, stage: s.stage });
  }
  const find = (stage: string, txn?: number, rcpt?: number) => refusals.get([stage, txn, rcpt].filter((x) => x !== undefined).join('/')) ?? null;
  return units.map((u) => firstRefusal(chain(r, u).map((s) => find(s.stage, s.txn, s.rcpt))));
}

function firstRefusal(list: readonly (Refusal | null)[]): Fate {
  const f = list.find((x): x is Refusal => x !== null);
  return f ? { code: f.code, enhanced: f.enhanced, text: f.text, rule: f.rule, stage: f.stage } : ACCEPTED;
}

const classOf = (f: Fate): 'accepted' | 'tempfailed' | 'refused' => (f.code === null || f.code < 400 ? 'accepted' : f.code < 500 ? 'tempfailed' : 'refused');

/** The direction of a change, or null when the unit's fate is the same. */
export function directionOf(old: Fate, now: Fate): Direction | null {
  const a = classOf(old);
  const b = classOf(now);
  if (a === b) {
    if (a === 'accepted' || (old.code === now.code && old.enhanced === now.enhanced && old.rule === now.rule)) return null;
    return 'other refusal';
  }
  if (a === 'accepted') return b === 'refused' ? 'accepted → refused' : 'accepted → tempfailed';
  if (b === 'accepted') return a === 'refused' ? 'refused → accepted' : 'tempfailed → accepted';
  return a === 'refused' ? '5xx → 4xx' : '4xx → 5xx';
}

export function describeFate(f: Fate): string {
  if (f.code === null) return 'accepted';
  return `${f.code}${f.enhanced ? ` ${f.enhanced}` : ''} ${f.text.split('\n')[0] ?? ''}`.trim() + (f.rule ? ` (${f.rule} at ${f.stage})` : ` (at ${f.stage})`);
}

/** Replays every record of `files` against the rules of `rulesDir`. */
export async function replay(opts: ReplayOptions): Promise<ReplayReport> {
  const records = readRecords(opts.files);
  let clock = records.length ? Date.parse(records[0]?.time ?? '') : Date.now();
  const now = () => clock;
  const resolver = new RecordedResolver(records, opts.live);
  const store = new MemoryStore(now);
  const listeners = [...opts.listeners];
  for (const r of records) {
    if (!listeners.some((l) => l.name === r.session.listener)) listeners.push({ name: r.session.listener, role: r.role as Role });
  }
  let set: RuleSet;
  try {
    set = loadRuleSet(opts.rulesDir, { ...opts.deps, resolver, store, now }, opts.ruleTypes, { listeners });
  } catch (e) {
    throw new ReplayInputError(`--rules ${opts.rulesDir}: ${(e as Error).message}${'problems' in (e as object) ? '\n' + ((e as { problems: { file: string; line: number | null; key: string; message: string }[] }).problems.map((p) => `  ${p.file}${p.line ? `:${p.line}` : ''}: ${p.key ? `${p.key}: ` : ''}${p.message}`).join('\n')) : ''}`);
  }
  const report: ReplayReport = {
    rules: opts.rulesDir,
    files: [...opts.files],
    sessions: records.length,
    transactions: 0,
    recipients: 0,
    changed: { sessions: 0, transactions: 0, recipients: 0 },
    changes: [],
    dns: { own: 0, otherSessions: 0, unrecorded: 0, unrecordedAnswer: opts.live ? 'live' : 'SERVFAIL', unrecordedQueries: [] },
    skipped: [],
  };
  const groups = new Map<string, { change: ReplayChange; sessions: Set<string>; txns: Set<string> }>();
  const changedSessions = new Set<string>();
  const changedTxns = new Set<string>();
  try {
    for (const r of records) {
      report.transactions += r.session.transactions.length;
      report.recipients += r.session.transactions.reduce((a, t) => a + t.rcpts.length, 0);
      clock = Date.parse(r.time);
      resolver.use(r);
      let rep: SessionReport;
      try {
        rep = await runOffline(r.session, {
          rules: set,
          metrics: opts.metrics,
          log: opts.log,
          hostname: opts.hostname,
          listeners,
          front: 'replay',
          ...(opts.maxHeaderBytes ? { maxHeaderBytes: opts.maxHeaderBytes } : {}),
        });
      } catch (e) {
        if (!(e instanceof OfflineInputError)) throw e;
        report.skipped.push({ session: r.id, reason: `${e.field}: ${e.message}` });
        continue;
      }
      const units = unitsOf(r);
      const before = recordedFates(r, units);
      const after = replayedFates(r, units, rep);
      units.forEach((u, i) => {
        const old = before[i] ?? ACCEPTED;
        const now = after[i] ?? ACCEPTED;
        const dir = directionOf(old, now);
        if (!dir) return;
        const rule = (dir === 'refused → accepted' || dir === 'tempfailed → accepted' ? old.rule : now.rule) ?? '(none)';
        const key = `${dir}\0${rule}`;
        let g = groups.get(key);
        if (!g) {
          g = { change: { direction: dir, rule, sessions: 0, transactions: 0, recipients: 0, examples: [] }, sessions: new Set(), txns: new Set() };
          groups.set(key, g);
        }
        g.sessions.add(r.id);
        changedSessions.add(r.id);
        if (u.txn !== null) {
          g.txns.add(`${r.id}/${u.txn}`);
          changedTxns.add(`${r.id}/${u.txn}`);
        }
        if (u.rcpt !== null) {
          g.change.recipients++;
          report.changed.recipients++;
        }
        const t = u.txn === null ? null : r.session.transactions[u.txn];
        if (g.change.examples.length < REPLAY_EXAMPLES) {
          g.change.examples.push({ session: r.id, client: r.session.client, from: t ? t.from : null, rcpt: t && u.rcpt !== null ? (t.rcpts[u.rcpt]?.to ?? null) : null, old: describeFate(old), new: describeFate(now) });
        }
      });
    }
  } finally {
    closeRuleSet(set);
  }
  for (const g of groups.values()) {
    g.change.sessions = g.sessions.size;
    g.change.transactions = g.txns.size;
    report.changes.push(g.change);
  }
  report.changes.sort((a, b) => DIRECTIONS.indexOf(a.direction) - DIRECTIONS.indexOf(b.direction) || b.sessions - a.sessions || a.rule.localeCompare(b.rule));
  report.changed.sessions = changedSessions.size;
  report.changed.transactions = changedTxns.size;
  report.dns = { ...resolver.counts, unrecordedAnswer: opts.live ? 'live' : 'SERVFAIL', unrecordedQueries: [...resolver.unrecordedQueries] };
  return report;
}

const plural = (n: number, one: string) => `${n} ${one}${n === 1 ? '' : 's'}`;

/** The report as a person reads it. */
export function formatReplay(r: ReplayReport): string {
  const out: string[] = [];
  out.push(`replayed ${plural(r.sessions, 'session')} (${plural(r.transactions, 'transaction')}, ${plural(r.recipients, 'recipient')}) from ${plural(r.files.length, 'file')} against the rules in ${r.rules}`);
  if (!r.changes.length) out.push('no difference');
  else {
    out.push(`changed: ${plural(r.changed.sessions, 'session')}, ${plural(r.changed.transactions, 'transaction')}, ${plural(r.changed.recipients, 'recipient')}`);
    for (const c of r.changes) {
      out.push('', `${c.direction}, rule ${c.rule}: ${plural(c.sessions, 'session')}, ${plural(c.transactions, 'transaction')}, ${plural(c.recipients, 'recipient')}`);
      for (const e of c.examples) {
        const env = e.from === null ? '' : ` from <${e.from}>${e.rcpt === null ? '' : ` to <${e.rcpt}>`}`;
        out.push(`  ${e.client}${env}`, `    was: ${e.old}`, `    now: ${e.new}`);
      }
    }
  }
  const d = r.dns;
  out.push('', `DNS: ${d.own} answers from the session's own record, ${d.otherSessions} from another session's, ${d.unrecorded} unrecorded (${d.unrecordedAnswer === 'live' ? 'asked live' : 'answered SERVFAIL'})`);
  for (const q of d.unrecordedQueries) out.push(`  unrecorded: ${q}`);
  for (const s of r.skipped) out.push(`skipped ${s.session}: ${s.reason}`);
  return out.join('\n') + '\n';
}

/** `doorman replay`'s exit status: 1 when anything changed, else 0 (3 for bad input: ReplayInputError). */
export function replayExit(r: ReplayReport): number {
  return r.changes.length ? 1 : 0;
}

/** The record files of a folder (a folder given as RECORDS…), in name order: oldest first. */
export function recordFiles(paths: readonly string[]): string[] {
  const out: string[] = [];
  for (const p of paths) {
    let st: fs.Stats;
    try {
      st = fs.statSync(p);
    } catch (e) {
      throw new ReplayInputError(`${p}: ${(e as Error).message}`);
    }
    if (st.isDirectory()) {
      out.push(
        ...fs
          .readdirSync(p)
          .filter((n) => n.endsWith('.jsonl'))
          .sort()
          .map((n) => path.join(p, n)),
      );
    } else out.push(p);
  }
  return out;
}
