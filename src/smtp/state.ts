/**
 * state.ts — what a session knows, in one object its parts share.
 *
 * The client (after PROXY), the listener, TLS, the HELO/EHLO name, the login, the current
 * transaction and its number, the allowlisting, the session's tags, why the session ends and the
 * capabilities the backend offered: the session's parts (envelope.ts, inbound.ts, stages.ts…)
 * read and change these here instead of through a host per part. `snapshot()` is what rules see
 * of it (pipeline/events.ts).
 */
import type tls from 'node:tls';
import type { Logger } from 'pino';
import type { BackendOptions, Capabilities } from '../backend/connection.js';
import type { BackendPool } from '../backend/pool.js';
import type { ProxiedAddress } from '../backend/proxy-protocol.js';
import type { Limits } from '../config/schema.js';
import type { RuleSet } from '../config/rules.js';
import type { Metrics } from '../metrics/registry.js';
import type { Recording } from '../record/recorder.js';
import { parseAddress, type ClientAddress } from '../net/ip.js';
import { nextSessionId, type SessionSnapshot } from '../pipeline/events.js';
import type { Transaction } from './transaction.js';

export interface ListenerRuntime {
  readonly name: string;
  readonly role: 'smtp' | 'submission' | 'smtps';
  readonly authPlaintext: boolean;
  /** For STARTTLS; null when no certificate is configured (STARTTLS not offered). */
  readonly secureContext: tls.SecureContext | null;
}

export interface SessionDeps {
  readonly hostname: string;
  readonly limits: Limits;
  readonly listener: ListenerRuntime;
  readonly backend: BackendOptions;
  readonly pool: BackendPool;
  readonly rules: RuleSet;
  readonly metrics: Metrics;
  readonly log: Logger;
  /** Session records (record.dir): each session asks whether it is recorded. */
  readonly recording?: Recording | null;
}

export class SessionState {
  /** Unique per process and start time (no per-session randomness on the hot path). */
  readonly id = nextSessionId();
  readonly started = Date.now();
  readonly client: ClientAddress;
  tls: boolean;
  helo: string | null = null;
  esmtp = false;
  auth: { mechanism: string; login: string | null } | null = null;
  /** The current transaction (MAIL to its end of data or RSET); null outside one. */
  txn: Transaction | null = null;
  /** MAIL commands evaluated so far: the current transaction's number (SessionSnapshot.transaction). */
  txnNumber = 0;
  /** Allowlisted for the session (an accept at connect or HELO); a MAIL accept is the transaction's. */
  acceptedBy: string | null = null;
  /** Tags for the whole session (connect and HELO rules); a transaction keeps its own. */
  readonly tags: string[] = [];
  refusedAtConnect = false;
  /** Why the session ends, for the log line ('closed' until something says otherwise). */
  endReason = 'closed';
  /** What the backend offered on this session's connection (after HELO/EHLO). */
  caps: Capabilities = new Map();
  /** Aborted when the session ends (SessionSnapshot.ended). */
  readonly ended = new AbortController();

  constructor(
    readonly peer: ProxiedAddress,
    readonly listener: ListenerRuntime,
    tls: boolean,
  ) {
    this.client = parseAddress(peer.address);
    this.tls = tls;
  }

  /** The backend refused the client's HELO/EHLO, or STARTTLS started over: no HELO yet. */
  forgetHelo(): void {
    this.helo = null;
    this.esmtp = false;
  }

  snapshot(): SessionSnapshot {
    const txn = this.txn;
    return {
      id: this.id,
      client: this.client,
      clientPort: this.peer.port,
      listener: { name: this.listener.name, role: this.listener.role },
      localAddress: this.peer.destAddress,
      tls: this.tls,
      helo: this.helo,
      esmtp: this.esmtp,
      auth: this.auth,
      transaction: this.txnNumber,
      sender: txn?.sender ?? null,
      recipients: txn ? [...txn.rcpts] : [],
      recipientsForwarded: txn?.rcptForwarded ?? 0,
      acceptedBy: this.acceptedBy ?? txn?.acceptedBy ?? null,
      authResults: txn ? [...txn.authResults] : [],
      ended: this.ended.signal,
    };
  }
}
