/**
 * commands.ts — pure parsers for SMTP command lines (no I/O, no state).
 *
 * `parseCommand` splits the verb from its argument. The MAIL/RCPT argument parsers
 * (`parseMailRcpt`, `formatMailRcpt`) are protocol vocabulary: src/protocol/params.ts.
 */

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

/** RFC 5321 §4.1.1.1 / RFC 1123: a HELO argument is a domain or an address literal. */
export function heloArgument(arg: string): string {
  return arg.trim().split(/\s+/)[0] ?? '';
}
