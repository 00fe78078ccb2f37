/**
 * stages.ts — the session's side of the rule pipeline.
 *
 * The session as a stream of typed events (`events$`), followed by the one rule pipeline
 * (pipeline/run.ts): `run` gives a stage's verdict — synchronously when every rule answered at
 * once — and builds the event only when a rule acts on the stage or someone else observes
 * events$. It notes what the session keeps of each verdict (refusals in the rejections metric,
 * findings for the log line within MAX_LOGGED_OUTCOMES, the connect stage's allowlisting and
 * tags), dry-run findings that arrive after their stage's reply, the message body for the rules
 * that read it, and the end: the last snapshot for the rules' end hooks, then every pending
 * check's wait dropped at once.
 */
import { Subject } from 'rxjs';
import { SESSION_ENDED, type SessionEvent, type Stage } from '../pipeline/events.js';
import { openPipeline, type PipelineSession } from '../pipeline/run.js';
import { EMPTY_VERDICT, type RuleOutcome, type StageVerdict } from '../pipeline/verdict.js';
import type { SessionRecorder } from '../record/recorder.js';
import { Unstuffer } from './framing.js';
import { MAX_LOGGED_OUTCOMES, ruleLogEntry, type SessionLog } from './session-log.js';
import type { SessionDeps, SessionState } from './state.js';

export class SessionStages {
  /** The session as a stream of typed events; completes when the session ends. */
  readonly events$ = new Subject<SessionEvent>();
  /** Findings other than pass, for the log line (at most MAX_LOGGED_OUTCOMES; the rest counted). */
  readonly outcomes: RuleOutcome[] = [];
  droppedOutcomes = 0;
  /** The rule pipeline following events$: each event's verdict (pipeline/run.ts). */
  private readonly pipe: PipelineSession;
  /** This session's record (record.dir, sampled), or null. */
  readonly recorder: SessionRecorder | null;

  constructor(
    private readonly state: SessionState,
    private readonly deps: SessionDeps,
    private readonly sessionLog: SessionLog,
  ) {
    this.pipe = openPipeline(deps.rules.rules, {
      metrics: deps.metrics,
      onRuleError: (rule, kind, err) => deps.log.warn({ session: state.id, rule, kind, err: err instanceof Error ? err.message : String(err) }, 'rule failed'),
      late: (o, ev) => this.late(o, ev),
      maxPendingDryRun: deps.limits.maxPendingDryRun,
      unstuff: () => {
        const u = new Unstuffer();
        return (chunks) => u.push(chunks);
      },
    }).attach(this.events$, state.ended.signal);
    this.recorder = deps.recording?.session('smtp') ?? null;
  }

  /**
   * Evaluates one stage. The event (with its session snapshot) is built only when a rule acts on
   * the stage or someone observes events$: a stage without rules costs nothing.
   */
  run(stage: Stage, make: () => SessionEvent): StageVerdict | Promise<StageVerdict> {
    if (!this.heard(stage)) return EMPTY_VERDICT;
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

  /** Some rule reads the message body (its verdict comes at data_end). */
  get readsBody(): boolean {
    return this.pipe.wantsBody;
  }

  /** Body chunks to the rules that read them (none: nothing is handed over); a Promise while a reader lags. */
  body(chunks: readonly Buffer[], last: boolean): void | Promise<void> {
    return this.pipe.wantsBody ? this.pipe.body(chunks, last, () => this.state.snapshot()) : undefined;
  }

  /**
   * The session ended: the last snapshot for the rules' end hooks; then the pipeline drops every
   * pending check's wait at once and ends the rules' state (after dry-run checks still running).
   */
  end(): void {
    const s = this.state;
    if (this.heard('quit')) this.events$.next({ stage: 'quit', session: s.snapshot(), reason: s.endReason });
    s.ended.abort(SESSION_ENDED);
    this.events$.complete();
    this.recorder?.end();
  }

  /** A rule acts on the stage, someone besides the pipeline observes events$, or the session's record needs it: only then is its event built. */
  private heard(stage: Stage): boolean {
    return this.deps.rules.stages.has(stage) || this.events$.observers.length > 1 || this.recorder?.hears(stage) === true;
  }

  private note(stage: Stage, v: StageVerdict): StageVerdict {
    for (const o of v.outcomes) if (o.finding !== 'pass') this.noteOutcome(o);
    if (v.reply && v.decidedBy) {
      this.deps.metrics.rejections.inc({ front: 'smtp', rule: v.decidedBy, stage, code: String(v.reply.code), enhanced_code: v.reply.enhanced });
    }
    if (stage === 'connect') {
      if (v.acceptedBy) this.state.acceptedBy = v.acceptedBy;
      this.sessionLog.addTags(this.state.tags, v.tags);
    }
    // MAIL's results go to the transaction it opens (envelope.ts); later stages' to the current one.
    if (stage !== 'mail') this.state.txn?.addAuthResults(v.results);
    return v;
  }

  /** A finding for the session log line, within MAX_LOGGED_OUTCOMES (the rest are counted). */
  private noteOutcome(o: RuleOutcome): void {
    if (this.outcomes.length < MAX_LOGGED_OUTCOMES) this.outcomes.push(o);
    else this.droppedOutcomes++;
  }

  /**
   * A dry-run finding that arrived after its stage's reply: in the session log line when it came
   * before the session ended, else in a log line of its own ('late rule finding').
   */
  private late(o: RuleOutcome, ev: SessionEvent): void {
    const s = this.state;
    if (o.results && ev.session.transaction === s.txnNumber) s.txn?.addAuthResults(o.results);
    if (o.finding === 'pass') return;
    if (!this.sessionLog.written) this.noteOutcome(o);
    else this.deps.log.info({ session: this.state.id, client: this.state.client.text, rule: ruleLogEntry(o) }, 'late rule finding');
  }
}

