/**
 * recorder.ts — what one session's record holds, gathered while it runs, and how the DNS lookups
 * and store operations of the shared resolver and store are told apart by session.
 *
 * `Recording` (one per process, when `record.dir` is set) decides per session whether it is
 * recorded (`record.sampleRate`) and owns the writer. A recorded session's front (smtp/stages.ts,
 * fronts/session.ts) gets a `SessionRecorder`, which
 *   - is handed each stage's event and verdict (`stage`): client, listener, TLS, login, HELO,
 *     each transaction's envelope with its parameters, the header block when asked, the size at
 *     end of data when a rule acts there. The front builds the events of the stages the record
 *     needs (`hears`: connect, HELO, AUTH, MAIL, RCPT; the header block's with `record.headers`)
 *     whether a rule acts on them or not — and no others;
 *   - runs the stage's evaluation inside its context (`within`): an AsyncLocalStorage, so the
 *     lookups and store operations the rules start there — and everything those start in turn,
 *     promises and timers included — are noted on this session. The resolver and store the rules
 *     get are wrapped (`recordingResolver`, `recordingStore`); rules know nothing of it. A lookup
 *     a rule answers from its own cache, or shares with another session's lookup in flight, is
 *     noted on the session that made it: replay answers it from that one (fronts/replay.ts);
 *   - writes its line once, at the session's end (`end`), never waiting for the disk.
 * Bounds per record: MAX_RECORD_TRANSACTIONS, MAX_RECORD_RCPTS, MAX_RECORD_VERDICTS,
 * MAX_RECORD_LOOKUPS (each of dns and store); what is left off is counted in `more`.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import type { RecordConfig } from '../config/schema.js';
import type { DnsResolver } from '../net/dns.js';
import type { SessionEvent, SessionSnapshot, Stage } from '../pipeline/events.js';
import type { StageVerdict } from '../pipeline/verdict.js';
import type { MailParam } from '../protocol/params.js';
import { replyText } from '../protocol/reply.js';
import type { Store } from '../store/store.js';
import { RECORD_VERSION, type DnsRecord, type SessionRecord, type StoreRecord, type TransactionRecord, type VerdictRecord } from './format.js';
import type { RecordWriter } from './writer.js';

/** Transactions kept per record; the rest are counted (more.transactions). */
export const MAX_RECORD_TRANSACTIONS = 50;
/** Recipients kept per transaction; the rest are counted (more.rcpts). */
export const MAX_RECORD_RCPTS = 1000;
/** Verdicts kept per record; the rest are counted (more.verdicts). */
export const MAX_RECORD_VERDICTS = 2000;
/** DNS lookups, and store operations, kept per record; the rest are counted (more.dns, more.store). */
export const MAX_RECORD_LOOKUPS = 500;

const current = new AsyncLocalStorage<SessionRecorder>();

/** Stages whose events a record needs whether a rule acts on them or not (the session's facts, the envelope). */
const RECORDED_STAGES: ReadonlySet<Stage> = new Set(['connect', 'helo', 'auth', 'mail', 'rcpt']);

export class Recording {
  constructor(
    readonly config: RecordConfig,
    readonly writer: RecordWriter,
    private readonly random: () => number = Math.random,
  ) {}

  /** A recorder for a new session, or null when the sample leaves it out. */
  session(front: string): SessionRecorder | null {
    const rate = this.config.sampleRate;
    if (rate <= 0 || (rate < 1 && this.random() >= rate)) return null;
    return new SessionRecorder(this, front);
  }

  close(): Promise<void> {
    return this.writer.close();
  }
}

export class SessionRecorder {
  private readonly started = Date.now();
  private id = '';
  private snapshot: SessionSnapshot | null = null;
  private authMechanism: string | undefined;
  private readonly transactions: TransactionRecord[] = [];
  /** The transaction number (SessionSnapshot.transaction) of the last one kept, and its index. */
  private txnNumber = 0;
  private txnIndex = -1;
  private readonly verdicts: VerdictRecord[] = [];
  private readonly dnsLog: DnsRecord[] = [];
  private readonly storeLog: StoreRecord[] = [];
  private readonly more: NonNullable<SessionRecord['more']> = {};
  /** Which transaction and recipient (indexes) each event answers: verdicts may come out of order (pipelining). */
  private readonly places = new WeakMap<SessionEvent, { txn?: number; rcpt?: number }>();
  private done = false;

  constructor(
    private readonly recording: Recording,
    private readonly front: string,
  ) {}

