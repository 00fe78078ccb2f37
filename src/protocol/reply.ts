/**
 * protocol/reply.ts — the only place that formats SMTP replies.
 *
 * Part of the protocol ground floor (src/protocol/): smtp/, backend/, pipeline/ and rules/ import
 * it; it imports none of them.
 *
 * A Reply carries a three-digit code, an RFC 3463 enhanced status code and its text lines.
 * Replies that doorman itself makes always carry an enhanced code; replies relayed from the
 * backend are kept byte for byte (`raw`), so the client sees exactly what the backend said.
 *
 * `closes` marks a reply after which the connection is closed (every 421, RFC 5321 §3.8).
 */

export interface Reply {
  /** Three-digit SMTP reply code, e.g. 250. */
  readonly code: number;
  /** RFC 3463 enhanced status code without the class prefix rules, e.g. "5.7.1"; "" if none. */
  readonly enhanced: string;
  /** Text lines, without code and CRLF. */
  readonly lines: readonly string[];
  /** Close the connection after sending. */
  readonly closes: boolean;
  /** Exact wire form when relayed from the backend (CRLF-terminated lines). */
  readonly raw?: Buffer;
}

const ENHANCED_RE = /^([245])\.(\d{1,3})\.(\d{1,3})$/;

/** Builds a reply of doorman's own. Multi-line text becomes a multi-line reply. */
export function reply(code: number, enhanced: string, text: string | readonly string[], closes = code === 421): Reply {
  if (!Number.isInteger(code) || code < 200 || code > 599) throw new RangeError(`bad reply code ${code}`);
  if (enhanced !== '' && !ENHANCED_RE.test(enhanced)) throw new RangeError(`bad enhanced code ${enhanced}`);
  if (enhanced !== '' && enhanced[0] !== String(code)[0]) {
    throw new RangeError(`enhanced code ${enhanced} does not match class of ${code}`);
  }
  const lines = (typeof text === 'string' ? [text] : [...text]).map(sanitize);
  return { code, enhanced, lines: lines.length ? lines : [''], closes };
}

/** A reply's text may not contain CR, LF or other control characters (reply injection). */
function sanitize(line: string): string {
  // eslint-disable-next-line no-control-regex
  return line.replace(/[\x00-\x1f\x7f]/g, ' ');
}

/** Serialises a reply for the wire. Relayed replies are written exactly as received. */
export function formatReply(r: Reply): string | Buffer {
  if (r.raw) return r.raw;
  const last = r.lines.length - 1;
  return r.lines
    .map((line, i) => {
      const body = r.enhanced ? (line ? `${r.enhanced} ${line}` : r.enhanced) : line;
      return `${r.code}${i === last ? ' ' : '-'}${body}\r\n`;
    })
    .join('');
}

/** The reply class: 2, 3, 4 or 5. */
export function replyClass(r: Pick<Reply, 'code'>): 2 | 3 | 4 | 5 {
  return Math.floor(r.code / 100) as 2 | 3 | 4 | 5;
}

/** The text of a reply as one string, for logs. */
export function replyText(r: Reply): string {
  return r.lines.join(' ');
}

/** One line summary for logs: "550 5.7.1 text". */
export function describeReply(r: Reply): string {
  return `${r.code}${r.enhanced ? ' ' + r.enhanced : ''} ${replyText(r)}`.trim();
}

/**
 * Parses a reply as received from the backend: lines like "250-…" then "250 …".
 * Returns the code, the enhanced code (when the first line has one) and the text lines.
 */
export function parseReplyLines(lines: readonly string[], raw: Buffer): Reply {
  const first = lines[0] ?? '';
  const code = Number.parseInt(first.slice(0, 3), 10);
  const texts = lines.map((l) => l.slice(4));
  const m = /^([245]\.\d{1,3}\.\d{1,3})(?:\s|$)/.exec(texts[0] ?? '');
  const enhanced = m?.[1] ?? '';
  return {
    code,
    enhanced,
    lines: texts.map((t) => (enhanced && t.startsWith(enhanced) ? t.slice(enhanced.length).trimStart() : t)),
    closes: code === 421,
    raw,
  };
}

/**
 * The catalogue of replies doorman makes itself. Client text never names the mechanism
 * (no "backend", "redis", "dnsbl"): operators read the reason in the log.
 */
