/**
 * run.ts — the pipeline runner: a session's events in, each event's StageVerdict out.
 *
 * `openPipeline(rules, hooks)` takes a rule set; `attach(events$, ended)` follows one session: it
 * subscribes to the session's events (an Observable from any front — the SMTP session today; a
 * milter, a policy server, `explain` or `replay` tomorrow: nothing here knows a socket) and
 * evaluates each event's stage; `verdict(event)` hands the result to the front.
 *
 * A stage is one RxJS pipeline. Its rules run concurrently (`mergeMap`), in two tiers: rules that
 * are not bypassable (pure matching: access, relay, sender) first; the bypassable ones (DNS,
 * Redis) only when the first tier did not refuse. Each check is wrapped so that nothing a rule
 * does can harm the session: a synchronous throw, a rejected Promise, an Observable that errors
 * or completes empty, and a rule slower than its `timeout` (the operator) all become the rule's
 * `onError` outcome (`pass`: fail open, the default; `tempfail`: 451/421 4.3.0), are counted in
 * doorman_rule_errors_total{rule,kind} and logged with the rule's name. The outcomes are then
 * combined by verdict.ts. How one rule's answer becomes its outcome (deadline, `onError`, metrics)
 * is outcome.ts.
 *
 * Cost: a stage without applicable rules costs nothing (no Observable is built); a check that
 * answers with a value needs no deadline, so a stage whose rules all answer synchronously
 * (matching rules, cache hits) emits its verdict during the subscription and `verdict` returns it
 * as a value — no Promise, no timer, no microtask hop between pipelined commands.
 *
 * Cancellation: the waits of a session's checks belong to its subscription. When the session
 * ends (its events complete) they are unsubscribed at once: a Promise's wait is
 * dropped (`from` + unsubscribe: the session is no longer referenced from it), an Observable's
 * teardown runs (a lookup of its own is cancelled); a lookup shared with other sessions goes on
 * for them. The front's pending `verdict` Promise then never settles: nothing waits on it.
 *
 * Never waiting for what cannot change the reply: with `hooks.late`, a rule in `dry-run` whose
 * check did not answer at once is subscribed apart from the stage (up to `maxPendingDryRun` per
 * session; past it the stage waits for it like for any rule). Its outcome is recorded (metrics,
 * `onRuleError`) when it arrives and handed to `hooks.late`; the session's end does not cancel it
 * (its deadline bounds it), and the rules' end hooks wait for it.
 *
 * State: a rule's per-session state (`Rule.session`) is created by the runner at its first use
 * in the session, passed to each call and dropped at the session's end, after the rule's `end`
 * hook (called only for a state that was created).
 *
 * Body: rules with a BodyReader get the message's unstuffed chunks as the front feeds them
 * (`body`), one `concatMap` per reader; past `maxBodyLag` bytes not yet consumed by a reader, the
 * feed returns a Promise the front awaits before reading on (back-pressure).
 */
import { AsyncSubject, defer, from, isObservable, Observable, of, Subject, Subscription } from 'rxjs';
import { concatMap, defaultIfEmpty, map, mergeMap, take, tap, toArray } from 'rxjs/operators';
import type { EventOf, SessionEvent, SessionSnapshot, Stage } from './events.js';
import type { Finding, FindingResult, Rule } from './rule.js';
import type { LoadedRule, PipelineHooks } from './loaded.js';
import { errorOutcome, ruleOutcome, type CheckCall } from './outcome.js';
import { inScope, inSessionScope } from './scope.js';
import { combine, EMPTY_VERDICT, type RuleOutcome, type StageVerdict } from './verdict.js';

export type { LoadedRule, PipelineHooks };


/** Body bytes a reader may lag behind the feed before the session stops reading (back-pressure). */
export const MAX_BODY_LAG = 1 << 20;

export interface Pipeline {
  /** Some rule reads the message body: the front feeds it (`PipelineSession.body`). */
  readonly wantsBody: boolean;
  /**
   * Follows one session's events until they complete (the session's end: the front completes
   * them when it aborts `ended`). A session already ended is not followed.
   */
  attach(events$: Observable<SessionEvent>, ended: AbortSignal): PipelineSession;
}