  /** Whether the header block is recorded (the front holds it for the data_headers stage). */
  get wantsHeaders(): boolean {
    return this.recording.config.headers;
  }

  /** The record needs this stage's event even when no rule acts on it. */
  hears(stage: Stage): boolean {
    return RECORDED_STAGES.has(stage) || (stage === 'data_headers' && this.recording.config.headers);
  }

  /** Runs a stage's evaluation in this session's context: its lookups are noted here. */
  within<T>(fn: () => T): T {
    return current.run(this, fn);
  }

  /** A stage evaluated in this session's context (its lookups are noted here), its verdict recorded. */
  stage(event: SessionEvent, evaluate: () => StageVerdict | Promise<StageVerdict>): StageVerdict | Promise<StageVerdict> {
    safely(() => this.event(event));
    const v = this.within(evaluate);
    if (!(v instanceof Promise)) {
      safely(() => this.verdict(event, v));
      return v;
    }
    return v.then((x) => {
      safely(() => this.verdict(event, x));
      return x;
    });
  }

  /** A stage's verdict, for the event it answers. */
  verdict(event: SessionEvent, v: StageVerdict): void {
    if (this.done || event.stage === 'quit') return;
    if (this.verdicts.length >= MAX_RECORD_VERDICTS) return this.count('verdicts');
    const where = this.places.get(event);
    if (where === undefined) return;
    this.verdicts.push({
      stage: event.stage,
      ...where,
      reply: v.reply ? { code: v.reply.code, enhanced: v.reply.enhanced, text: replyText(v.reply) } : null,
      decidedBy: v.decidedBy,
      ...(v.acceptedBy ? { acceptedBy: v.acceptedBy } : {}),
    });
  }

  dns(entry: DnsRecord): void {
    if (this.done) return;
    if (this.dnsLog.length >= MAX_RECORD_LOOKUPS) return this.count('dns');
    this.dnsLog.push(entry);
  }

  store(entry: StoreRecord): void {
    if (this.done) return;
    if (this.storeLog.length >= MAX_RECORD_LOOKUPS) return this.count('store');
    this.storeLog.push(entry);
  }

  /** The session ended: its line goes to the writer (never awaited). */
  end(): void {
    if (this.done) return;
    this.done = true;
    safely(() => this.write());
  }

  private write(): void {
    const s = this.snapshot;
    if (!s) return;
    const record: SessionRecord = {
      v: RECORD_VERSION,
      time: new Date(this.started).toISOString(),
      id: this.id,
      front: this.front,
      role: s.listener.role,
      session: {
        client: s.client.text,
        clientPort: s.clientPort,
        listener: s.listener.name,
        localAddress: s.localAddress,
        tls: s.tls,
        login: s.auth?.login ?? null,
        ...(this.authMechanism ? { authMechanism: this.authMechanism } : {}),
        helo: s.helo,
        esmtp: s.esmtp,
        transactions: this.transactions,
      },
      verdicts: this.verdicts,
      dns: this.dnsLog,
      store: this.storeLog,
      ...(Object.keys(this.more).length ? { more: this.more } : {}),
    };
    this.recording.writer.append(JSON.stringify(record));
  }

  private event(e: SessionEvent): void {
    if (this.done) return;
    // The last snapshot holds the session's final TLS, HELO and login (quit: its very end).
    this.snapshot = e.session;
    this.id = e.session.id;
    switch (e.stage) {
      case 'auth':
        this.authMechanism = e.mechanism;
        this.places.set(e, {});
        break;
      case 'mail':
        this.txnNumber = e.session.transaction;
        if (this.transactions.length >= MAX_RECORD_TRANSACTIONS) {
          this.txnIndex = -1;
          this.count('transactions');
          break;
        }
        this.txnIndex = this.transactions.push({ from: e.sender.raw, ...paramsOf(e.params, 'fromParams'), rcpts: [] }) - 1;
        this.places.set(e, { txn: this.txnIndex });
        break;
      case 'rcpt': {
        const t = this.txn(e.session);
        if (!t) break;
        if (t.rcpts.length >= MAX_RECORD_RCPTS) this.count('rcpts');
        else this.places.set(e, { txn: this.txnIndex, rcpt: t.rcpts.push({ to: e.recipient.raw, ...paramsOf(e.params, 'params') }) - 1 });
        break;
      }
      case 'data_headers': {
        const t = this.txn(e.session);
        if (!t) break;
        if (this.recording.config.headers) t.headers = e.headers.toString('latin1');
        this.places.set(e, { txn: this.txnIndex });
        break;
      }
      case 'data_end': {
        const t = this.txn(e.session);
        if (!t) break;
        t.size = e.size;
        this.places.set(e, { txn: this.txnIndex });
        break;
      }
      default:
        // Session stages (connect, helo, auth, etrn): no transaction.
        this.places.set(e, {});
        break;
    }
  }