export const R = {
  greeting: (host: string) => reply(220, '', `${host} ESMTP`),
  greetingRefused: (host: string) => reply(554, '5.7.1', `${host} Service unavailable; access denied`),
  unavailable: (host: string) => reply(421, '4.4.1', `${host} Service temporarily unavailable, try again later`),
  overloaded: (host: string) => reply(421, '4.3.2', `${host} Service busy, try again later`),
  tooManyConnections: (host: string) => reply(421, '4.7.0', `${host} Error: too many connections`),
  shuttingDown: (host: string) => reply(421, '4.3.2', `${host} Service shutting down, closing connection`),
  timeout: (host: string) => reply(421, '4.4.2', `${host} Error: timeout exceeded`),
  lostBackend: (host: string) => reply(421, '4.4.2', `${host} Error: connection lost, try again later`),
  bye: (host: string) => reply(221, '2.0.0', `${host} closing connection`, true),
  noop: () => reply(250, '2.0.0', 'Ok'),
  mailOk: () => reply(250, '2.1.0', 'Ok'),
  rsetOk: () => reply(250, '2.0.0', 'Ok'),
  help: () => reply(214, '2.0.0', 'See RFC 5321 and https://www.rfc-editor.org/'),
  vrfy: () => reply(252, '2.0.0', 'Cannot VRFY user, but will accept message and attempt delivery'),
  expn: () => reply(502, '5.5.1', 'Error: EXPN command not available'),
  startData: () => reply(354, '', 'End data with <CR><LF>.<CR><LF>'),
  tlsReady: () => reply(220, '2.0.0', 'Ready to start TLS'),
  tlsActive: () => reply(554, '5.5.1', 'Error: TLS already active'),
  tlsUnavailable: () => reply(502, '5.5.1', 'Error: command not implemented'),
  unknown: () => reply(500, '5.5.2', 'Error: command not recognized'),
  notImplemented: () => reply(502, '5.5.1', 'Error: command not implemented'),
  syntax: (what: string) => reply(501, '5.5.4', `Syntax: ${what}`),
  badSyntax: (why: string) => reply(501, '5.5.4', `Error: ${why}`),
  badParam: (why: string) => reply(555, '5.5.4', `Error: ${why}`),
  lineTooLong: () => reply(500, '5.5.2', 'Error: line too long'),
  dataLineTooLong: () => reply(500, '5.5.2', 'Error: message line too long'),
  bareNewline: () => reply(550, '5.5.2', 'Error: bare <CR> or <LF> received; use <CR><LF> line endings'),
  bareNewlineCommand: () => reply(500, '5.5.2', 'Error: bare <CR> or <LF> received in command'),
  nulInCommand: () => reply(500, '5.5.2', 'Error: NUL character in command'),
  needHelo: () => reply(503, '5.5.1', 'Error: send HELO/EHLO first'),
  nestedMail: () => reply(503, '5.5.1', 'Error: nested MAIL command'),
  needMail: () => reply(503, '5.5.1', 'Error: need MAIL command'),
  needRcpt: () => reply(503, '5.5.1', 'Error: need RCPT command'),
  noValidRcpt: () => reply(554, '5.5.1', 'Error: no valid recipients'),
  tooManyRcpts: () => reply(452, '4.5.3', 'Error: too many recipients'),
  tooBig: () => reply(552, '5.3.4', 'Error: message size exceeds fixed limit'),
  tooManyErrors: (host: string) => reply(421, '4.7.0', `${host} Error: too many errors`),
  tooManyCommands: (host: string) => reply(421, '4.7.0', `${host} Error: too many commands`),
  authNotAvailable: () => reply(502, '5.5.1', 'Error: authentication not enabled'),
  authNeedsTls: () => reply(530, '5.7.0', 'Must issue a STARTTLS command first'),
  authAlready: () => reply(503, '5.5.1', 'Error: already authenticated'),
  authInTransaction: () => reply(503, '5.5.1', 'Error: MAIL transaction in progress'),
  authCancelled: () => reply(501, '5.7.0', 'Authentication cancelled'),
  utf8NotDeclared: () => reply(553, '5.6.7', 'Must declare SMTPUTF8 to send unicode address'),
  tempfailLocal: () => reply(451, '4.3.0', 'Error: temporary failure, try again later'),
  backendTempfail: () => reply(451, '4.4.2', 'Error: temporary failure, try again later'),
  pipeliningViolation: () => reply(554, '5.5.0', 'Error: SMTP protocol synchronization'),
  protocolError: () => reply(521, '5.5.1', 'Protocol error', true),
} as const;