export interface PipelineSession {
  /** Some rule reads the message body: the front feeds it (`body`). */
  readonly wantsBody: boolean;
  /**
   * The verdict of `event`, evaluated when the events Observable emitted it (or now, if it did
   * not): a value when every check answered at once. `quit` is bookkeeping: always empty.
   */
  verdict(event: SessionEvent): StageVerdict | Promise<StageVerdict>;
  /**
   * Message chunks as received (`last`: the end of data follows); undefined when readers keep
   * up, else a Promise that settles once none lags more than maxBodyLag. A no-op without body
   * rules. The next message starts with the next chunk after `last`. `snapshot` gives the session
   * as it stands (called once per message, at its first chunk, for the readers' `begin`).
   */
  body(chunks: readonly Buffer[], last: boolean, snapshot?: () => SessionSnapshot): void | Promise<void>;
}

/** Rules by stage, once per rule set. */
interface Plan {
  readonly byStage: ReadonlyMap<Stage, readonly LoadedRule[]>;
  readonly readers: readonly LoadedRule[];
}
const plans = new WeakMap<readonly LoadedRule[], Plan>();

function planOf(rules: readonly LoadedRule[]): Plan {
  let p = plans.get(rules);
  if (p) return p;
  const byStage = new Map<Stage, LoadedRule[]>();
  for (const lr of rules) {
    const r = lr.rule;
    const stages = new Set<Stage>([...(Object.keys(r.checks) as Stage[]), ...(Object.keys(r.starts ?? {}) as Stage[])]);
    if (r.body) stages.add('data_end');
    for (const s of stages) {
      const list = byStage.get(s) ?? [];
      list.push(lr);
      byStage.set(s, list);
    }
  }
  p = { byStage, readers: rules.filter((lr) => lr.rule.body) };
  plans.set(rules, p);
  return p;
}

export function openPipeline(rules: readonly LoadedRule[], hooks: PipelineHooks = {}): Pipeline {
  const plan = planOf(rules);
  return {
    wantsBody: plan.readers.length > 0,
    attach: (events$, ended) => new Run(plan, hooks, events$, ended),
  };
}

type Handler = (event: SessionEvent, state: unknown) => FindingResult;
type Starter = (event: SessionEvent, state: unknown) => void;

/** One message's readers: their chunk queues, lag, and when each has consumed everything. */
interface Reading {
  readonly chunks: Subject<Buffer>;
  readonly unstuff: ((chunks: readonly Buffer[]) => Buffer[]) | null;
  readonly lag: Map<LoadedRule, number>;
  readonly done: Map<LoadedRule, AsyncSubject<void>>;
  readonly waiters: (() => void)[];
}

/** One session following its events. */
class Run implements PipelineSession {
  /** The waits of checks the session is owed: unsubscribed when it ends. */
  private readonly pending = new Subscription();
  /** Dry-run checks left running (not cancelled at the end; their deadline bounds them). */
  private late = 0;
  private readonly states = new Map<LoadedRule, unknown>();
  private last: { event: SessionEvent; verdict: StageVerdict | Promise<StageVerdict> } | null = null;
  private snapshot: SessionSnapshot | null = null;
  private ended = false;
  private endHooksDue = false;
  private reading: Reading | null = null;
  private readonly maxLate: number;
  private readonly maxLag: number;
  readonly wantsBody: boolean;

  constructor(
    private readonly plan: Plan,
    private readonly hooks: PipelineHooks,
    events$: Observable<SessionEvent>,
    signal: AbortSignal,
  ) {
    this.maxLate = hooks.late ? (hooks.maxPendingDryRun ?? 16) : 0;
    this.maxLag = hooks.maxBodyLag ?? MAX_BODY_LAG;
    this.wantsBody = plan.readers.length > 0;
    const end = () => this.end();
    if (signal.aborted) {
      this.ended = true;
      return;
    }
    this.pending.add(
      events$.subscribe({
        next: (event) => {
          this.snapshot = event.session;
          this.last = { event, verdict: this.evaluate(event) };
        },
        complete: end,
        error: end,
      }),
    );
  }

  verdict(event: SessionEvent): StageVerdict | Promise<StageVerdict> {
    const last = this.last;
    if (last?.event === event) {
      this.last = null;
      return last.verdict;
    }
    return this.evaluate(event);
  }

  // ---------------------------------------------------------------- stages

