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
 *   scope:    where the rule applies: listeners, clients, authenticated, recipientDomains
 *             (config/scope.ts; absent: everywhere)
 *   settings: the rule type's own keys (validated by its schema)
 * `site.yaml` in the folder is not a rule: the site policy every rule gets as RuleDeps.site
 * (config/site.ts). Old keys keep working with a warning naming file:line and what to write
 * instead: a rule's own copy of a site list (localDomains, relayNetworks), `settings.failMode`
 * (now the file's `onError`: open → pass, closed → tempfail), the rule type's deprecated keys.
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
import type { LoadedRule } from '../pipeline/loaded.js';
import { parseReplySpec, replyTemplate, stagesOf, type RuleDeps, type RuleType } from '../pipeline/rule.js';
import type { SitePolicy } from '../pipeline/site.js';
import { RULE_DEFAULTS, SITE_FILE } from './defaults.js';
import { buildScope, scopeSchema, type ListenerRef } from './scope.js';
import { loadSite, notCovered, SITE_KEYS } from './site.js';
import { lineOf, validateYaml } from './yaml.js';

export interface RuleSet {
  readonly rules: readonly LoadedRule[];
  /** Short hash of the files' contents: doorman_rules_loaded_info{version}. */
  readonly version: string;
  readonly files: readonly string[];
  /** Stages at least one rule acts on (the session skips work for the others). */
  readonly stages: ReadonlySet<Stage>;
  /** rules/site.yaml as loaded (the defaults without the file). */
  readonly site: SitePolicy;
  /** What still works but should change (old keys, lists that contradict site.yaml), file:line. */
  readonly warnings: readonly Problem[];
}

export interface RuleSetOptions {
  /** The configured listeners, so that a scope naming another one is an error. Absent: roles only are known. */
  readonly listeners?: readonly ListenerRef[];
}

const baseSchema = z.strictObject({
  rule: z.string().min(1),
  name: z.string().regex(/^[a-z0-9][a-z0-9_.-]*$/i, 'letters, digits, ".", "_" and "-"').optional(),
  enabled: z.boolean().default(true),
  action: z.enum(['enforce', 'dry-run', 'tempfail', 'tag']).default(RULE_DEFAULTS.action),
  onError: z.enum(['pass', 'tempfail']).default(RULE_DEFAULTS.onError),
  timeout: z.number().int().positive().max(600_000).default(RULE_DEFAULTS.timeout),
  reply: replyTemplate.optional(),
  scope: scopeSchema.optional(),
  settings: z.unknown().optional(),
});

/** Stages at which a recipient domain is known (a recipientDomains scope can apply). */
const RECIPIENT_STAGES: readonly Stage[] = ['rcpt', 'data_headers', 'data_end'];

export function listRuleFiles(dir: string): string[] {
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch (e) {
    throw new DoormanError('DMN_ERR_RULES_READ', `${dir}: ${(e as Error).message}`);
  }
  const site = new Set([SITE_FILE, SITE_FILE.replace(/\.yaml$/, '.yml')]);
  return names.filter((n) => /\.ya?ml$/.test(n) && !n.startsWith('.') && !site.has(n)).sort().map((n) => path.join(dir, n));
}

/** The rule types a loader knows, by the name rule files use in `rule:` (src/rules/index.ts). */
export type RuleTypes = ReadonlyMap<string, RuleType>;

/** Loads and builds every rule in `dir` with the rule types `types`. Throws DoormanError listing every problem. */
export function loadRuleSet(dir: string, deps: RuleDeps, types: RuleTypes, opts: RuleSetOptions = {}): RuleSet {
  const files = listRuleFiles(dir);
  const problems: Problem[] = [];
  const warnings: Problem[] = [];
  const rules: LoadedRule[] = [];
  const hash = crypto.createHash('sha256');
  const seen = new Map<string, string>();
  const site = loadSite(dir, problems);
  if (site.file) hash.update(path.basename(site.file)).update('\0').update(site.text).update('\0');
  const ctx: FileContext = { deps: { ...deps, site: site.policy }, types, site: site.policy, siteFile: site.file, listeners: opts.listeners, problems, warnings };
  for (const file of files) {
    const text = fs.readFileSync(file, 'utf8');
    hash.update(path.basename(file)).update('\0').update(text).update('\0');
    const loaded = loadRuleFile(file, text, ctx);
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
  return {
    rules,
    version: hash.digest('hex').slice(0, 12),
    files,
    stages: new Set(rules.flatMap((r) => stagesOf(r.rule))),
    site: site.policy,
    warnings,
  };
}

interface FileContext {
  readonly deps: RuleDeps;
  readonly types: RuleTypes;
  readonly site: SitePolicy;
  readonly siteFile: string | null;
  readonly listeners: readonly ListenerRef[] | undefined;
  readonly problems: Problem[];
  readonly warnings: Problem[];
}

type Raw = Record<string, unknown>;
const isRaw = (v: unknown): v is Raw => typeof v === 'object' && v !== null && !Array.isArray(v);

function loadRuleFile(file: string, text: string, ctx: FileContext): LoadedRule | null {
  const { types, problems, warnings } = ctx;
  let peek: unknown;
  try {
    peek = parseYaml(text);
  } catch {
    peek = null; // validateYaml reports the syntax error with its line
  }
  const top: Raw = isRaw(peek) ? peek : {};
  const rawSettings: Raw = isRaw(top.settings) ? top.settings : {};
  const typeName = 'rule' in top ? String(top.rule) : null;
  const type = typeName ? types.get(typeName) : undefined;
  if (typeName && !type) {
    const v = validateYaml(text, file, baseSchema.extend({ rule: z.enum([...types.keys()] as [string, ...string[]]) }));
    problems.push(...(v.ok ? [] : v.problems));
    return null;
  }
  const at = (p: (string | number)[], key = false) => lineOf(text, p, key);
  // An empty `settings:` (all keys commented out) means the defaults; `failMode` is read here
  // (the old name of onError), not by the rule type.
  const settings = type
    ? z.preprocess((v) => {
        if (!isRaw(v)) return v ?? {};
        const { failMode: _old, ...rest } = v;
        return rest;
      }, type.settings)
    : z.unknown();
  const v = validateYaml(text, file, baseSchema.extend({ settings }));
  if (!v.ok) {
    problems.push(...v.problems);
    return null;
  }
  if (!type) return null;
  const f = v.value;
  const onError = failModeToOnError(file, top, rawSettings, f.onError, at, problems, warnings);
  if (!onError) return null;
  if (!f.enabled) return null;
  siteKeyWarnings(file, type, rawSettings, ctx, at);
  for (const [key, instead] of Object.entries(type.deprecated ?? {})) {
    if (key in rawSettings) warnings.push({ file, line: at(['settings', key], true), key: `settings.${key}`, message: `deprecated (still used): ${instead}` });
  }
  const name = f.name ?? path.basename(file).replace(/\.ya?ml$/, '');
  let rule;
  try {
    rule = type.create(name, f.settings, { ...ctx.deps, onError, timeout: f.timeout });
  } catch (e) {
    problems.push({ file, line: null, key: 'settings', message: (e as Error).message });
    return null;
  }
  let scope;
  if (f.scope) {
    const built = buildScope(f.scope, ctx.site, ctx.listeners);
    for (const p of built.problems) problems.push({ file, line: at(['scope', ...p.path]), key: ['scope', ...p.path].join('.'), message: p.message });
    if (built.problems.length) {
      rule.close?.();
      return null;
    }
    scope = built.scope;
    if (f.scope.recipientDomains && !stagesOf(rule).some((s) => RECIPIENT_STAGES.includes(s))) {
      warnings.push({
        file,
        line: at(['scope', 'recipientDomains'], true),
        key: 'scope.recipientDomains',
        message: `this ${type.type} rule acts at ${stagesOf(rule).filter((s) => s !== 'quit').join(', ') || 'no stage'}, before any recipient is known: a recipientDomains scope means it never applies`,
      });
    }
  }
  const reply = f.reply ? parseReplySpec(f.reply) : null;
  return { rule, action: f.action, onError, timeout: f.timeout, file, ...(reply ? { reply } : {}), ...(scope ? { scope } : {}) };
}

/**
 * The file's onError, from `settings.failMode` when only that is set (open → pass, closed →
 * tempfail, with a warning); null (and a problem) when both are set and disagree.
 */
function failModeToOnError(
  file: string,
  top: Raw,
  settings: Raw,
  onError: 'pass' | 'tempfail',
  at: (p: (string | number)[], key?: boolean) => number | null,
  problems: Problem[],
  warnings: Problem[],
): 'pass' | 'tempfail' | null {
  if (!('failMode' in settings)) return onError;
  const line = at(['settings', 'failMode'], true);
  const mode = settings.failMode;
  if (mode !== 'open' && mode !== 'closed') {
    problems.push({ file, line, key: 'settings.failMode', message: 'expected open or closed (better: remove it and set onError: pass | tempfail)' });
    return null;
  }
  const mapped = mode === 'open' ? 'pass' : 'tempfail';
  if ('onError' in top && top.onError !== mapped) {
    problems.push({ file, line, key: 'settings.failMode', message: `failMode: ${mode} means onError: ${mapped}, but the file says onError: ${String(top.onError)}: keep only onError` });
    return null;
  }
  warnings.push({ file, line, key: 'settings.failMode', message: `failMode is replaced by the rule file's onError: remove it and write onError: ${mapped} (top level)` });
  return mapped;
}

/** A rule file's own copy of a site list: to move (no site.yaml), or widening site.yaml's. */
function siteKeyWarnings(file: string, type: RuleType, settings: Raw, ctx: FileContext, at: (p: (string | number)[], key?: boolean) => number | null): void {
  const siteName = ctx.siteFile ? path.basename(ctx.siteFile) : SITE_FILE;
  for (const key of SITE_KEYS) {
    if (!type.siteKeys?.includes(key) || !Array.isArray(settings[key])) continue;
    const own = (settings[key] as unknown[]).map(String);
    const line = at(['settings', key], true);
    const where = { file, line, key: `settings.${key}` };
    if (!ctx.siteFile) {
      ctx.warnings.push({ ...where, message: `move this list to rules/${siteName} (${key}: one list for every rule); until then this file's list is used for this rule` });
      continue;
    }
    const extra = notCovered(key, own, ctx.site);
    if (own.length === 0 && ctx.site.lists[key].length) {
      ctx.warnings.push({ ...where, message: `empty, so this rule has no ${key} while ${ctx.siteFile} lists ${ctx.site.lists[key].join(', ')}: remove the key here to use the site's` });
    } else if (extra.length) {
      ctx.warnings.push({
        ...where,
        message: `${extra.join(', ')} not in ${key} of ${ctx.siteFile}: add ${extra.length > 1 ? 'them' : 'it'} there (then remove this copy), or remove ${extra.length > 1 ? 'them' : 'it'} here; this rule uses only this file's list`,
      });
    } else if (sameList(own, ctx.site.lists[key])) {
      ctx.warnings.push({ ...where, message: `same as ${key} of ${ctx.siteFile}: remove this copy (a change there would not reach this rule)` });
    }
  }
}

function sameList(a: readonly string[], b: readonly string[]): boolean {
  const norm = (l: readonly string[]) => [...new Set(l.map((x) => x.trim().toLowerCase().replace(/\.$/, '')))].sort().join('\n');
  return norm(a) === norm(b);
}

export function closeRuleSet(set: RuleSet): void {
  for (const r of set.rules) r.rule.close?.();
}
