/**
 * guards.ts — the checks every command line passes before its handler, and their counters.
 *
 * Owns the per-session counts that the limits bound — commands (limits.maxCommands), unknown
 * commands (limits.maxUnknownCommands), junk commands since the last delivered message
 * (limits.maxJunkCommands) — and the line checks: too long, NUL, bare CR or LF (limits.bareNewline),
 * non-SMTP clients (HTTP, proxies), a session refused at connect (only QUIT). `check` turns a
 * command line into the command to dispatch or the reply refusing it (and why the session ends);
 * the session queues the reply and dispatches. Also which verbs may be pipelined.
 */
import type { Limits } from '../config/schema.js';
import { R, reply, type Reply } from '../protocol/reply.js';
import { KNOWN_VERBS, NON_SMTP_VERBS, NOT_IMPLEMENTED_VERBS, parseCommand, type Command } from './commands.js';
import type { CommandEvent } from './framing.js';

/**
 * Junk commands (Postfix smtpd_junk_command_limit: NOOP, VRFY, ETRN, RSET; here also the other
 * commands answered without a transaction: HELO, EHLO, HELP, EXPN): limits.maxJunkCommands of them
 * between delivered messages, then 421 4.7.0.
 */
const JUNK_VERBS = new Set(['NOOP', 'VRFY', 'ETRN', 'RSET', 'HELO', 'EHLO', 'HELP', 'EXPN']);

/** Verbs whose replies may be queued (RFC 2920 §3.1: may appear anywhere in a group). */
const PIPELINABLE = new Set(['MAIL', 'RCPT', 'RSET', 'NOOP']);

/** The verb's reply may be queued behind others (when the backend offers PIPELINING). */
export function pipelinable(verb: string): boolean {
  return PIPELINABLE.has(verb);
}

/** A command line after the guards: the command, QUIT after a refusal at connect, or a refusal. */
export type Guarded =
  | { command: Command }
  | { quit: true }
  /** `verb` as counted in doorman_commands_total; `endReason` when the reply ends the session. */
  | { reject: string; reply: Reply; endReason?: string };

/** What the guards need of the session; `limits` is read at each check (reloads). */
export interface GuardHost {
  readonly hostname: string;
  readonly limits: Limits;
  /** doorman_protocol_violations_total{kind}. */
  violation(kind: string): void;
  /** The connect-stage rules refused the client (554): only QUIT is taken. */
  refusedAtConnect(): boolean;
}

export class Guards {
  /** Command lines read (the session log line's `commands`). */
  commands = 0;
  private unknown = 0;
  /** Junk commands since the session started or last delivered a message. */
  private junk = 0;

  constructor(private readonly host: GuardHost) {}

  check(ev: CommandEvent): Guarded {
    const h = this.host;
    this.commands++;
    if (this.commands > h.limits.maxCommands) {
      h.violation('command_flood');
      return { reject: 'LIMIT', reply: R.tooManyCommands(h.hostname), endReason: 'too-many-commands' };
    }
    if (ev.type === 'too_long') {
      h.violation('line_too_long');
      return { reject: 'TOO_LONG', reply: R.lineTooLong() };
    }
    const { line } = ev;
    if (line.includes(0)) {
      h.violation('nul');
      return { reject: 'NUL', reply: R.nulInCommand() };
    }
    if (ev.bareCr || (ev.bareLf && h.limits.bareNewline === 'reject')) {
      h.violation('bare_lf');
      return { reject: 'BARE', reply: R.bareNewlineCommand() };
    }
    if (ev.bareLf) h.violation('bare_lf');
    const cmd = parseCommand(line);
    if (h.refusedAtConnect()) {
      if (cmd.verb === 'QUIT') return { quit: true };
      return { reject: cmd.verb, reply: reply(503, '5.5.1', 'Error: no valid greeting; send QUIT') };
    }
    if (this.unknown >= h.limits.maxUnknownCommands) {
      return { reject: cmd.verb, reply: R.tooManyErrors(h.hostname), endReason: 'too-many-errors' };
    }
    if (NON_SMTP_VERBS.has(cmd.verb) || /^[A-Za-z-]+:/.test(cmd.verb)) {
      h.violation('non_smtp');
      return { reject: 'NONSMTP', reply: reply(421, '4.7.0', `${h.hostname} Error: non-SMTP command, closing connection`), endReason: 'non-smtp' };
    }
    if (!KNOWN_VERBS.has(cmd.verb)) {
      this.unknown++;
      return { reject: 'UNKNOWN', reply: NOT_IMPLEMENTED_VERBS.has(cmd.verb) ? R.notImplemented() : R.unknown() };
    }
    if (JUNK_VERBS.has(cmd.verb) && ++this.junk > h.limits.maxJunkCommands) {
      h.violation('command_flood');
      return { reject: cmd.verb, reply: R.tooManyCommands(h.hostname), endReason: 'too-many-commands' };
    }
    return { command: cmd };
  }

  /** As Postfix: the junk command count starts again after a delivered message. */
  delivered(): void {
    this.junk = 0;
  }
}
