/**
 * format.ts — one session record, the line format of the record files (JSON Lines, version 1;
 * docs/operations.md "Session records").
 *
 * A line: `v` (format version), `time` (session start, ISO 8601), `id` (the session id of the log
 * line), `front` (smtp, policy, milter); `session`: what the rules saw — the shape `runOffline`
 * takes (SessionInput, fronts/offline.ts), so `doorman replay` feeds it as it is; `verdicts`: each
 * stage's verdict given (which transaction and recipient it answered, the reply, the deciding
 * rule); `dns`: the answers of the DNS lookups the rules made (type, name → answer or error code);
 * `store`: the store operations the rules made (key → what the store returned). Never the body.
 * `RECORD_SCHEMA` reads a line back (replay), rejecting what is not one.
 */
import { z } from 'zod';

export const RECORD_VERSION = 1;

/** One DNS lookup a rule made: `answer` as dns.promises.resolve gives it, or the error's code. */
export interface DnsRecord {
  readonly type: string;
  /** The query name (PTR: the address asked about). */
  readonly name: string;
  readonly answer?: unknown;
  /** TTLs of A/AAAA answers, seconds, in answer order. */
  readonly ttls?: number[];
  readonly error?: string;
}

/** One store operation a rule made: its arguments after the key, and what it returned (or the error). */
export interface StoreRecord {
  readonly op: string;
  readonly key: string;
  readonly args: readonly (string | number)[];
  readonly result?: unknown;
  readonly error?: string;
}

/** One stage's verdict: which transaction (index) and recipient (index in it) it answered. */
export interface VerdictRecord {
  readonly stage: string;
  readonly txn?: number;
  readonly rcpt?: number;
  /** null: the stage let the command through. */
  readonly reply: { readonly code: number; readonly enhanced: string; readonly text: string } | null;
  readonly decidedBy: string | null;
  readonly acceptedBy?: string;
}

export interface TransactionRecord {
  /** The reverse-path without <> ('' for the null sender). */
  from: string;
  /** MAIL parameters (SIZE, BODY…); '' for a parameter without a value (SMTPUTF8). */
  fromParams?: Record<string, string>;
  rcpts: { to: string; params?: Record<string, string> }[];
  /** The header block (record.headers: true), its bytes as latin1 characters (runOffline reads it so). */
  headers?: string;
  /** The message reached its end of data (its size in bytes): data_end was evaluated. */
  size?: number;
}

/** The session as the rules saw it: the shape runOffline takes (SessionInput). */
export interface SessionRecordInput {
  /** IP address text. */
  client: string;
  clientPort?: number;
  /** Listener name from the configuration (e.g. 'smtp@0.0.0.0:25', or a named one), or a role: its first listener. */
  listener: string;
  localAddress?: string;
  tls: boolean;
  /** AUTH login, null when none. */
  login: string | null;
  authMechanism?: string;
  helo: string | null;
  esmtp: boolean;
  transactions: TransactionRecord[];
}

export interface SessionRecord {
  v: number;
  time: string;
  id: string;
  front: string;
  /** The listener's role (smtp, submission, smtps, policy, milter): replay knows the listener without the configuration. */
  role: string;
  session: SessionRecordInput;
  verdicts: VerdictRecord[];
  dns: DnsRecord[];
  store: StoreRecord[];
  /** Entries left off past the bounds (MAX_RECORD_*), counted. */
  more?: { transactions?: number; rcpts?: number; verdicts?: number; dns?: number; store?: number };
}

const params = z.record(z.string(), z.string());
const reply = z.object({ code: z.number().int(), enhanced: z.string(), text: z.string() });

export const RECORD_SCHEMA = z.object({
  v: z.literal(RECORD_VERSION),
  time: z.string(),
  id: z.string(),
  front: z.string(),
  role: z.enum(['smtp', 'submission', 'smtps', 'policy', 'milter']),
  session: z.object({
    client: z.string(),
    clientPort: z.number().int().optional(),
    listener: z.string(),
    localAddress: z.string().optional(),
    tls: z.boolean(),
    login: z.string().nullable(),
    authMechanism: z.string().optional(),
    helo: z.string().nullable(),
    esmtp: z.boolean(),
    transactions: z.array(
      z.object({
        from: z.string(),
        fromParams: params.optional(),
        rcpts: z.array(z.object({ to: z.string(), params: params.optional() })),
        headers: z.string().optional(),
        size: z.number().int().nonnegative().optional(),
      }),
    ),
  }),
  verdicts: z.array(
    z.object({
      stage: z.string(),
      txn: z.number().int().nonnegative().optional(),
      rcpt: z.number().int().nonnegative().optional(),
      reply: reply.nullable(),
      decidedBy: z.string().nullable(),
      acceptedBy: z.string().optional(),
    }),
  ),
  dns: z.array(z.object({ type: z.string(), name: z.string(), answer: z.unknown().optional(), ttls: z.array(z.number()).optional(), error: z.string().optional() })),
  store: z.array(z.object({ op: z.string(), key: z.string(), args: z.array(z.union([z.string(), z.number()])), result: z.unknown().optional(), error: z.string().optional() })),
  more: z.record(z.string(), z.number()).optional(),
});
