/**
 * outcome.ts — one rule's answer turned into its RuleOutcome, counted.
 *
 * `ruleOutcome(lr, stage, call, started, hooks)` takes what a rule's check answered (a value, a
 * Promise, an Observable, or a throw) and gives its outcome: at once (no operator) for a value or
 * a throw; else an Observable with the rule's deadline (`timeout`, a RuleTimeoutError), where an
 * error, a rejection or a timeout becomes the rule's `onError` outcome (`errorOutcome`: pass, or
 * 451/421 4.3.0 for `tempfail`) and an empty answer is a pass. A finding goes through the rule's
 * action (verdict.ts `applyAction`). Each outcome is counted (`record`: doorman_rule_evaluations_total,
 * doorman_rule_duration_seconds; errors in doorman_rule_errors_total and `hooks.onRuleError`).
 *
 * What to ask and when (stages, tiers, dry-run, state) is run.ts; how outcomes combine is verdict.ts.
 */
import { from, isObservable, Observable, of } from 'rxjs';
import { catchError, defaultIfEmpty, map, take, timeout } from 'rxjs/operators';
import { reply } from '../protocol/reply.js';
import type { Stage } from './events.js';
import type { Finding, FindingResult } from './rule.js';
import type { LoadedRule, PipelineHooks } from './loaded.js';
import { applyAction, type RuleOutcome } from './verdict.js';

/** A rule slower than its deadline. */
export class RuleTimeoutError extends Error {}

/** What a rule's check answered, or what it threw. */
export type CheckCall = { ok: true; value: FindingResult } | { ok: false; err: unknown };

/**
 * One rule's outcome: at once (no operator) for a value or a throw; else an
 * Observable with the rule's deadline, its errors turned into its `onError` outcome.
 */
export function ruleOutcome(lr: LoadedRule, stage: Stage, c: CheckCall, started: number, hooks: PipelineHooks): RuleOutcome | Observable<RuleOutcome> {
  if (!c.ok) return errorOutcome(lr, stage, c.err, performance.now() - started, hooks);
  const v = c.value;
  if (!(v instanceof Promise) && !isObservable(v)) {
    try {
      return record(findingOutcome(lr, stage, v, performance.now() - started), hooks);
    } catch (err) {
      // A malformed finding (a rule bug) is the rule's error.
      return errorOutcome(lr, stage, err, performance.now() - started, hooks);
    }
  }
  const name = lr.rule.name;
  return (isObservable(v) ? v : from(v)).pipe(
    take(1),
    defaultIfEmpty<Finding, Finding>({ kind: 'pass' }),
    timeout({ first: lr.timeout, with: () => { throw new RuleTimeoutError(`rule ${name} timed out after ${lr.timeout} ms`); } }),
    map((finding) => record(findingOutcome(lr, stage, finding, performance.now() - started), hooks)),
    catchError((err: unknown) => of(errorOutcome(lr, stage, err, performance.now() - started, hooks))),
  );
}

/** A rule that threw or timed out: its `onError` decides (pass, or 451/421 4.3.0). */
export function errorOutcome(lr: LoadedRule, stage: Stage, err: unknown, ms: number, hooks: PipelineHooks): RuleOutcome {
  const name = lr.rule.name;
  const kind = err instanceof RuleTimeoutError ? 'timeout' : 'error';
  hooks.metrics?.ruleErrors.inc({ rule: name, kind });
  hooks.onRuleError?.(name, kind, err);
  const tempfail = lr.onError === 'tempfail';
  // 421 at connect (RFC 5321 §3.8), 454 at AUTH (RFC 4954 §6 has no 451), 451 elsewhere.
  const code = stage === 'connect' ? 421 : stage === 'auth' ? 454 : 451;
  const r = tempfail ? reply(code, '4.3.0', 'Temporary failure, try again later') : undefined;
  return record(
    {
      rule: name,
      stage,
      finding: kind,
      reason: err instanceof Error ? err.message : String(err),
      action: lr.action,
      effect: tempfail && lr.action !== 'dry-run' ? 'tempfail' : 'none',
      ...(r ? { reply: r } : {}),
      bypassable: lr.rule.bypassable,
      ms,
    },
    hooks,
  );
}

function record(o: RuleOutcome, hooks: PipelineHooks): RuleOutcome {
  const m = hooks.metrics;
  if (m) {
    const outcome = o.finding === 'error' || o.finding === 'timeout' ? 'error' : o.wouldBe && o.effect === 'none' ? 'dry_run' : o.effect === 'none' ? 'pass' : o.effect;
    m.ruleEvaluations.inc({ rule: o.rule, stage: o.stage, outcome });
    m.ruleDuration.observe({ rule: o.rule }, o.ms / 1000);
  }
  return o;
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
    ...(finding.results?.length ? { results: finding.results } : {}),
  };
}
