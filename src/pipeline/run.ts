/**
 * run.ts — the pipeline runner: evaluates one stage's rules for one event.
 *
 * The rules of a stage run concurrently (rxjs mergeMap), in two tiers: rules that are not
 * bypassable (pure matching: access, relay, sender) first; the bypassable ones (DNS, Redis) only
 * when the first tier did not refuse. Each is wrapped so that nothing a rule
 * does can harm the session: a synchronous throw, a rejected Promise, an Observable that errors
 * or completes empty, and a rule slower than its `timeout` all become the rule's `onError`
 * outcome (`pass`: fail open, the default; `tempfail`: 451 4.3.0), are counted in
 * doorman_rule_errors_total{rule,kind} and logged with the rule's name. The outcomes are then
 * combined by verdict.ts. A stage with no applicable rule costs nothing (no Promise, no timer), and
 * a tier whose rules all answer synchronously (pure matching, cached lookups) is combined on the
 * spot; Promises are raced against their rule's timeout with one timer each; rules that answer with
 * an Observable go through the RxJS pipeline below.
 *
 * Never waiting for what cannot change the reply: when the caller takes late outcomes
 * (`hooks.deferred`; the session does, up to `limits.maxPendingDryRun` at a time), a rule in
 * `dry-run` whose check did not answer at once is not awaited; its outcome is recorded (metrics,
 * `onRuleError`) when it arrives and is handed to `hooks.deferred`, so a slow DNS lookup of a rule
 * being measured never holds a reply.
 * And a rule can start its work at an earlier stage than the one whose verdict it applies
 * (`Rule.starts` / `start`): the runner calls `start` and goes on.
 */
import { defer, from, isObservable, of, firstValueFrom, type Observable } from 'rxjs';
import { catchError, defaultIfEmpty, map, mergeMap, take, timeout, toArray } from 'rxjs/operators';
import { reply } from '../protocol/reply.js';
import type { Metrics } from '../metrics/registry.js';
import type { SessionEvent, Stage } from './events.js';
import type { Finding, ReplySpec, Rule } from './rule.js';
import { inScope, inSessionScope, type RuleScope } from './scope.js';
import { applyAction, combine, EMPTY_VERDICT, type Action, type OnError, type RuleOutcome, type StageVerdict } from './verdict.js';

/** A rule with the settings of its rule file. */
export interface LoadedRule {
  readonly rule: Rule;
  readonly action: Action;
  readonly onError: OnError;
  /** Evaluation deadline, ms. */
  readonly timeout: number;
  /** Reply that replaces the rule's own for refusals (rule file `reply`). */
  readonly reply?: ReplySpec;
  /** Source file, for logs. */
  readonly file: string;
  /** Where the rule applies (rule file `scope:`); absent: everywhere. */
  readonly scope?: RuleScope;
}

export interface RunnerHooks {
  metrics?: Metrics;
  /** Called for a rule that threw or timed out (the session logs it). */
  onRuleError?: (rule: string, kind: 'error' | 'timeout', err: unknown) => void;
  /**
   * The outcome of a dry-run rule that was not awaited, settled when the rule answers or its
   * timeout passes (never rejects; already counted in metrics). The session logs it. Without this
   * hook, dry-run rules are awaited like the others.
   */
  deferred?: (outcome: Promise<RuleOutcome>) => void;
}

class RuleTimeoutError extends Error {}

/** Evaluates the stage of `event`. Synchronous when no rule applies or every rule answered at once. */
export function evaluate(
  rules: readonly LoadedRule[],
  event: SessionEvent,
  hooks: RunnerHooks = {},
): StageVerdict | Promise<StageVerdict> {
  const accepted = event.session.acceptedBy;
  // An allowlisted session skips bypassable rules — but every rule hears `quit` (bookkeeping).
  // A rule out of scope is not asked (scope.ts); one that only starts work here needs the part
  // of its scope the session already tells.
  const applicable = rules.filter(
    (r) =>
      ((r.rule.stages.includes(event.stage) && inScope(r.scope, event)) || (r.rule.starts?.includes(event.stage) && inSessionScope(r.scope, event))) &&
      !(accepted && r.rule.bypassable && event.stage !== 'quit'),
  );
  if (applicable.length === 0) return EMPTY_VERDICT;
  const v = evaluateRules(applicable, event, hooks);
  return v instanceof Promise ? v.then((x) => settleRefused(applicable, event, x)) : settleRefused(applicable, event, v);
}

/**
 * A refused event is told to every rule of its stage (Rule.refused): what a rule spent on it
 * (a rate-limit token) is given back, so a greylisted recipient costs no rate-limit budget. The
 * common path (nothing refused) costs nothing.
 */
