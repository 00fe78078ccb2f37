/**
 * session.ts — a session of the rule pipeline for a front that is not doorman's own SMTP: the
 * policy server (fronts/policy/), the milter (fronts/milter/).
 *
 * Such a front does not speak SMTP to the client: its MTA tells it the facts (client address and
 * port, listener, HELO, TLS, login, sender, recipients, the transaction's number), it sets them
 * here and asks for a stage's verdict. `FrontSession` keeps those facts, gives the rules their
 * `SessionSnapshot`, feeds the one pipeline (`openPipeline(rules, hooks).attach(events$, ended)`,
 * pipeline/run.ts) exactly as the SMTP session does (smtp/stages.ts, smtp/state.ts; not imported:
 * fronts never import smtp/), notes what each verdict means for the session (refusals in
 * doorman_rejections_total, allowlisting, tags, authentication results, findings for the log within
 * MAX_LOGGED_OUTCOMES, late dry-run findings) and writes the one log line per session, with
 * `front` (policy, milter) so the line says which front saw it.
 */
import { Subject } from 'rxjs';
import type { Logger } from 'pino';
import type { RuleSet } from '../config/rules.js';
import type { Limits } from '../config/schema.js';
import type { Metrics } from '../metrics/registry.js';
import type { ClientAddress } from '../net/ip.js';
import { SESSION_ENDED, nextSessionId, type SessionEvent, type SessionSnapshot, type Stage } from '../pipeline/events.js';
import { openPipeline, type PipelineSession } from '../pipeline/run.js';
import { EMPTY_VERDICT, ruleLogEntry, type RuleOutcome, type StageVerdict } from '../pipeline/verdict.js';
import type { AuthResult } from '../protocol/auth-results.js';
import type { ParsedPath } from '../protocol/address.js';
import type { Recording, SessionRecorder } from '../record/recorder.js';

/** Which front saw the session (the log line's `front`): an MTA's (policy, milter) or one without a client (explain, replay: fronts/offline.ts). */
export type FrontName = 'policy' | 'milter' | 'explain' | 'replay';

/** Findings other than pass kept for the log line; the rest are counted (moreRules). */
export const MAX_LOGGED_OUTCOMES = 100;
/** Recipients kept for the log line and the snapshot; the rest are counted (moreRcpts). */
export const MAX_LOGGED_RCPTS = 100;
/** Distinct tags kept per session; the rest are counted (moreTags). */
export const MAX_TAGS = 10;
/** Transactions kept for the log line (a milter connection may carry many); the rest are counted (moreTransactions). */
export const MAX_LOGGED_TRANSACTIONS = 20;

/** Stages whose allowlisting and tags hold for the whole session (the others: one transaction). */
const SESSION_STAGES: ReadonlySet<Stage> = new Set(['connect', 'helo', 'auth']);
/**
 * Stages whose allowlisting holds beyond their event: the session's, and MAIL (its transaction).
 * An accept at RCPT is that recipient's alone (docs/rules.md "Stages and precedence"), as in the
 * SMTP session: the next recipient goes through the bypassable rules again.
 */
const ACCEPT_STAGES: ReadonlySet<Stage> = new Set([...SESSION_STAGES, 'mail']);

export interface FrontDeps {
  readonly front: FrontName;
  readonly listener: { readonly name: string; readonly role: SessionSnapshot['listener']['role'] };
  readonly rules: RuleSet;
  readonly metrics: Metrics;
  readonly log: Logger;
  /** Dry-run checks left running per session (limits.maxPendingDryRun). */
  readonly maxPendingDryRun: number;
  /** Session records (record.dir); null or absent: off. */
  readonly recording?: Recording | null;
}

/** What a front that an MTA calls (policy server, milter) is given; `role` is its listener role. */
export interface MtaFrontDeps<Role extends 'policy' | 'milter'> {
  readonly listener: { readonly name: string; readonly role: Role };
  /** The current rule set; a session keeps the one it started with. */
  readonly rules: () => RuleSet;
  /** The current limits (a reload applies to new connections and sessions). */
  readonly limits: () => Limits;
  readonly metrics: Metrics;
  readonly log: Logger;
  /** Counts a rule set as used until the returned function is called (reloads close unused sets). */
  readonly useRuleSet?: (set: RuleSet) => () => void;
  /** Session records (record.dir); null or absent: off. */
  readonly recording?: Recording | null;
}

/** What the front knows of the client when the session starts. */
export interface ClientFacts {
  readonly client: ClientAddress;
  readonly clientPort: number;
  /** The MTA's own address the client reached ('' when the MTA does not say). */
  readonly localAddress: string;
}

