/**
 * cli.ts — the `doorman` command.
 *
 *   doorman [start] [--config FILE]   start the proxy (SIGHUP reloads rules, limits, certificate; SIGTERM drains)
 *   doorman check [--config FILE] [--rules DIR]
 *                                     validate configuration and rule files; exit 1 on errors
 *   doorman limits show|reset RULE ARGS… [--json]
 *                                     a limit's state (cli-limits.ts)
 *   doorman --help | --version
 */
import { ENV_VARS, loadConfig } from './config/load.js';
import { loadRuleSet } from './config/rules.js';
import { listenerRefs } from './config/schema.js';
import { DoormanError, formatProblem } from './errors.js';
import cluster from 'node:cluster';
import { limits } from './cli-limits.js';
import { loadSecureContext, ruleDeps, runPrimary, start, workerCount } from './main.js';
import { RULE_TYPES } from './rules/index.js';
import { createMetrics } from './metrics/registry.js';
import { VERSION } from './version.js';

const HELP = `doorman ${VERSION} — a spam-filtering SMTP proxy in front of your mail server

Usage:
  doorman [start] [--config FILE]    start the proxy
  doorman check [--config FILE] [--rules DIR]
                                     validate the configuration and the rule files
  doorman limits show|reset RULE ARGS… [--json]
                                     show or reset a limit's state: used, remaining, next
                                     allowed, expiry (Redis, or without it the running
                                     instance, asked at metrics.listen), e.g.
                                     doorman limits show ratelimit conn-rate 192.0.2.7
                                     doorman limits reset greylist 192.0.2.7 a@example.org b@example.com
  doorman --help                     this text
  doorman --version                  the version

Signals: SIGHUP reloads the rule files, the limits and the TLS certificate; SIGTERM/SIGINT drain and stop.

Environment (overrides the configuration file):
${Object.entries(ENV_VARS)
  .map(([k, v]) => `  ${k.padEnd(24)} ${v}`)
  .join('\n')}

Rule types: ${[...RULE_TYPES.keys()].join(', ')}
Documentation: README.md, docs/configuration.md, docs/rules.md
`;

function takeOption(args: string[], name: string): string | undefined {
  const i = args.indexOf(name);
  if (i < 0) return undefined;
  const v = args[i + 1];
  if (v === undefined) throw new DoormanError('DMN_ERR_USAGE', `${name} needs a value`);
  args.splice(i, 2);
  return v;
}

export async function main(argv: string[]): Promise<number | undefined> {
  const args = [...argv];
  if (args.includes('--help') || args.includes('-h') || args[0] === 'help') {
    process.stdout.write(HELP);
    return 0;
  }
  if (args.includes('--version') || args[0] === 'version') {
    process.stdout.write(`${VERSION}\n`);
    return 0;
  }
  try {
    const file = takeOption(args, '--config');
    const rulesDir = takeOption(args, '--rules');
    const cmd = args.shift() ?? 'start';
    if (cmd === 'limits') return await limits(args, file, rulesDir);
    if (args.length) throw new DoormanError('DMN_ERR_USAGE', `unexpected argument ${args[0]} (see doorman --help)`);
    if (cmd === 'check') {
      const loaded = loadConfig(file ? { file } : {});
      if (rulesDir) loaded.config.rules.dir = rulesDir;
      loadSecureContext(loaded);
      // check builds the rules to validate them, but starts nothing (no self-tests run).
      const quiet = { warn: () => undefined, info: () => undefined };
      const set = loadRuleSet(loaded.config.rules.dir, { ...ruleDeps(loaded, createMetrics({ version: VERSION, defaults: false }), quiet), checkOnly: true }, RULE_TYPES, {
        listeners: listenerRefs(loaded.config),
      });
      // Still working, but to be changed: old keys, rule lists that contradict rules/site.yaml.
      for (const w of set.warnings) process.stderr.write(`warning: ${formatProblem(w)}\n`);
      process.stdout.write(
        `ok: ${loaded.file ?? 'defaults + environment'}; ${set.rules.length} rule(s) from ${loaded.config.rules.dir}: ${set.rules.map((r) => `${r.rule.name} (${r.rule.type}, ${r.action})`).join(', ') || 'none'}\n`,
      );
      for (const r of set.rules) r.rule.close?.();
      return 0;
    }
    if (cmd !== 'start') throw new DoormanError('DMN_ERR_USAGE', `unknown command ${cmd} (see doorman --help)`);
    const loaded = loadConfig(file ? { file } : {});
    if (rulesDir) loaded.config.rules.dir = rulesDir;
    const workers = workerCount(loaded);
    if (workers > 1 && cluster.isPrimary) {
      await runPrimary(loaded, workers);
      return undefined;
    }
    const running = await start(loaded);
    process.on('SIGHUP', () => running.reload());
    let stopping = false;
    const stop = (sig: string) => {
      if (stopping) return;
      stopping = true;
      running.log.info({ signal: sig }, 'shutting down');
      running.stop().then(
        () => process.exit(0),
        () => process.exit(1),
      );
    };
    process.on('SIGTERM', () => stop('SIGTERM'));
    process.on('SIGINT', () => stop('SIGINT'));
    return undefined;
  } catch (e) {
    if (e instanceof DoormanError) {
      process.stderr.write(`doorman: ${e.message}\n`);
      return e.code === 'DMN_ERR_USAGE' ? 2 : 1;
    }
    throw e;
  }
}