function settleRefused(rules: readonly LoadedRule[], event: SessionEvent, v: StageVerdict): StageVerdict {
  if (!v.reply || event.stage === 'quit') return v;
  for (const lr of rules) {
    try {
      lr.rule.refused?.(event);
    } catch {
      // A rule's bookkeeping never fails the stage.
    }
  }
  return v;
}

function evaluateRules(applicable: readonly LoadedRule[], event: SessionEvent, hooks: RunnerHooks): StageVerdict | Promise<StageVerdict> {
  const hard = applicable.filter((r) => !r.rule.bypassable);
  const soft = applicable.filter((r) => r.rule.bypassable);
  if (hard.length === 0 || soft.length === 0 || event.stage === 'quit') return runTier(applicable, event, hooks);
  // Two tiers: the cheap, final rules first (access, relay, sender); what they refuse costs the
  // bypassable ones (DNS, Redis) nothing — no lookup, no greylist triplet, no rate-limit token.
  const second = (first: StageVerdict): StageVerdict | Promise<StageVerdict> => {
    if (first.reply) return first;
    const both = (v: StageVerdict) => combine([...first.outcomes, ...v.outcomes], event.session.acceptedBy);
    const v = runTier(soft, event, hooks);
    return v instanceof Promise ? v.then(both) : both(v);
  };
  const first = runTier(hard, event, hooks);
  return first instanceof Promise ? first.then(second) : second(first);
}

/** What a rule's check returned, or what it threw. */
type Called = { ok: true; value: Finding | Promise<Finding> | Observable<Finding> } | { ok: false; err: unknown };

/**
 * One tier: the work of rules that start at this stage is started, then every rule's check is
 * called at once; a dry-run rule that did not answer at once is handed to `hooks.deferred`. When
 * each remaining one answered synchronously (matching rules, cache hits) the outcomes are combined
 * on the spot — no scheduler, Promise or timer; when any answered with a Promise or Observable,
 * all go through the RxJS pipeline with its timeouts.
 */
function runTier(tier: readonly LoadedRule[], event: SessionEvent, hooks: RunnerHooks): StageVerdict | Promise<StageVerdict> {
  const started = performance.now();
  const stage = event.stage;
  // Work started here for a later stage's verdict; a throw is the rule's error at this stage.
  const startErrors: RuleOutcome[] = [];
  for (const lr of tier) {
    if (!lr.rule.starts?.includes(stage) || !lr.rule.start) continue;
    try {
      lr.rule.start(event);
    } catch (err) {
      startErrors.push(record(errorOutcome(lr, stage, err, performance.now() - started, hooks), hooks));
    }
  }
  const rules: LoadedRule[] = [];
  const called: Called[] = [];
  for (const lr of tier) {
    if (!lr.rule.stages.includes(stage) || !inScope(lr.scope, event)) continue;
    let c: Called;
    try {
      c = { ok: true, value: lr.rule.check(event) };
    } catch (err) {
      c = { ok: false, err };
    }
    // A dry-run rule cannot change the reply: what it has not answered yet is not waited for.
    if (hooks.deferred && lr.action === 'dry-run' && stage !== 'quit' && c.ok && (c.value instanceof Promise || isObservable(c.value))) {
      const late = isObservable(c.value) ? firstValueFrom(checkOne(lr, event, hooks, c)) : (settle(lr, stage, c, started, hooks) as Promise<RuleOutcome>);
      hooks.deferred?.(late);
      continue;
    }
    rules.push(lr);
    called.push(c);
  }
  const v = settleTier(rules, called, event, hooks, started);
  if (!startErrors.length) return v;
  const all = (x: StageVerdict) => combine([...startErrors, ...x.outcomes], event.session.acceptedBy);
  return v instanceof Promise ? v.then(all) : all(v);
}

/** The outcomes of the checks called, combined: at once when all answered synchronously. */
function settleTier(rules: readonly LoadedRule[], called: readonly Called[], event: SessionEvent, hooks: RunnerHooks, started: number): StageVerdict | Promise<StageVerdict> {
  // Observables go through the RxJS pipeline (first value, complete-empty is a pass). Values and
  // Promises are settled here: values at once, Promises raced against their rule's deadline with
  // one timer each — a tier of values is combined without any Promise.
  if (called.every((c) => !c.ok || !isObservable(c.value))) {
    const outcomes = called.map((c, i) => settle(rules[i]!, event.stage, c, started, hooks));
    if (outcomes.every((o): o is RuleOutcome => !(o instanceof Promise))) return combine(outcomes, event.session.acceptedBy);
    return Promise.all(outcomes).then((list) => combine(list, event.session.acceptedBy));
  }
  return firstValueFrom(runStage(rules, event, hooks, called));
}