export class FrontSession {
  readonly id = nextSessionId();
  readonly started = Date.now();
  readonly events$ = new Subject<SessionEvent>();
  readonly ended = new AbortController();
  helo: string | null = null;
  esmtp = false;
  tls = false;
  auth: { mechanism: string; login: string | null } | null = null;
  transaction = 0;
  sender: ParsedPath | null = null;
  readonly recipients: ParsedPath[] = [];
  moreRcpts = 0;
  /** Allowlisted for the session (connect, HELO) or the transaction (MAIL). */
  acceptedBy: string | null = null;
  readonly authResults: AuthResult[] = [];
  /** Tags for the message (X-Doorman-Tag values), at most MAX_TAGS. */
  readonly tags: string[] = [];
  /** The front's own facts for the log line (queue id, size, instance…). */
  readonly facts: Record<string, string | number> = {};
  /** Each recipient and the reply code the front gave for it (250: let through). */
  readonly rcptLog: { to: string; code: number }[] = [];
  /** The current transaction's own facts for the log line (queue id, outcome…). */
  txnFacts: Record<string, string | number> = {};
  outcome = 'open';
  private readonly outcomes: RuleOutcome[] = [];
  private droppedOutcomes = 0;
  private droppedTags = 0;
  /** Earlier transactions of the session, for the log line (beginTransaction). */
  private readonly pastTxns: object[] = [];
  private droppedTxns = 0;
  /** Allowlisting and tags of the session-wide stages (connect, HELO, AUTH). */
  private sessionAcceptedBy: string | null = null;
  private sessionTags = 0;
  private written = false;
  private readonly pipe: PipelineSession;
  /** This session's record (record.dir, sampled), or null. */
  private readonly recorder: SessionRecorder | null;

  constructor(
    private readonly deps: FrontDeps,
    readonly client: ClientFacts,
  ) {
    this.pipe = openPipeline(deps.rules.rules, {
      metrics: deps.metrics,
      onRuleError: (rule, kind, err) => deps.log.warn({ session: this.id, front: deps.front, rule, kind, err: err instanceof Error ? err.message : String(err) }, 'rule failed'),
      late: (o, ev) => this.late(o, ev),
      maxPendingDryRun: deps.maxPendingDryRun,
    }).attach(this.events$, this.ended.signal);
    this.recorder = deps.recording?.session(deps.front) ?? null;
  }

  snapshot(): SessionSnapshot {
    return {
      id: this.id,
      client: this.client.client,
      clientPort: this.client.clientPort,
      listener: this.deps.listener,
      localAddress: this.client.localAddress,
      tls: this.tls,
      helo: this.helo,
      esmtp: this.esmtp,
      auth: this.auth,
      transaction: this.transaction,
      sender: this.sender,
      recipients: [...this.recipients],
      recipientsForwarded: this.recipients.length,
      acceptedBy: this.acceptedBy,
      authResults: [...this.authResults],
      ended: this.ended.signal,
    };
  }

  /** A rule acts on the stage (or someone else observes events$, or the session's record needs it): only then is the event built. */
  heard(stage: Stage): boolean {
    return this.deps.rules.stages.has(stage) || this.events$.observers.length > 1 || this.recorder?.hears(stage) === true;
  }

  /** One stage's verdict; the event is built only when a rule acts on the stage. */
  run(stage: Stage, make: () => SessionEvent): StageVerdict | Promise<StageVerdict> {
    if (this.ended.signal.aborted || !this.heard(stage)) return EMPTY_VERDICT;
    const event = make();
    const rec = this.recorder;
    if (rec) return rec.stage(event, () => this.evaluate(stage, event));
    return this.evaluate(stage, event);
  }

  private evaluate(stage: Stage, event: SessionEvent): StageVerdict | Promise<StageVerdict> {
    this.events$.next(event);
    const v = this.pipe.verdict(event);
    return v instanceof Promise ? v.then((x) => this.note(stage, x)) : this.note(stage, v);
  }

  /**
   * A new transaction (a front carrying several messages per session, the milter): the last one
   * goes to the log line; sender, recipients, authentication results and the transaction's
   * allowlisting and tags start again (the session's stay).
   */
  beginTransaction(sender: ParsedPath): void {
    if (this.transaction > 0) {
      if (this.pastTxns.length < MAX_LOGGED_TRANSACTIONS) this.pastTxns.push(this.txnEntry());
      else this.droppedTxns++;
    }
    this.transaction++;
    this.sender = sender;
    this.recipients.length = 0;
    this.rcptLog.length = 0;
    this.moreRcpts = 0;
    this.authResults.length = 0;
    this.txnFacts = {};
    this.acceptedBy = this.sessionAcceptedBy;
    this.tags.length = Math.min(this.tags.length, this.sessionTags);
  }

