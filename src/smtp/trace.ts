/**
 * trace.ts — the header fields doorman adds to a message, and the ones it removes.
 *
 * - `Received:` (RFC 5321 §4.4) when the backend cannot be told the real client (no XCLIENT
 *   with ADDR, no PROXY header: Exchange and most non-Postfix MTAs), so the message keeps who
 *   sent it: client name and address, HELO, protocol (RFC 3848: ESMTPS, ESMTPSA…), TLS,
 *   doorman's name and session id, the recipient when there is one.
 * - `Authentication-Results:` (RFC 8601), one per message, doorman's host name as authserv-id.
 * - Incoming Authentication-Results fields that claim that authserv-id are removed from the
 *   header block (RFC 8601 §5): nobody outside may speak for doorman.
 */
import { claimsAuthservId } from '../protocol/auth-results.js';

/** Longest Received field doorman writes, octets (the SIZE headroom counts it). */
export const MAX_RECEIVED_OCTETS = 1_000;
/** Longest Authentication-Results field doorman writes, octets; results past it are left out. */
export const MAX_AUTH_RESULTS_OCTETS = 2_000;

export interface TraceFacts {
  readonly hostname: string;
  readonly sessionId: string;
  readonly clientAddress: string;
  readonly helo: string | null;
  readonly esmtp: boolean;
  readonly tls: { readonly protocol: string | null; readonly cipher: string | null } | null;
  readonly authenticated: boolean;
  /** The recipient, named only when the message has exactly one (RFC 5321 §4.4 `for`). */
  readonly recipient: string | null;
  readonly date: Date;
}

/** The Received field, CRLF-terminated and folded. */
export function receivedField(f: TraceFacts): string {
  const ip = f.clientAddress.includes(':') ? `IPv6:${f.clientAddress}` : f.clientAddress;
  const helo = f.helo ? clean(f.helo) : 'unknown';
  // RFC 3848: ESMTP, then S for TLS, A for an authenticated session; SMTP after HELO.
  const proto = f.esmtp ? `ESMTP${f.tls ? 'S' : ''}${f.authenticated ? 'A' : ''}` : 'SMTP';
  const tls = f.tls ? `\r\n\t(using ${clean(f.tls.protocol ?? 'TLS')}${f.tls.cipher ? ` with cipher ${clean(f.tls.cipher)}` : ''})` : '';
  const rcpt = f.recipient ? `\r\n\tfor <${clean(f.recipient)}>` : '';
  const field = `Received: from ${helo} ([${ip}])\r\n\tby ${f.hostname} (doorman) with ${proto} id ${f.sessionId}${tls}${rcpt};\r\n\t${rfc5322Date(f.date)}\r\n`;
  return field.length <= MAX_RECEIVED_OCTETS ? field : `Received: from unknown ([${ip}])\r\n\tby ${f.hostname} (doorman) with ${proto} id ${f.sessionId};\r\n\t${rfc5322Date(f.date)}\r\n`;
}

/** An Authentication-Results field for `value` (formatAuthResults), CRLF-terminated. */
export function authResultsField(value: string): string {
  return `Authentication-Results: ${value}\r\n`;
}

/**
 * The header block without the Authentication-Results fields that claim `authservId`
 * (RFC 8601 §5); `block` is the header block as the client sent it (CRLF lines, folded fields).
 * Returns the block itself when nothing is removed.
 */
export function stripClaimed(block: Buffer, authservId: string): Buffer {
  if (!/authentication-results/i.test(block.toString('latin1'))) return block;
  const text = block.toString('latin1');
  const lines = text.split(/(?<=\r\n)/);
  const out: string[] = [];
  let removed = false;
  for (let i = 0; i < lines.length; ) {
    // One field: its first line and the continuation lines that follow (starting with WSP).
    let j = i + 1;
    while (j < lines.length && /^[ \t]/.test(lines[j] ?? '')) j++;
    const field = lines.slice(i, j).join('');
    const m = /^authentication-results[ \t]*:(.*)$/is.exec(field);
    if (m && claimsAuthservId((m[1] ?? '').replace(/\r\n/g, ''), authservId)) removed = true;
    else out.push(field);
    i = j;
  }
  return removed ? Buffer.from(out.join(''), 'latin1') : block;
}

/** RFC 5322 §3.3 date-time in UTC: `Tue, 1 Dec 2026 19:30:00 +0000`. */
export function rfc5322Date(d: Date): string {
  const day = ['Sun', 'Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat'][d.getUTCDay()];
  const mon = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'][d.getUTCMonth()];
  const two = (n: number) => String(n).padStart(2, '0');
  return `${day}, ${d.getUTCDate()} ${mon} ${d.getUTCFullYear()} ${two(d.getUTCHours())}:${two(d.getUTCMinutes())}:${two(d.getUTCSeconds())} +0000`;
}

/** Text for a header comment or token: no controls, no parentheses or angle brackets. */
function clean(s: string): string {
  // eslint-disable-next-line no-control-regex
  return s.replace(/[\x00-\x20\x7f()<>\\]/g, '').slice(0, 255) || 'unknown';
}
