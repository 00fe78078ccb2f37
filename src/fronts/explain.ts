/**
 * explain.ts — `doorman explain`: what the configured rules would do to one session, before it
 * happens (Exim's `-bh`, for the whole rule set).
 *
 *   doorman explain --ip 192.0.2.7 [--helo mx.example.net] [--from a@example.net]
 *                   [--rcpt b@example.com …] [--listener NAME|ROLE] [--login alice] [--tls]
 *                   [--message FILE.eml] [--json]      (and doorman's own --config, --rules)
 *
 * The session is described by the options (`parseExplainArgs`), run through the
 * one pipeline without a socket (offline.ts) with the configured rules, the configured resolver
 * and the configured store seen through store/look-only.ts: nothing is counted, no slot taken, no
 * greylisting triplet recorded. cli.ts builds those (`ExplainWiring`); this module owns the
 * options, the input, the printing and the exit status:
 *   0 accepted, 1 refused (some 5xx), 2 tempfailed (some 4xx, no 5xx), 3 nothing explained: input
 *   that does not describe a session (the message names the option), a file that cannot be read,
 *   an invalid configuration or rule file, Redis unreachable (or a failure of doorman's own).
 * Human output: the session, then stage by stage each rule's finding, action, effect, reason and
 * reply, the rules not asked and why, which rule decided; then the conversation as the client
 * would see it (`S: 220 …`, `C: EHLO …`), the backend's answers marked as assumed; then the
 * result. `--json`: the same as data (offline.ts SessionReport, with `exit`).
 */
import fs from 'node:fs';
import net from 'node:net';
import type { RuleSet } from '../config/rules.js';
import type { Metrics } from '../metrics/registry.js';
import type { RuleOutcome } from '../pipeline/verdict.js';
import { describeReply } from '../protocol/reply.js';
import { OfflineInputError, runOffline, type OfflineDeps, type SessionInput, type SessionReport, type StageReport } from './offline.js';
import type { Logger } from 'pino';

/** Exit statuses of `doorman explain`. */
export const EXPLAIN_EXIT = { accepted: 0, refused: 1, tempfailed: 2, invalid: 3 } as const;

/** Largest --message file read, bytes (a message larger than this is not one doorman would take either). */
export const MAX_EXPLAIN_MESSAGE = 64 * 1024 * 1024;

export interface ExplainOptions {
  ip: string;
  helo: string | null;
  from: string | null;
  rcpts: string[];
  listener: string | null;
  login: string | null;
  tls: boolean;
  message: string | null;
  json: boolean;
}

/** An option that does not describe a session; `option` names it (`--ip`). */
export class ExplainInputError extends Error {
  constructor(
    readonly option: string,
    message: string,
  ) {
    super(`${option}: ${message}`);
    this.name = 'ExplainInputError';
  }
}

/** The configuration cannot give explain what it needs (Redis unreachable): exit 3 with this message. */
export class ExplainSetupError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ExplainSetupError';
  }
}

const VALUED = new Set(['--ip', '--helo', '--from', '--rcpt', '--listener', '--login', '--message']);
const FLAGS = new Set(['--tls', '--json']);