  /** Message chunks to the rules that read the body (pipeline/run.ts `body`); a Promise while a reader lags. */
  body(chunks: readonly Buffer[], last: boolean): void | Promise<void> {
    if (this.ended.signal.aborted || !this.pipe.wantsBody) return;
    return this.pipe.body(chunks, last, () => this.snapshot());
  }

  /** Some rule reads the message body. */
  get wantsBody(): boolean {
    return this.pipe.wantsBody;
  }

  /** A recipient the front let through: in the snapshot of later stages (bounded). */
  addRecipient(p: ParsedPath): void {
    if (this.recipients.length < MAX_LOGGED_RCPTS) this.recipients.push(p);
  }

  /** A recipient's answer for the log line (bounded). */
  logRcpt(to: string, code: number): void {
    if (this.rcptLog.length < MAX_LOGGED_RCPTS) this.rcptLog.push({ to, code });
    else this.moreRcpts++;
  }

  /** Ends the session: the rules' end hooks get its last snapshot, pending waits are dropped, the log line is written. */
  end(reason: string): void {
    if (this.ended.signal.aborted) return;
    if (this.heard('quit')) this.events$.next({ stage: 'quit', session: this.snapshot(), reason });
    this.ended.abort(SESSION_ENDED);
    this.events$.complete();
    this.recorder?.end();
    this.writeLog(reason);
  }

  private note(stage: Stage, v: StageVerdict): StageVerdict {
    for (const o of v.outcomes) if (o.finding !== 'pass') this.noteOutcome(o);
    if (v.reply && v.decidedBy) {
      this.deps.metrics.rejections.inc({ front: this.deps.front, rule: v.decidedBy, stage, code: String(v.reply.code), enhanced_code: v.reply.enhanced });
    }
    if (v.acceptedBy && !this.acceptedBy && ACCEPT_STAGES.has(stage)) this.acceptedBy = v.acceptedBy;
    for (const t of v.tags) {
      if (this.tags.includes(t)) continue;
      if (this.tags.length < MAX_TAGS) this.tags.push(t);
      else this.droppedTags++;
    }
    if (SESSION_STAGES.has(stage)) {
      this.sessionAcceptedBy ??= v.acceptedBy;
      this.sessionTags = this.tags.length;
    }
    this.authResults.push(...v.results);
    return v;
  }

  private txnEntry(): object {
    return { from: this.sender ? `<${this.sender.raw}>` : '<>', rcpts: [...this.rcptLog], ...(this.moreRcpts ? { moreRcpts: this.moreRcpts } : {}), ...this.txnFacts };
  }

  private noteOutcome(o: RuleOutcome): void {
    if (this.outcomes.length < MAX_LOGGED_OUTCOMES) this.outcomes.push(o);
    else this.droppedOutcomes++;
  }

  /** A dry-run finding after its stage's answer: in the log line if still open, else a line of its own. */
  private late(o: RuleOutcome, ev: SessionEvent): void {
    if (o.results && ev.session.transaction === this.transaction && !this.written) this.authResults.push(...o.results);
    if (o.finding === 'pass') return;
    if (!this.written) this.noteOutcome(o);
    else this.deps.log.info({ session: this.id, front: this.deps.front, client: this.client.client.text, rule: ruleLogEntry(o) }, 'late rule finding');
  }

  private writeLog(reason: string): void {
    if (this.written) return;
    this.written = true;
    this.deps.log.info(
      {
        session: this.id,
        front: this.deps.front,
        client: this.client.client.text,
        port: this.client.clientPort,
        listener: this.deps.listener.name,
        helo: this.helo,
        tls: this.tls,
        login: this.auth?.login ?? null,
        ...this.facts,
        transactions: this.transaction ? [...this.pastTxns, this.txnEntry()] : [],
        ...(this.droppedTxns ? { moreTransactions: this.droppedTxns } : {}),
        rules: this.outcomes.map(ruleLogEntry),
        ...(this.droppedOutcomes ? { moreRules: this.droppedOutcomes } : {}),
        ...(this.tags.length ? { tags: this.tags } : {}),
        ...(this.droppedTags ? { moreTags: this.droppedTags } : {}),
        outcome: this.outcome,
        end: reason,
        ms: Date.now() - this.started,
      },
      'session',
    );
  }
}