  private evaluate(event: SessionEvent): StageVerdict | Promise<StageVerdict> {
    this.snapshot = event.session;
    if (event.stage === 'quit' || this.ended) return EMPTY_VERDICT;
    const all = this.plan.byStage.get(event.stage);
    if (!all) return EMPTY_VERDICT;
    // An allowlisted session skips bypassable rules. A rule out of scope is not asked
    // (scope.ts); one that only starts work here needs the part of its scope the session already tells.
    const accepted = event.session.acceptedBy;
    const applicable = all.filter(
      (lr) =>
        !(accepted && lr.rule.bypassable) &&
        ((this.checks(lr, event.stage) && inScope(lr.scope, event)) || (lr.rule.starts !== undefined && event.stage in lr.rule.starts && inSessionScope(lr.scope, event))),
    );
    if (applicable.length === 0) return EMPTY_VERDICT;
    const v = this.stage(applicable, event);
    if (!isObservable(v)) return this.settleRefused(applicable, event, v);
    return this.subscribe(v.pipe(map((x) => this.settleRefused(applicable, event, x))));
  }

  /** Subscribes now: a value if the verdict came synchronously, else a Promise (cancelled with the session). */
  private subscribe(v$: Observable<StageVerdict>): StageVerdict | Promise<StageVerdict> {
    type Sync = { value: StageVerdict } | { error: unknown };
    let sync: Sync | null = null;
    let settle: ((v: StageVerdict) => void) | null = null;
    let fail: ((e: unknown) => void) | null = null;
    const sub = v$.subscribe({
      next: (v) => (settle ? settle(v) : (sync = { value: v })),
      error: (e: unknown) => (fail ? fail(e) : (sync = { error: e })),
    });
    // Assigned in the callbacks above, during the subscription when the verdict came at once.
    const now = sync as Sync | null;
    if (now) return 'value' in now ? now.value : Promise.reject(now.error);
    this.pending.add(sub);
    sub.add(() => this.pending.remove(sub));
    return new Promise<StageVerdict>((resolve, reject) => {
      settle = resolve;
      fail = reject;
    });
  }

  private checks(lr: LoadedRule, stage: Stage): boolean {
    return stage in lr.rule.checks || (stage === 'data_end' && lr.rule.body !== undefined);
  }

  /**
   * Two tiers: the cheap, final rules first; what they refuse costs the bypassable ones nothing.
   * A value when every check answered with one (no operator needed), else an Observable.
   */
  private stage(applicable: readonly LoadedRule[], event: SessionEvent): StageVerdict | Observable<StageVerdict> {
    const accepted = event.session.acceptedBy;
    const hard = applicable.filter((r) => !r.rule.bypassable);
    const soft = applicable.filter((r) => r.rule.bypassable);
    if (hard.length === 0 || soft.length === 0) return mapped(this.tier(applicable, event), (o) => combine(o, accepted));
    const second = (first: RuleOutcome[]): StageVerdict | Observable<StageVerdict> => {
      const v = combine(first, accepted);
      if (v.reply) return v;
      return mapped(this.tier(soft, event), (o) => combine([...first, ...o], accepted));
    };
    const first = this.tier(hard, event);
    return isObservable(first) ? first.pipe(mergeMap((f) => asObservable(second(f)))) : second(first);
  }

  /**
   * One tier: the work of rules that start at this stage is started, then every check is called
   * at once. The outcomes, in rule order: at once when every check answered with a value; else
   * gathered as they come (`mergeMap`, each with its deadline). A dry-run check that did not
   * answer at once is subscribed apart (`late`).
   */
  private tier(tier: readonly LoadedRule[], event: SessionEvent): RuleOutcome[] | Observable<RuleOutcome[]> {
    const started = performance.now();
    const stage = event.stage;
    const out: (RuleOutcome | Observable<RuleOutcome>)[] = [];
    let waiting = false;
    for (const lr of tier) {
      const begin = (lr.rule.starts as Record<string, Starter | undefined> | undefined)?.[stage];
      if (begin) {
        try {
          begin.call(lr.rule.starts, event, this.stateOf(lr, event.session));
        } catch (err) {
          out.push(errorOutcome(lr, stage, err, performance.now() - started, this.hooks));
        }
      }
      if (!this.checks(lr, stage) || !inScope(lr.scope, event)) continue;
      const o = ruleOutcome(lr, stage, this.call(lr, event), started, this.hooks);
      if (!isObservable(o)) {
        out.push(o);
        continue;
      }
      if (this.late < this.maxLate && lr.action === 'dry-run') {
        this.detach(o, event);
        continue;
      }
      waiting = true;
      out.push(o);
    }
    if (!waiting) return out as RuleOutcome[];
    return from(out.map((o, i) => (isObservable(o) ? o : of(o)).pipe(map((x): [number, RuleOutcome] => [i, x])))).pipe(
      mergeMap((o$) => o$),
      toArray(),
      map((list) => list.sort((a, b) => a[0] - b[0]).map((x) => x[1])),
    );
  }