/** One rule's outcome from a value or a Promise, with the rule's timeout. */
function settle(lr: LoadedRule, stage: Stage, c: Called, started: number, hooks: RunnerHooks): RuleOutcome | Promise<RuleOutcome> {
  const outcome = (f: unknown): RuleOutcome => {
    try {
      return record(findingOutcome(lr, stage, f as Finding, performance.now() - started), hooks);
    } catch (err) {
      // A malformed finding (a rule bug) is the rule's error, as on the RxJS path.
      return record(errorOutcome(lr, stage, err, performance.now() - started, hooks), hooks);
    }
  };
  const failed = (err: unknown): RuleOutcome => record(errorOutcome(lr, stage, err, performance.now() - started, hooks), hooks);
  if (!c.ok) return failed(c.err);
  const value = c.value;
  if (!(value instanceof Promise)) return outcome(value);
  return new Promise<RuleOutcome>((resolve) => {
    let done = false;
    const timer = setTimeout(() => {
      done = true;
      resolve(failed(new RuleTimeoutError(`rule ${lr.rule.name} timed out after ${lr.timeout} ms`)));
    }, lr.timeout);
    value.then(
      (f) => {
        if (done) return;
        clearTimeout(timer);
        resolve(outcome(f));
      },
      (err: unknown) => {
        if (done) return;
        clearTimeout(timer);
        resolve(failed(err));
      },
    );
  });
}

export function runStage(rules: readonly LoadedRule[], event: SessionEvent, hooks: RunnerHooks, called?: readonly Called[]): Observable<StageVerdict> {
  return from(rules.map((lr, order) => ({ lr, order }))).pipe(
    mergeMap(({ lr, order }) => checkOne(lr, event, hooks, called?.[order]).pipe(map((outcome) => ({ outcome, order })))),
    toArray(),
    map((list) => combine(list.sort((a, b) => a.order - b.order).map((x) => x.outcome), event.session.acceptedBy)),
  );
}

function checkOne(lr: LoadedRule, event: SessionEvent, hooks: RunnerHooks, called?: Called): Observable<RuleOutcome> {
  const started = performance.now();
  const stage = event.stage;
  const name = lr.rule.name;
  return defer(() => {
    if (!called) return toObservable(lr.rule.check(event));
    if (!called.ok) throw called.err;
    return toObservable(called.value);
  }).pipe(
    take(1),
    defaultIfEmpty<Finding, Finding>({ kind: 'pass' }),
    timeout({ first: lr.timeout, with: () => { throw new RuleTimeoutError(`rule ${name} timed out after ${lr.timeout} ms`); } }),
    map((finding): RuleOutcome => findingOutcome(lr, stage, finding, performance.now() - started)),
    catchError((err: unknown) => of(errorOutcome(lr, stage, err, performance.now() - started, hooks))),
    map((o) => record(o, hooks)),
  );
}

function findingOutcome(lr: LoadedRule, stage: Stage, finding: Finding, ms: number): RuleOutcome {
  const applied = applyAction(finding, lr.action, stage, lr.reply);
  return {
    rule: lr.rule.name,
    stage,
    finding: finding.kind,
    ...(finding.kind !== 'pass' ? { reason: finding.reason } : {}),
    action: lr.action,
    ...applied,
    bypassable: lr.rule.bypassable,
    ms,
  };
}

/** A rule that threw or timed out: its `onError` decides (pass, or 451/421 4.3.0). */
function errorOutcome(lr: LoadedRule, stage: Stage, err: unknown, ms: number, hooks: RunnerHooks): RuleOutcome {
  const name = lr.rule.name;
  const kind = err instanceof RuleTimeoutError ? 'timeout' : 'error';
  hooks.metrics?.ruleErrors.inc({ rule: name, kind });
  hooks.onRuleError?.(name, kind, err);
  const tempfail = lr.onError === 'tempfail';
  const r = tempfail ? (stage === 'connect' ? reply(421, '4.3.0', 'Temporary failure, try again later') : reply(451, '4.3.0', 'Temporary failure, try again later')) : undefined;
  return {
    rule: name,
    stage,
    finding: kind,
    reason: err instanceof Error ? err.message : String(err),
    action: lr.action,
    effect: tempfail && lr.action !== 'dry-run' ? 'tempfail' : 'none',
    ...(r ? { reply: r } : {}),
    bypassable: lr.rule.bypassable,
    ms,
  };
}

function record(o: RuleOutcome, hooks: RunnerHooks): RuleOutcome {
  if (hooks.metrics) {
    const outcome = o.finding === 'error' || o.finding === 'timeout' ? 'error' : o.wouldBe && o.effect === 'none' ? 'dry_run' : o.effect === 'none' ? 'pass' : o.effect;
    hooks.metrics.ruleEvaluations.inc({ rule: o.rule, stage: o.stage, outcome });
    hooks.metrics.ruleDuration.observe({ rule: o.rule }, o.ms / 1000);
  }
  return o;
}

function toObservable(r: Finding | Promise<Finding> | Observable<Finding>): Observable<Finding> {
  if (isObservable(r)) return r;
  if (r instanceof Promise) return from(r);
  return of(r);
}
