/**
 * verdict.ts — from findings to what the session does.
 *
 * Each rule's Finding goes through its rule file's `action`:
 *   enforce   reject → 5xx, tempfail → 4xx, accept → allowlist, tag → header
 *   tempfail  like enforce, but a reject becomes the matching 4xx (measure before enforcing)
 *   tag       a reject or tempfail only adds an X-Doorman-Tag header
 *   dry-run   nothing happens; the log and doorman_rule_evaluations_total{outcome="dry_run"} show
 *             what would have happened
 *
 * Precedence within a stage (documented in docs/rules.md):
 *   1. refusals from rules that are not bypassable (relay, access deny) — 5xx before 4xx;
 *   2. an `accept` (allowlist) — it cancels refusals of bypassable rules;
 *   3. refusals from bypassable rules — 5xx before 4xx;
 *   4. tags; 5. pass.
 * Ties go to the rule loaded first (rule files in name order).
 */
import type { AuthResult } from '../protocol/auth-results.js';
import { reply, type Reply, describeReply } from '../protocol/reply.js';
import type { Stage } from './events.js';
import type { Finding, ReplySpec } from './rule.js';

export type Action = 'enforce' | 'dry-run' | 'tempfail' | 'tag';
export type OnError = 'pass' | 'tempfail';
export type Effect = 'none' | 'reject' | 'tempfail' | 'accept' | 'tag';

export interface RuleOutcome {
  readonly rule: string;
  readonly stage: Stage;
  /** What the rule found, or why it found nothing. */
  readonly finding: Finding['kind'] | 'error' | 'timeout';
  readonly reason?: string;
  readonly action: Action;
  /** What it did to the session. */
  readonly effect: Effect;
  /** In dry-run: what it would have done. */
  readonly wouldBe?: Effect;
  readonly reply?: Reply;
  readonly bypassable: boolean;
  readonly ms: number;
  /** What the rule authenticated (Finding.results), whatever its action. */
  readonly results?: readonly AuthResult[];
}

export interface StageVerdict {
  /** The reply that refuses the command, or null to go on. */
  readonly reply: Reply | null;
  /** The rule whose refusal is sent. */
  readonly decidedBy: string | null;
  /** The rule that allowlisted, if any. */
  readonly acceptedBy: string | null;
  /** Header values to add to the message (X-Doorman-Tag). */
  readonly tags: readonly string[];
  /**
   * Authentication results of the stage's rules that answered in time (every action, dry-run
   * included; a dry-run rule that answers later brings its own in its RuleOutcome to `hooks.late`),
   * in rule order: for the Authentication-Results header.
   */
  readonly results: readonly AuthResult[];
  readonly outcomes: readonly RuleOutcome[];
}

export const EMPTY_VERDICT: StageVerdict = Object.freeze({ reply: null, decidedBy: null, acceptedBy: null, tags: [], results: [], outcomes: [] });

/** The reply a refusal gets when the rule suggests none. Text never names the mechanism. */
export function defaultReply(stage: Stage, kind: 'reject' | 'tempfail'): ReplySpec {
  const what: Record<Stage, string> = {
    connect: 'Access denied',
    helo: 'Helo command rejected: Access denied',
    auth: 'Access denied',
    mail: 'Sender address rejected: Access denied',
    rcpt: 'Recipient address rejected: Access denied',
    data_headers: 'Message rejected: Access denied',
    data_end: 'Message rejected: Access denied',
    quit: '',
    etrn: 'Etrn command rejected: Access denied',
  };
  if (kind === 'reject') return { code: stage === 'connect' ? 554 : 550, enhanced: '5.7.1', text: what[stage] };
  if (stage === 'connect') return { code: 421, enhanced: '4.7.0', text: 'Service temporarily unavailable, try again later' };
  return { code: stage.startsWith('data') ? 451 : 450, enhanced: '4.7.1', text: `${what[stage].replace('Access denied', 'Try again later')}` };
}

/** Turns a 5xx spec into its 4xx counterpart (action `tempfail`). */
export function softened(spec: ReplySpec, stage: Stage): ReplySpec {
  if (spec.code < 500) return spec;
  const code = stage === 'connect' ? 421 : stage.startsWith('data') ? 451 : 450;
  return { code, enhanced: `4${spec.enhanced.slice(1)}`, text: spec.text };
}

export function toReply(spec: ReplySpec, stage: Stage): Reply {
  // At connect, RFC 5321 §3.1 has 554 instead of the greeting; a temporary refusal must close
  // the connection, which only 421 does (§3.8). The enhanced code and text are the rule's.
  const code = stage === 'connect' ? (spec.code < 500 ? 421 : 554) : spec.code;
  return reply(code, spec.enhanced, spec.text);
}

/** Maps one rule's finding through its action. */
export function applyAction(
  finding: Finding,
  action: Action,
  stage: Stage,
  override: ReplySpec | undefined,
): { effect: Effect; wouldBe?: Effect; reply?: Reply } {
  if (finding.kind === 'pass') return { effect: 'none' };
  if (finding.kind === 'accept') return action === 'dry-run' ? { effect: 'none', wouldBe: 'accept' } : { effect: 'accept' };
  if (finding.kind === 'tag') return action === 'dry-run' ? { effect: 'none', wouldBe: 'tag' } : { effect: 'tag' };
  let kind: 'reject' | 'tempfail' = finding.kind;
  let spec = override ?? finding.reply ?? defaultReply(stage, kind);
  if (kind === 'reject' && spec.code < 500) kind = 'tempfail';
  if (action === 'tempfail' && kind === 'reject') {
    kind = 'tempfail';
    spec = softened(spec, stage);
  }
  if (kind === 'tempfail' && spec.code >= 500) spec = softened(spec, stage);
  const r = toReply(spec, stage);
  if (action === 'dry-run') return { effect: 'none', wouldBe: kind, reply: r };
  if (action === 'tag') return { effect: 'tag', wouldBe: kind, reply: r };
  return { effect: kind, reply: r };
}

/** Combines a stage's outcomes (in rule order) by the precedence above. */
export function combine(outcomes: readonly RuleOutcome[], alreadyAccepted: string | null): StageVerdict {
  const accept = outcomes.find((o) => o.effect === 'accept');
  const acceptedBy = alreadyAccepted ?? accept?.rule ?? null;
  const refusals = outcomes.filter((o) => (o.effect === 'reject' || o.effect === 'tempfail') && o.reply);
  const pick = (list: readonly RuleOutcome[]) => list.find((o) => o.effect === 'reject') ?? list.find((o) => o.effect === 'tempfail');
  const hard = pick(refusals.filter((o) => !o.bypassable));
  const soft = acceptedBy ? undefined : pick(refusals.filter((o) => o.bypassable));
  const decided = hard ?? soft;
  const tags = outcomes.filter((o) => o.effect === 'tag').map((o) => `${o.rule}; ${o.reason ?? o.finding}`);
  const results = outcomes.flatMap((o) => o.results ?? []);
  return { reply: decided?.reply ?? null, decidedBy: decided?.rule ?? null, acceptedBy: accept?.rule ?? null, tags, results, outcomes };
}

/** One rule outcome as a session log line shows it (every front's). */
export function ruleLogEntry(o: RuleOutcome): object {
  return {
    rule: o.rule,
    stage: o.stage,
    finding: o.finding,
    action: o.action,
    effect: o.effect,
    ...(o.wouldBe ? { would: o.wouldBe } : {}),
    ...(o.reason ? { reason: o.reason } : {}),
    ...(o.reply ? { reply: describeReply(o.reply) } : {}),
  };
}