  /** The rule's check for the event: what it answered, or what it threw. */
  private call(lr: LoadedRule, event: SessionEvent): CheckCall {
    try {
      const state = this.stateOf(lr, event.session);
      if (event.stage === 'data_end' && lr.rule.body) return { ok: true, value: this.bodyFinding(lr, event, state) };
      const check = (lr.rule.checks as Record<string, Handler | undefined>)[event.stage] as Handler;
      return { ok: true, value: check.call(lr.rule.checks, event, state) };
    } catch (err) {
      return { ok: false, err };
    }
  }

  /** A dry-run check not waited for: its outcome goes to `hooks.late` when it comes. */
  private detach(outcome$: Observable<RuleOutcome>, event: SessionEvent): void {
    this.late++;
    let done = false;
    const settle = () => {
      if (done) return;
      done = true;
      this.late--;
      if (this.late === 0 && this.endHooksDue) this.runEndHooks();
    };
    outcome$.subscribe({ next: (o) => this.hooks.late?.(o, event), complete: settle, error: settle });
  }

  /**
   * A refused event is told to every rule of its stage (Rule.refused): what a rule spent on it
   * (a rate-limit token) is given back. The common path (nothing refused) costs nothing.
   */
  private settleRefused(rules: readonly LoadedRule[], event: SessionEvent, v: StageVerdict): StageVerdict {
    if (!v.reply) return v;
    for (const lr of rules) {
      if (!lr.rule.refused) continue;
      try {
        lr.rule.refused(event, this.stateOf(lr, event.session));
      } catch {
        // A rule's bookkeeping never fails the stage.
      }
    }
    return v;
  }

  // ---------------------------------------------------------------- state and end

  private stateOf(lr: LoadedRule, snapshot: SessionSnapshot): unknown {
    if (!lr.rule.session) return undefined;
    if (this.states.has(lr)) return this.states.get(lr);
    const s = lr.rule.session(snapshot);
    // After the end (a late dry-run check still running) a state is handed out but not kept.
    if (!this.ended) this.states.set(lr, s);
    return s;
  }

  /** The session ended: pending waits dropped now; end hooks once no dry-run check still runs. */
  private end(): void {
    if (this.ended) return;
    this.ended = true;
    this.last = null;
    this.reading?.chunks.complete();
    this.reading = null;
    this.pending.unsubscribe();
    this.endHooksDue = true;
    if (this.late === 0) this.runEndHooks();
  }

  private runEndHooks(): void {
    this.endHooksDue = false;
    const snapshot = this.snapshot;
    for (const [lr, state] of this.states) {
      try {
        if (snapshot) lr.rule.end?.(state, snapshot);
      } catch {
        // Bookkeeping never fails anything.
      }
    }
    this.states.clear();
  }

  // ---------------------------------------------------------------- body

  body(chunks: readonly Buffer[], last: boolean, snapshot?: () => SessionSnapshot): void | Promise<void> {
    if (this.ended || this.plan.readers.length === 0) return;
    const r = (this.reading ??= this.read(snapshot?.() ?? this.snapshot));
    const bytes = r.unstuff ? r.unstuff(chunks) : chunks;
    for (const c of bytes) {
      if (c.length === 0) continue;
      for (const [lr, n] of r.lag) r.lag.set(lr, n + c.length);
      r.chunks.next(c);
    }
    if (last) {
      r.chunks.complete();
      this.reading = null;
    }
    if (Math.max(...r.lag.values()) <= this.maxLag) return;
    return new Promise<void>((resolve) => r.waiters.push(resolve));
  }

