/**
 * events.ts — the typed events of a session, as rules see them.
 *
 * A session is a stream of these events (connect, helo, auth, mail, rcpt, data_headers,
 * data_end, quit, and etrn when a client asks for a queue): `Session.events$` emits each one, and the runner evaluates the rules of its
 * stage. Each carries a read-only snapshot of the session so far; rules never get the
 * socket or the session object.
 */
import type { ParsedPath } from '../protocol/address.js';
import type { AuthResult } from '../protocol/auth-results.js';
import type { MailParam } from '../protocol/params.js';
import type { ClientAddress } from '../net/ip.js';

export const STAGES = ['connect', 'helo', 'auth', 'mail', 'rcpt', 'data_headers', 'data_end', 'quit', 'etrn'] as const;
export type Stage = (typeof STAGES)[number];

export interface SessionSnapshot {
  /** Session id, also in the log line. */
  readonly id: string;
  /** The real client (after PROXY protocol). */
  readonly client: ClientAddress;
  readonly clientPort: number;
  /**
   * Listener name and role: an SMTP role (doorman speaks SMTP to the client), or the front an MTA
   * calls (`policy`, `milter`: the MTA speaks SMTP; the session's facts are the MTA's).
   */
  readonly listener: { readonly name: string; readonly role: 'smtp' | 'submission' | 'smtps' | 'policy' | 'milter' };
  /** doorman's own address the client reached. */
  readonly localAddress: string;
  readonly tls: boolean;
  /** HELO/EHLO argument, once given. */
  readonly helo: string | null;
  readonly esmtp: boolean;
  /** Set after the backend answered 235 to AUTH. */
  readonly auth: { readonly mechanism: string; readonly login: string | null } | null;
  /**
   * The transaction's number in this session: 1 from the first MAIL, one more at each MAIL (0
   * before). State a rule keeps per transaction is keyed on it, never on the stages it hears.
   */
  readonly transaction: number;
  /** Current transaction (null outside one). */
  readonly sender: ParsedPath | null;
  /** Recipients the backend accepted. */
  readonly recipients: readonly ParsedPath[];
  /**
   * Recipients of this transaction the rules let through: accepted by the backend, or still
   * waiting for its answer (pipelined). At least `recipients.length`.
   */
  readonly recipientsForwarded: number;
  /**
   * The rule whose `accept` finding allowlisted the session (at connect or HELO: for the session)
   * or this transaction (at MAIL: until its end, RSET or the next MAIL), if any.
   */
  readonly acceptedBy: string | null;
  /**
   * Authentication results of the current transaction so far (spf at MAIL, …), in the order the
   * rules gave them; empty outside a transaction (cleared at each MAIL). A later rule reads an
   * earlier rule's result here without importing it.
   */
  readonly authResults: readonly AuthResult[];
  /** Aborted when the session ends: work that outlives its event (a late store reply) checks it. */
  readonly ended: AbortSignal;
}

interface Base {
  readonly session: SessionSnapshot;
}

export type SessionEvent =
  | (Base & { readonly stage: 'connect' })
  | (Base & { readonly stage: 'helo'; readonly verb: 'HELO' | 'EHLO'; readonly name: string })
  | (Base & { readonly stage: 'auth'; readonly mechanism: string; readonly login: string | null })
  | (Base & { readonly stage: 'mail'; readonly sender: ParsedPath; readonly params: readonly MailParam[] })
  | (Base & { readonly stage: 'rcpt'; readonly recipient: ParsedPath; readonly params: readonly MailParam[] })
  | (Base & { readonly stage: 'data_headers'; readonly headers: Buffer; readonly truncated: boolean })
  | (Base & { readonly stage: 'data_end'; readonly size: number })
  /** The session ended (QUIT, timeout, disconnect…): its last snapshot for the rules' end hooks (`Rule.end`); no rule checks it. */
  | (Base & { readonly stage: 'quit'; readonly reason: string })
  /** ETRN (RFC 1985): the client asks for the queue of `node` (a domain, `@domain` or `#queue`). */
  | (Base & { readonly stage: 'etrn'; readonly node: string });

export type EventOf<S extends Stage> = Extract<SessionEvent, { stage: S }>;

/**
 * What every session's `ended` signal is aborted with: one Error, made once — `abort()` without a
 * reason builds a DOMException, with its stack, for each session.
 */
export const SESSION_ENDED: Error = new Error('session ended');

const ID_PREFIX = `${process.pid.toString(36)}${Date.now().toString(36)}`;
let idCounter = 0;
/** A session id (SessionSnapshot.id) unique per process and start time, for every front; no randomness on the hot path. */
export function nextSessionId(): string {
  idCounter = (idCounter + 1) % 2_176_782_336; // 36^6
  return `${ID_PREFIX}${idCounter.toString(36).padStart(6, '0')}`;
}