/** The options (`--name value` or `--name=value`); throws ExplainInputError. */
export function parseExplainArgs(args: readonly string[]): ExplainOptions {
  const o: ExplainOptions = { ip: '', helo: null, from: null, rcpts: [], listener: null, login: null, tls: false, message: null, json: false };
  const seen = new Set<string>();
  for (let i = 0; i < args.length; i++) {
    const arg = args[i] ?? '';
    const eq = arg.indexOf('=');
    const name = arg.startsWith('--') && eq > 0 ? arg.slice(0, eq) : arg;
    if (FLAGS.has(name)) {
      if (eq > 0) throw new ExplainInputError(name, 'takes no value');
      if (name === '--tls') o.tls = true;
      else o.json = true;
      continue;
    }
    if (!VALUED.has(name)) throw new ExplainInputError(name, `unknown option (options: ${[...VALUED, ...FLAGS].join(' ')}; see doorman --help)`);
    const value = eq > 0 && arg.startsWith('--') ? arg.slice(eq + 1) : args[++i];
    if (value === undefined) throw new ExplainInputError(name, 'needs a value');
    if (name !== '--rcpt' && seen.has(name)) throw new ExplainInputError(name, 'given twice');
    seen.add(name);
    switch (name) {
      case '--ip':
        o.ip = value;
        break;
      case '--helo':
        o.helo = value;
        break;
      case '--from':
        o.from = value;
        break;
      case '--rcpt':
        o.rcpts.push(value);
        break;
      case '--listener':
        o.listener = value;
        break;
      case '--login':
        o.login = value;
        break;
      case '--message':
        o.message = value;
        break;
    }
  }
  if (!o.ip) throw new ExplainInputError('--ip', 'the client address is required (e.g. --ip 192.0.2.7)');
  if (!net.isIP(o.ip)) throw new ExplainInputError('--ip', `not an IP address: ${JSON.stringify(o.ip)}`);
  if (o.rcpts.length && o.from === null) throw new ExplainInputError('--from', 'recipients need a sender (--from a@example.net, or --from "<>")');
  if (o.message !== null && !o.rcpts.length) throw new ExplainInputError('--message', 'a message needs a sender and a recipient (--from, --rcpt)');
  return o;
}

