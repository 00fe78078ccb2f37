/**
 * data.ts — the DATA policy: what stops a message on its way to the backend, and what the client
 * is told then.
 *
 * Owns the checks made while the message streams (over the SIZE doorman advertises or, with
 * doorman's own headers, over the backend's; a bare newline under limits.bareNewline = reject; a
 * line over limits.maxDataLine), the minimum data rate (limits.minDataRate after its grace
 * period), where the header block ends for the data_headers rules (limits.maxHeaderBytes), the
 * reply for a stopped message and the message's outcome for the log line. Functions of what they
 * are handed: the session streams the bytes (message.ts), runs the data_headers and data_end rules
 * and queues the reply.
 */
import type { Capabilities } from '../backend/connection.js';
import { R, replyClass, type Reply } from '../protocol/reply.js';
import { backendSize, sizeLimit } from './extensions.js';
import type { AbortReason, Message } from './message.js';

/** What framing.ts has seen of the message so far. */
export interface DataSeen {
  readonly dataBytes: number;
  readonly bareNewline: boolean;
  readonly longLine: boolean;
}

/** The client's message is over the advertised SIZE, or with doorman's headers (`added`) over the backend's. */
export function oversized(bytes: number, added: number, caps: Capabilities, maxMessageSize: number): boolean {
  return bytes > sizeLimit(caps, maxMessageSize) || bytes + added > (backendSize(caps) ?? Infinity);
}

/** Why the message must stop now (size, bare newline, long line), or null. */
export function stopReason(seen: DataSeen, rejectBareNewline: boolean, tooBig: boolean): AbortReason | null {
  if (tooBig) return 'size';
  if (seen.bareNewline && rejectBareNewline) return 'bare_newline';
  if (seen.longLine) return 'long_line';
  return null;
}

/** A DATA slower than `rate` bytes/s after its grace period (10 s, or the data timeout if shorter). */
export function tooSlow(rate: number, dataTimeout: number, started: number, bytes: number): boolean {
  if (rate === 0) return false;
  const elapsed = Date.now() - started;
  if (elapsed < Math.min(10_000, dataTimeout)) return false;
  return bytes < (rate * elapsed) / 1000;
}

/**
 * The header block for the data_headers rules, from the bytes held so far: null while it may
 * still grow (no blank line yet, under `limit`, not the end of the message); else the held bytes,
 * the header block's length and whether it was cut at `limit` (or at the end of the message).
 */
export function headerBlock(pending: readonly Buffer[], limit: number, final: boolean): { held: Buffer; length: number; truncated: boolean } | { held: Buffer; length: null } {
  const held = Buffer.concat(pending);
  const end = held.indexOf('\r\n\r\n');
  const startsWithBlank = held.subarray(0, 2).equals(Buffer.from('\r\n'));
  if (end < 0 && !startsWithBlank && held.length < limit && !final) return { held, length: null };
  const length = startsWithBlank ? 0 : end >= 0 ? end + 2 : Math.min(held.length, limit);
  return { held, length, truncated: end < 0 && !startsWithBlank };
}

/** The client's reply for a stopped message; `violation` counts a protocol violation. */
export function abortReply(d: Message, violation: (kind: string) => void): Reply {
  switch (d.aborted) {
    case 'size':
      return R.tooBig();
    case 'bare_newline':
      violation('bare_lf');
      return R.bareNewline();
    case 'long_line':
      violation('line_too_long');
      return R.dataLineTooLong();
    case 'rule':
      return d.headerRule?.reply ?? R.tempfailLocal();
    case 'backend_refused':
      return d.refused ?? R.backendTempfail();
    default:
      return R.backendTempfail();
  }
}

/** The message's fate for the log line and doorman_messages_total. */
export function outcomeOf(r: Reply): 'accepted' | 'tempfailed' | 'rejected' {
  return replyClass(r) === 2 ? 'accepted' : replyClass(r) === 4 ? 'tempfailed' : 'rejected';
}

/** The backend's queue id in its 250 ("queued as …"), if it gave one. */
export function queueIdOf(r: Reply): string | undefined {
  return /queued as ([A-Za-z0-9]+)/.exec(r.lines.join(' '))?.[1] || undefined;
}