  /** The transaction the event belongs to (null when it was left off). */
  private txn(s: SessionSnapshot): TransactionRecord | null {
    if (s.transaction !== this.txnNumber || this.txnIndex < 0) return null;
    return this.transactions[this.txnIndex] ?? null;
  }

  private count(what: keyof NonNullable<SessionRecord['more']>): void {
    this.more[what] = (this.more[what] ?? 0) + 1;
  }
}

/** Recording never harms a session: a failure here loses (part of) the record, nothing else. */
function safely(fn: () => void): void {
  try {
    fn();
  } catch {
    // The record is incomplete; the session goes on.
  }
}

function paramsOf<K extends string>(list: readonly MailParam[], key: K): { [P in K]?: Record<string, string> } {
  if (!list.length) return {};
  return { [key]: Object.fromEntries(list.map((p) => [p.key, p.value ?? ''])) } as { [P in K]?: Record<string, string> };
}

/** The error code of a failed lookup or operation. */
function codeOf(err: unknown): string {
  const c = (err as { code?: unknown } | null)?.code;
  return typeof c === 'string' ? c : err instanceof Error ? err.message : String(err);
}

/** `p`'s outcome noted on the session whose context started it (none: nothing to note). */
function noted<T>(p: Promise<T>, note: (rec: SessionRecorder, ok: boolean, v: unknown) => void): Promise<T> {
  const rec = current.getStore();
  if (!rec) return p;
  return p.then(
    (v) => {
      safely(() => note(rec, true, v));
      return v;
    },
    (err: unknown) => {
      safely(() => note(rec, false, err));
      throw err;
    },
  );
}

/** The resolver the rules get while recording: each lookup noted on the session that made it. */
export function recordingResolver(r: DnsResolver): DnsResolver {
  const note = (type: string, name: string) => (rec: SessionRecorder, ok: boolean, v: unknown) =>
    rec.dns(ok ? { type, name, answer: v } : { type, name, error: codeOf(v) });
  const withTtl = (type: string, name: string) => (rec: SessionRecorder, ok: boolean, v: unknown) => {
    if (!ok) return rec.dns({ type, name, error: codeOf(v) });
    const list = v as { address: string; ttl: number }[];
    rec.dns({ type, name, answer: list.map((a) => a.address), ttls: list.map((a) => a.ttl) });
  };
  return {
    servers: r.servers,
    resolve: (name, rrtype) => noted(r.resolve(name, rrtype), note(rrtype.toUpperCase(), name)),
    resolveA: (name) => noted(r.resolveA(name), withTtl('A', name)),
    resolveAAAA: (name) => noted(r.resolveAAAA(name), withTtl('AAAA', name)),
    reverse: (ip) => noted(r.reverse(ip), note('PTR', ip)),
  };
}

/** The store the rules get while recording: each operation noted on the session that made it. */
export function recordingStore(s: Store): Store {
  const note = (op: string, key: string, args: (string | number)[]) => (rec: SessionRecorder, ok: boolean, v: unknown) =>
    rec.store(ok ? { op, key, args, ...(v === undefined ? {} : { result: v }) } : { op, key, args, error: codeOf(v) });
  return {
    kind: s.kind,
    rate: (key, windowMs, limit, cost) => noted(s.rate(key, windowMs, limit, cost), note('rate', key, [windowMs, limit, cost])),
    acquire: (key, token, limit, ttlMs) => noted(s.acquire(key, token, limit, ttlMs), note('acquire', key, [token, limit, ttlMs])),
    release: (key, token) => noted(s.release(key, token), note('release', key, [token])),
    greylist: (key, delayMs, retryWindowMs, lifetimeMs) => noted(s.greylist(key, delayMs, retryWindowMs, lifetimeMs), note('greylist', key, [delayMs, retryWindowMs, lifetimeMs])),
    peekSlots: (key, token, limit) => noted(s.peekSlots(key, token, limit), note('peekSlots', key, [token, limit])),
    peekGreylist: (key, delayMs) => noted(s.peekGreylist(key, delayMs), note('peekGreylist', key, [delayMs])),
    inspect: (key) => s.inspect(key),
    reset: (key) => s.reset(key),
    ready: (timeoutMs) => s.ready(timeoutMs),
    close: () => s.close(),
  };
}