/** Reads the --message file, line ends made CRLF (a .eml file often has LF alone). */
export function readMessage(file: string): Buffer {
  let st: fs.Stats;
  try {
    st = fs.statSync(file);
  } catch (e) {
    throw new ExplainInputError('--message', `cannot read ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
  if (!st.isFile()) throw new ExplainInputError('--message', `${file} is not a file`);
  if (st.size > MAX_EXPLAIN_MESSAGE) throw new ExplainInputError('--message', `${file} is larger than ${MAX_EXPLAIN_MESSAGE} bytes`);
  const raw = fs.readFileSync(file);
  return Buffer.from(raw.toString('latin1').replace(/\r?\n/g, '\r\n'), 'latin1');
}

/** The session the options describe. */
export function explainInput(o: ExplainOptions, defaultListener: string, message: Buffer | undefined): SessionInput {
  return {
    client: o.ip,
    listener: o.listener ?? defaultListener,
    tls: o.tls,
    login: o.login,
    helo: o.helo,
    esmtp: true,
    transactions: o.from === null ? [] : [{ from: o.from, rcpts: o.rcpts.map((to) => ({ to })), ...(message ? { message } : {}) }],
  };
}

/** What cli.ts builds for explain: the configuration's rules over a look-only store. */
export interface ExplainSetup {
  readonly rules: RuleSet;
  readonly rulesDir: string;
  readonly hostname: string;
  readonly listeners: OfflineDeps['listeners'];
  readonly maxHeaderBytes: number;
  /** 'memory' or 'redis', for the header line. */
  readonly store: string;
  readonly metrics: Metrics;
  readonly log: Logger;
  /** Closes the rules and the store. */
  close(): Promise<void>;
}

export interface ExplainWiring {
  /** Builds the setup from the configuration (throws on an invalid one). */
  open(): Promise<ExplainSetup>;
  readonly stdout: (s: string) => void;
  readonly stderr: (s: string) => void;
}

const OPTION_OF: Record<OfflineInputError['field'], string> = { client: '--ip', listener: '--listener', helo: '--helo', from: '--from', rcpt: '--rcpt' };

/** `doorman explain ARGS…`: the exit status. */
export async function explainCommand(args: readonly string[], w: ExplainWiring): Promise<number> {
  let setup: ExplainSetup | null = null;
  try {
    const o = parseExplainArgs(args);
    const message = o.message === null ? undefined : readMessage(o.message);
    setup = await w.open();
    const first = setup.listeners.find((l) => l.role === 'smtp') ?? setup.listeners[0];
    const input = explainInput(o, first?.name ?? 'smtp', message);
    const report = await runOffline(input, {
      rules: setup.rules,
      metrics: setup.metrics,
      log: setup.log,
      hostname: setup.hostname,
      listeners: setup.listeners,
      maxHeaderBytes: setup.maxHeaderBytes,
      front: 'explain',
    });
    const exit = EXPLAIN_EXIT[report.result];
    if (o.json) w.stdout(`${JSON.stringify({ ...report, rules: { dir: setup.rulesDir, version: setup.rules.version }, store: setup.store, exit }, null, 2)}\n`);
    else w.stdout(formatExplanation(report, input, { rulesDir: setup.rulesDir, version: setup.rules.version, store: setup.store }));
    return exit;
  } catch (e) {
    if (e instanceof ExplainInputError) w.stderr(`doorman explain: ${e.message}\n`);
    else if (e instanceof OfflineInputError) w.stderr(`doorman explain: ${OPTION_OF[e.field]}: ${e.message}\n`);
    else if (e instanceof ExplainSetupError || (e instanceof Error && e.name === 'DoormanError')) w.stderr(`doorman explain: ${e.message}\n`);
    // Anything else is doorman's own failure: not an answer about the session (1 and 2 are answers).
    else w.stderr(`doorman explain: could not explain: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
    return EXPLAIN_EXIT.invalid;
  } finally {
    await setup?.close();
  }
}

/** The explanation as a person reads it. */
export function formatExplanation(r: SessionReport, input: SessionInput, about: { rulesDir: string; version: string; store: string }): string {
  const out: string[] = [];
  const who = [
    `client ${r.client}`,
    `listener ${r.listener.name} (${r.listener.role})`,
    input.helo === null ? 'no HELO' : `${input.esmtp ? 'EHLO' : 'HELO'} ${input.helo}`,
    input.tls ? 'TLS' : 'no TLS',
    input.login === null ? 'no login' : `login ${input.login}`,
  ];
  out.push(`Session: ${who.join(', ')}`);
  out.push(`Rules: ${about.rulesDir} (version ${about.version}); store: ${about.store}, looked at only (nothing counted)`);
  for (const st of r.stages) {
    out.push('');
    out.push(stageTitle(st, r));
    const width = Math.max(4, ...st.outcomes.map((o) => o.rule.length), ...st.skipped.map((x) => x.rule.length));
    for (const o of st.outcomes) out.push(`  ${o.rule.padEnd(width)}  ${outcomeLine(o)}`);
    for (const x of st.skipped) out.push(`  ${x.rule.padEnd(width)}  not asked (${x.why})`);
    if (st.reply) out.push(`  → decided by ${st.decidedBy ?? '?'}: ${st.reply.code} ${st.reply.enhanced ? `${st.reply.enhanced} ` : ''}${st.reply.text.replace(/\n/g, ' ')}`);
    else out.push(`  → passed${st.acceptedBy ? ` (allowlisted by ${st.acceptedBy})` : ''}${st.tags.length ? `; tags: ${st.tags.join(' | ')}` : ''}`);
  }
  if (!r.stages.length) out.push('', 'No rule acts on these stages.');
  out.push('', 'Conversation (as the client would see it):');
  for (const c of r.conversation) {
    if (c.client !== undefined) out.push(`  C: ${c.client}`);
    const lines = c.server.split('\n');
    for (const [i, l] of lines.entries()) out.push(`  S: ${l}${c.assumed && i === lines.length - 1 ? "    (the backend's answer, assumed)" : ''}`);
  }
  out.push('', `Result: ${r.result} (exit ${EXPLAIN_EXIT[r.result]})`);
  return `${out.join('\n')}\n`;
}

function stageTitle(st: StageReport, r: SessionReport): string {
  const t = st.transaction === undefined ? undefined : r.transactions[st.transaction];
  switch (st.stage) {
    case 'mail':
      return `mail FROM:<${t?.from ?? ''}>`;
    case 'rcpt':
      return `rcpt TO:<${st.recipient ?? ''}>`;
    default:
      return st.stage;
  }
}

/** finding, action, effect (what it would have done in dry-run or tag), reason, reply. */
function outcomeLine(o: RuleOutcome): string {
  const effect = o.wouldBe && o.effect !== o.wouldBe ? `${o.effect} (would ${o.wouldBe})` : o.effect;
  const parts = [`${o.finding.padEnd(8)}`, `action ${o.action.padEnd(8)}`, `effect ${effect}`];
  if (o.reason) parts.push(`reason: ${o.reason}`);
  if (o.reply) parts.push(`reply: ${describeReply(o.reply)}`);
  return parts.join('  ');
}
