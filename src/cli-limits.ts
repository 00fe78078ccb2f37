/**
 * cli-limits.ts — `doorman limits show|reset RULE ARGS… [--json]`.
 *
 * The rule (from the configured rule files) names the key and what it holds (`admin`); the state
 * comes from Redis when one is configured, else from the running instance, which keeps the
 * in-memory store (store/admin.ts, asked at `metrics.listen`); `limitView` (store/store.ts) reads
 * it with the store's own arithmetic. This file only prints: human lines, or the view as JSON.
 */
import { loadConfig } from './config/load.js';
import { loadRuleSet } from './config/rules.js';
import { DoormanError } from './errors.js';
import { createStore, metricsAddress, ruleDeps } from './main.js';
import { createMetrics } from './metrics/registry.js';
import { RULE_TYPES } from './rules/index.js';
import { askInstanceReset, askInstanceState, instanceAddress, NoInstanceError } from './store/admin.js';
import { limitView, type LimitView, type RawState } from './store/store.js';
import { VERSION } from './version.js';

/** A duration for people, rounded up to the second: "45 s", "3 min 20 s", "5 h", "35 days". */
export function duration(ms: number): string {
  const s = Math.ceil(ms / 1000);
  if (s < 120) return `${s} s`;
  if (s < 3600) return s % 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s / 60} min`;
  if (s < 172_800) return `${Math.ceil(s / 3600)} h`;
  return `${Math.ceil(s / 86_400)} days`;
}

/** A point in time, UTC to the second. */
export function instant(ms: number): string {
  return new Date(ms).toISOString().replace(/\.\d{3}Z$/, 'Z');
}

const when = (at: number, now: number) => `in ${duration(at - now)}, at ${instant(at)}`;

/** The human lines for one view (after the heading). */
export function describeView(v: LimitView): string[] {
  const row = (label: string, text: string) => `  ${`${label}:`.padEnd(14)}${text}`;
  const expires = v.expiresAt === null ? 'no key stored' : when(v.expiresAt, v.now);
  switch (v.kind) {
    case 'rate':
      return [
        row('limit', `${v.limit} per ${duration(v.windowMs)}`),
        row('used', String(v.used)),
        row('remaining', String(v.remaining)),
        row('next allowed', v.nextAllowedInMs === 0 ? 'now' : when(v.nextAllowedAt, v.now)),
        row('key expires', v.expiresAt === null ? 'no key stored (nothing counted)' : `${expires} (the bucket is full again then)`),
      ];
    case 'concurrency':
      return [row('limit', `${v.limit} at once`), row('in use', `${v.inUse} of ${v.limit}`), row('key expires', expires)];
    case 'greylist':
      if (v.state === 'unknown') return [row('delay', duration(v.delayMs)), row('state', `unknown: a first attempt is greylisted for ${duration(v.delayMs)}`)];
      if (v.state === 'passed') return [row('delay', duration(v.delayMs)), row('state', 'passed: let through'), row('known until', `${expires} (refreshed by each use)`)];
      return [
        row('delay', duration(v.delayMs)),
        row('state', `waiting: first seen ${instant(v.firstSeenAt ?? v.now)}; a retry passes ${(v.passesAt ?? 0) <= v.now ? 'now' : `from ${instant(v.passesAt ?? 0)} (in ${duration((v.passesAt ?? 0) - v.now)})`}`),
        row('forgotten', `${expires} unless retried`),
      ];
  }
}

/** `doorman limits show|reset RULE ARGS… [--json]` against the configured store. */
export async function limits(argv: readonly string[], file: string | undefined, rulesDir: string | undefined): Promise<number> {
  const args = argv.filter((a) => a !== '--json');
  const json = args.length !== argv.length;
  const [sub, ruleName, ...rest] = args;
  if ((sub !== 'show' && sub !== 'reset') || !ruleName) {
    throw new DoormanError('DMN_ERR_USAGE', 'usage: doorman limits show|reset RULE ARGS… [--json] (see doorman --help)');
  }
  const loaded = loadConfig(file ? { file } : {});
  if (rulesDir) loaded.config.rules.dir = rulesDir;
  const quiet = { warn: () => undefined, info: () => undefined };
  const metrics = createMetrics({ version: VERSION, defaults: false });
  const set = loadRuleSet(loaded.config.rules.dir, { ...ruleDeps(loaded, metrics, quiet), checkOnly: true }, RULE_TYPES);
  for (const r of set.rules) r.rule.close?.();
  const rule = set.rules.find((r) => r.rule.name === ruleName)?.rule;
  if (!rule?.admin) {
    const names = set.rules.filter((r) => r.rule.admin).map((r) => r.rule.name);
    throw new DoormanError('DMN_ERR_USAGE', `no limit rule named ${ruleName} (rules with state: ${names.join(', ') || 'none'})`);
  }
  const target = rule.admin(rest);
  if (typeof target === 'string') throw new DoormanError('DMN_ERR_USAGE', target);

  // Redis: asked directly. Memory: the running instance holds it, asked at metrics.listen.
  const store = await createStore(loaded, metrics, quiet);
  let where: string;
  let inspect: () => Promise<RawState>;
  let reset: () => Promise<boolean>;
  if (store.kind === 'redis') {
    if (!(await store.ready(loaded.config.redis.commandTimeout * 10))) {
      await store.close();
      throw new DoormanError('DMN_ERR_STATE', 'Redis is not reachable');
    }
    where = 'redis';
    inspect = () => store.inspect(target.key);
    reset = () => store.reset(target.key);
  } else {
    await store.close();
    const listen = loaded.config.metrics.listen;
    if (listen === 'off') throw new DoormanError('DMN_ERR_STATE', 'no Redis, and metrics.listen is off: the running instance keeps the limits in its memory and has no listener to ask');
    const at = metricsAddress(listen);
    const asked = instanceAddress(at);
    where = `the running instance at ${asked.host}:${asked.port}`;
    inspect = () => askInstanceState(at, target.key);
    reset = () => askInstanceReset(at, target.key);
  }
  try {
    if (sub === 'reset') {
      const existed = await reset();
      if (json) process.stdout.write(`${JSON.stringify({ rule: ruleName, type: rule.type, describe: target.describe, key: target.key, store: where, reset: existed })}\n`);
      else process.stdout.write(`${existed ? 'reset' : 'nothing to reset'}: ${ruleName} ${target.describe} (${target.key})\n`);
      return 0;
    }
    const view = limitView(target.spec, await inspect());
    if (json) {
      process.stdout.write(`${JSON.stringify({ rule: ruleName, type: rule.type, describe: target.describe, key: target.key, store: where, view }, null, 2)}\n`);
    } else {
      process.stdout.write([`${ruleName} ${target.describe}`, `  ${'store:'.padEnd(14)}${where}, at ${instant(view.now)}`, ...describeView(view)].join('\n') + '\n');
    }
    return 0;
  } catch (e) {
    if (e instanceof NoInstanceError) throw new DoormanError('DMN_ERR_STATE', e.message);
    if (store.kind === 'redis') throw new DoormanError('DMN_ERR_STATE', `Redis: ${(e as Error).message}`);
    throw e;
  } finally {
    await store.close();
  }
}
