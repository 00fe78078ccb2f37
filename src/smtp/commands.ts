/**
 * commands.ts — pure parsers for SMTP command lines (no I/O, no state).
 *
 * `parseCommand` splits the verb from its argument; `parseMailRcpt` parses `FROM:<path> params`
 * and `TO:<path> params` into a path and a parameter list (RFC 5321 §4.1.2, §4.1.1.11).
 */
import { parsePath, splitPathArg, type ParsedPath } from './address.js';

/** Verbs doorman answers; anything else is "unknown" (500). */
export const KNOWN_VERBS = new Set([
  'HELO', 'EHLO', 'MAIL', 'RCPT', 'DATA', 'RSET', 'NOOP', 'QUIT', 'VRFY', 'EXPN', 'HELP', 'STARTTLS', 'AUTH', 'ETRN',
]);

/** Verbs that exist (RFC 821, extensions) but that doorman does not offer: 502. */
export const NOT_IMPLEMENTED_VERBS = new Set([
  'SEND', 'SOML', 'SAML', 'TURN', 'ATRN', 'BDAT', 'VERB', 'ONEX', 'XCLIENT', 'XFORWARD', 'XEXCH50',
  'X-EXPS', 'XADR', 'XQUE', 'XSTA', 'XTRN', 'XUSR', 'BURL', 'LHLO', 'XAUTH', 'XSHADOW', 'XAUTHOR', 'CHUNKING',
]);

/** Command lines that betray a non-SMTP client (HTTP, proxies): postscreen's non-SMTP test. */
export const NON_SMTP_VERBS = new Set(['GET', 'POST', 'HEAD', 'PUT', 'CONNECT', 'OPTIONS', 'DELETE', 'USER', 'PASS']);

export interface Command {
  /** Upper-cased verb. */
  readonly verb: string;
  /** Everything after the first space (or ""), as sent. */
  readonly arg: string;
  /** The whole line, as sent (no CRLF). */
  readonly line: string;
}

/** Splits a line into verb and argument. Lines are decoded as UTF-8; callers check bytes first. */
export function parseCommand(line: Buffer): Command {
  const text = line.toString('utf8');
  const sp = text.indexOf(' ');
  const verb = (sp < 0 ? text : text.slice(0, sp)).toUpperCase();
  const arg = sp < 0 ? '' : text.slice(sp + 1);
  return { verb, arg, line: text };
}

export interface MailParam {
  /** Upper-cased keyword. */
  readonly key: string;
  /** Value as sent, or null when the parameter has no `=value`. */
  readonly value: string | null;
}

export type MailRcptResult =
  | { ok: true; path: ParsedPath; params: readonly MailParam[] }
  | { ok: false; code: 'syntax' | 'address' | 'param'; reason: string };

/**
 * Parses `FROM:<path> KEY=VALUE …` (prefix "FROM") or `TO:<path> …` (prefix "TO").
 * Postfix-style tolerance: a space after the colon is accepted.
 */
export function parseMailRcpt(arg: string, prefix: 'FROM' | 'TO'): MailRcptResult {
  const head = arg.slice(0, prefix.length + 1).toUpperCase();
  if (head !== `${prefix}:`) return { ok: false, code: 'syntax', reason: `${prefix}:<address>` };
  const split = splitPathArg(arg.slice(prefix.length + 1));
  if (!split) return { ok: false, code: 'syntax', reason: `${prefix}:<address>` };
  const parsed = parsePath(split.path);
  if (!parsed.ok) return { ok: false, code: 'address', reason: parsed.reason };
  if (prefix === 'TO' && parsed.path.isNull) return { ok: false, code: 'address', reason: 'null recipient' };
  const params: MailParam[] = [];
  const rest = split.rest.trim();
  if (rest) {
    if (!/^\s/.test(split.rest)) return { ok: false, code: 'syntax', reason: 'missing space before parameters' };
    for (const p of rest.split(/\s+/)) {
      const m = /^([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e\u0080-\uffff]+))?$/.exec(p);
      if (!m || m[1] === undefined) return { ok: false, code: 'param', reason: `bad parameter ${p.slice(0, 40)}` };
      params.push({ key: m[1].toUpperCase(), value: m[2] ?? null });
    }
  }
  return { ok: true, path: parsed.path, params };
}

/** Serialises MAIL/RCPT for the backend from parsed parts (never the raw client line). */
export function formatMailRcpt(verb: 'MAIL FROM' | 'RCPT TO', path: ParsedPath, params: readonly MailParam[]): string {
  const ps = params.map((p) => (p.value === null ? p.key : `${p.key}=${p.value}`)).join(' ');
  return `${verb}:<${path.raw}>${ps ? ' ' + ps : ''}`;
}

/** RFC 5321 §4.1.1.1 / RFC 1123: a HELO argument is a domain or an address literal. */
export function heloArgument(arg: string): string {
  return arg.trim().split(/\s+/)[0] ?? '';
}
