/**
 * rules.ts — the rule set as the policy front runs it: without the message.
 *
 * A Postfix policy request never carries the message (SMTPD_POLICY_README: attributes only), so
 * what a rule does with the headers (`data_headers`) or the body (a BodyReader: DKIM/DMARC,
 * content scanners) cannot run. `withoutMessage` derives, once per rule set, the rules the policy
 * front hands the pipeline: each rule keeps its other stages (a dmarc rule's MAIL-stage work,
 * say), loses its header check and body reader; a rule left with nothing is dropped. The names of
 * the rules that lost something are returned so the server can warn once per rule set.
 */
import type { RuleSet } from '../../config/rules.js';
import type { LoadedRule } from '../../pipeline/loaded.js';
import { stagesOf, type Rule } from '../../pipeline/rule.js';

/** Stages a policy request never reaches: the message's. */
const MESSAGE_STAGES = new Set<string>(['data_headers']);

export interface PolicyRuleSet {
  readonly set: RuleSet;
  /** Rules that read the headers or the body: skipped there (the rest of each still runs). */
  readonly skipped: readonly string[];
}

const derived = new WeakMap<RuleSet, PolicyRuleSet>();

type Fn = (...args: unknown[]) => unknown;

/** Own functions of `obj` but those of the message stages, bound to `obj` (rules call them as methods). */
function stagesWithout(obj: object): Record<string, Fn> {
  const out: Record<string, Fn> = {};
  for (const [k, f] of Object.entries(obj)) if (!MESSAGE_STAGES.has(k) && typeof f === 'function') out[k] = (f as Fn).bind(obj);
  return out;
}

/** The rule without its header check and body reader, or null when nothing else is left. */
function withoutMessageRule(r: Rule): Rule | null {
  const checks = stagesWithout(r.checks);
  const starts = r.starts ? stagesWithout(r.starts) : {};
  if (Object.keys(checks).length === 0 && Object.keys(starts).length === 0) return null;
  const rule: Rule = {
    name: r.name,
    type: r.type,
    checks: checks as Rule['checks'],
    ...(Object.keys(starts).length ? { starts: starts as NonNullable<Rule['starts']> } : {}),
    bypassable: r.bypassable,
    ...(r.session ? { session: r.session.bind(r) } : {}),
    ...(r.end ? { end: r.end.bind(r) } : {}),
    ...(r.refused ? { refused: r.refused.bind(r) } : {}),
  };
  return rule;
}

export function withoutMessage(set: RuleSet): PolicyRuleSet {
  const known = derived.get(set);
  if (known) return known;
  const skipped: string[] = [];
  const rules: LoadedRule[] = [];
  for (const lr of set.rules) {
    const r = lr.rule;
    const reads = r.body !== undefined || 'data_headers' in r.checks || (r.starts !== undefined && 'data_headers' in r.starts);
    if (!reads) {
      rules.push(lr);
      continue;
    }
    skipped.push(r.name);
    const kept = withoutMessageRule(r);
    if (kept) rules.push({ ...lr, rule: kept });
  }
  const out: PolicyRuleSet = skipped.length
    ? { set: { ...set, rules, stages: new Set(rules.flatMap((lr) => stagesOf(lr.rule))) }, skipped }
    : { set, skipped };
  derived.set(set, out);
  return out;
}