  /** A new message: each reader begins it, then consumes the chunks one after the other (concatMap). */
  private read(snapshot: SessionSnapshot | null): Reading {
    const r: Reading = { chunks: new Subject<Buffer>(), unstuff: this.hooks.unstuff?.() ?? null, lag: new Map(), done: new Map(), waiters: [] };
    // A reader its data_end will not ask (out of scope, or bypassable in an allowlisted session or
    // transaction) is not fed: no scanner connection, no lag for a finding nobody reads. Nothing
    // the client says during the data changes either.
    const probe: EventOf<'data_end'> | null = snapshot ? { stage: 'data_end', session: snapshot, size: 0 } : null;
    for (const lr of this.plan.readers) {
      if (probe && ((probe.session.acceptedBy && lr.rule.bypassable) || !inScope(lr.scope, probe))) continue;
      const reader = lr.rule.body as NonNullable<Rule['body']>;
      const done = new AsyncSubject<void>();
      r.done.set(lr, done);
      if (reader.begin && snapshot) {
        try {
          reader.begin(snapshot, this.stateOf(lr, snapshot));
        } catch (err) {
          // A reader that cannot begin reads nothing (and holds nothing back): its error is its finding at data_end.
          done.error(err);
          continue;
        }
      }
      r.lag.set(lr, 0);
      const caughtUp = () => {
        if (r.waiters.length && Math.max(...r.lag.values()) <= this.maxLag) for (const w of r.waiters.splice(0)) w();
      };
      // Each message's readers are the session's pending work until they finish (a long session
      // of many messages keeps none of the earlier ones).
      const sub = r.chunks
        .pipe(
          concatMap((c) =>
            defer(() => {
              const work = reader.chunk(c, snapshot ? this.stateOf(lr, snapshot) : undefined);
              return work instanceof Promise || isObservable(work) ? from(work).pipe(defaultIfEmpty(undefined)) : of(undefined);
            }).pipe(
              take(1),
              tap(() => {
                r.lag.set(lr, (r.lag.get(lr) ?? 0) - c.length);
                caughtUp();
              }),
            ),
          ),
        )
        .subscribe({
          complete: () => done.complete(),
          error: (err: unknown) => {
            // A failed reader holds nothing back: its error is its finding at data_end.
            r.lag.set(lr, 0);
            caughtUp();
            done.error(err);
          },
        });
      if (!sub.closed) {
        this.pending.add(sub);
        sub.add(() => this.pending.remove(sub));
      }
    }
    this.body$ = r.done;
    return r;
  }

  /** The readers of the current (or last) message: each one's end of reading. */
  private body$: Map<LoadedRule, AsyncSubject<void>> | null = null;

  /** data_end of a body rule: once its reader has consumed every chunk, its `end` finding. */
  private bodyFinding(lr: LoadedRule, event: EventOf<'data_end'>, state: unknown): Observable<Finding> {
    const done = this.body$?.get(lr);
    const reader = lr.rule.body as NonNullable<Rule['body']>;
    const end = () => {
      const f = reader.end(event, state);
      return isObservable(f) ? f : f instanceof Promise ? from(f) : of(f);
    };
    if (!done) return defer(end);
    return done.pipe(defaultIfEmpty(undefined), take(1), mergeMap(end));
  }
}

/** `f` applied to a value at once, or to an Observable's value. */
function mapped<T, R>(x: T | Observable<T>, f: (t: T) => R): R | Observable<R> {
  return isObservable(x) ? x.pipe(map(f)) : f(x as T);
}

function asObservable<T>(x: T | Observable<T>): Observable<T> {
  return isObservable(x) ? x : of(x);
}

/**
 * One event through a rule set, outside any session (tests, `explain`): the verdict, or a
 * Promise of it. The rules' state for the event lives and ends with the call.
 */
export function evaluate(rules: readonly LoadedRule[], event: SessionEvent, hooks: PipelineHooks = {}): StageVerdict | Promise<StageVerdict> {
  const events$ = new Subject<SessionEvent>();
  const s = openPipeline(rules, hooks).attach(events$, new AbortController().signal);
  const v = s.verdict(event);
  if (!(v instanceof Promise)) {
    events$.complete();
    return v;
  }
  return v.finally(() => events$.complete());
}
