/**
 * protocol/params.ts — MAIL/RCPT arguments: `FROM:<path> params` and `TO:<path> params` parsed
 * into a path and a parameter list, and serialised back (RFC 5321 §4.1.2, §4.1.1.11). Pure: no
 * I/O, no state.
 *
 * Part of the protocol ground floor (src/protocol/): smtp/, backend/, pipeline/ and rules/ import
 * it; it imports none of them.
 */
import { parsePath, splitPathArg, type ParsedPath } from './address.js';

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
