/**
 * rules.ts — load the rule files (`rules/*.yaml`), validate them, build the rules.
 *
 * Rule file schema (docs/rules.md):
 *   rule:     the rule type (src/rules/<type>.ts), required
 *   name:     instance name for logs and metrics (default: the file name without extension)
 *   enabled:  false skips the file (default true)
 *   action:   enforce | dry-run | tempfail | tag (default enforce)
 *   onError:  pass | tempfail — when the rule throws or times out (default pass)
 *   timeout:  evaluation deadline in ms (default 5000)
 *   reply:    "<code> <x.y.z> text" replacing the rule's own reply for refusals (optional)
 *   settings: the rule type's own keys (validated by its schema)
 * The rule types come from the caller (src/rules/index.ts's RULE_TYPES, handed in by main.ts and
 * cli.ts): config/ never imports rules/.
 * Files load in name order; that order breaks ties between refusals of one stage.
 * Every problem names the file, line and key; one bad file fails the whole load, so a reload
 * with an invalid file keeps the last good rule set.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { parse as parseYaml } from 'yaml';
import { z } from 'zod';
import { DoormanError, type Problem } from '../errors.js';
import type { Stage } from '../pipeline/events.js';
import type { LoadedRule } from '../pipeline/run.js';
import { parseReplySpec, replyTemplate, stagesOf, type RuleDeps, type RuleType } from '../pipeline/rule.js';
import { RULE_DEFAULTS } from './defaults.js';
import { validateYaml } from './yaml.js';

export interface RuleSet {
  readonly rules: readonly LoadedRule[];
  /** Short hash of the files' contents: doorman_rules_loaded_info{version}. */
  readonly version: string;
  readonly files: readonly string[];
  /** Stages at least one rule acts on (the session skips work for the others). */
  readonly stages: ReadonlySet<Stage>;
}

const baseSchema = z.strictObject({
  rule: z.string().min(1),
  name: z.string().regex(/^[a-z0-9][a-z0-9_.-]*$/i, 'letters, digits, ".", "_" and "-"').optional(),
  enabled: z.boolean().default(true),
  action: z.enum(['enforce', 'dry-run', 'tempfail', 'tag']).default(RULE_DEFAULTS.action),
  onError: z.enum(['pass', 'tempfail']).default(RULE_DEFAULTS.onError),
  timeout: z.number().int().positive().max(600_000).default(RULE_DEFAULTS.timeout),
  reply: replyTemplate.optional(),
  settings: z.unknown().optional(),
});

export function listRuleFiles(dir: string): string[] {
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch (e) {
    throw new DoormanError('DMN_ERR_RULES_READ', `${dir}: ${(e as Error).message}`);
  }
  return names.filter((n) => /\.ya?ml$/.test(n) && !n.startsWith('.')).sort().map((n) => path.join(dir, n));
}

/** The rule types a loader knows, by the name rule files use in `rule:` (src/rules/index.ts). */
export type RuleTypes = ReadonlyMap<string, RuleType>;

/** Loads and builds every rule in `dir` with the rule types `types`. Throws DoormanError listing every problem. */
export function loadRuleSet(dir: string, deps: RuleDeps, types: RuleTypes): RuleSet {
  const files = listRuleFiles(dir);
  const problems: Problem[] = [];
  const rules: LoadedRule[] = [];
  const hash = crypto.createHash('sha256');
  const seen = new Map<string, string>();
  for (const file of files) {
    const text = fs.readFileSync(file, 'utf8');
    hash.update(path.basename(file)).update('\0').update(text).update('\0');
    const loaded = loadRuleFile(file, text, deps, types, problems);
    if (!loaded) continue;
    const other = seen.get(loaded.rule.name);
    if (other) {
      problems.push({ file, line: null, key: 'name', message: `rule name "${loaded.rule.name}" is already used by ${other}` });
      continue;
    }
    seen.set(loaded.rule.name, file);
    rules.push(loaded);
  }
  if (problems.length) {
    for (const r of rules) r.rule.close?.();
    throw new DoormanError('DMN_ERR_RULES_INVALID', dir, problems);
  }
  return { rules, version: hash.digest('hex').slice(0, 12), files, stages: new Set(rules.flatMap((r) => stagesOf(r.rule))) };
}

function loadRuleFile(file: string, text: string, deps: RuleDeps, types: RuleTypes, problems: Problem[]): LoadedRule | null {
  let peek: unknown;
  try {
    peek = parseYaml(text);
  } catch {
    peek = null; // validateYaml reports the syntax error with its line
  }
  const typeName = peek && typeof peek === 'object' && 'rule' in peek ? String((peek as { rule: unknown }).rule) : null;
  const type = typeName ? types.get(typeName) : undefined;
  if (typeName && !type) {
    const v = validateYaml(text, file, baseSchema.extend({ rule: z.enum([...types.keys()] as [string, ...string[]]) }));
    problems.push(...(v.ok ? [] : v.problems));
    return null;
  }
  // An empty `settings:` (all keys commented out) means the defaults.
  const schema = type ? baseSchema.extend({ settings: z.preprocess((v) => v ?? {}, type.settings) }) : baseSchema;
  const v = validateYaml(text, file, schema);
  if (!v.ok) {
    problems.push(...v.problems);
    return null;
  }
  if (!type) return null;
  const f = v.value;
  if (!f.enabled) return null;
  const name = f.name ?? path.basename(file).replace(/\.ya?ml$/, '');
  let rule;
  try {
    rule = type.create(name, f.settings, deps);
  } catch (e) {
    problems.push({ file, line: null, key: 'settings', message: (e as Error).message });
    return null;
  }
  const reply = f.reply ? parseReplySpec(f.reply) : null;
  return { rule, action: f.action, onError: f.onError, timeout: f.timeout, file, ...(reply ? { reply } : {}) };
}

export function closeRuleSet(set: RuleSet): void {
  for (const r of set.rules) r.rule.close?.();
}
