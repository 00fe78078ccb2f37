/**
 * backend-link.ts — one session's link to the backend: which connection it uses, and why not.
 *
 * Takes a connection when the session first needs one (the client's HELO/EHLO): the pool's
 * candidates in MX order, an idle or spare connection re-bound to this client (`pool.acquire`)
 * or a new one, within backend.maxConnections; a backend that refuses, times out or answers 421
 * is marked down and the next one is tried. It binds the client (XCLIENT and its HELO/EHLO) in
 * the background (`bind`); the next command that needs the backend waits for that answer
 * (`ensure`), which also reopens and re-binds a connection lost between transactions. Sends a
 * deferred MAIL with the first RCPT. Every failure becomes a reply for the client (4xx, never a
 * 5xx for doorman's own trouble); a clean connection goes back to the pool at the end (`release`).
 */
import type { Logger } from 'pino';
import { BackendConnection, BackendError, type BackendOptions, type ClientIdentity } from '../backend/connection.js';
import { BackendBusyError, type BackendPool, type BackendTarget } from '../backend/pool.js';
import type { Metrics } from '../metrics/registry.js';
import { formatMailRcpt, type MailParam } from '../protocol/params.js';
import type { ParsedPath } from '../protocol/address.js';
import { R, replyClass, type Reply } from '../protocol/reply.js';

export interface LinkDeps {
  readonly hostname: string;
  readonly backend: BackendOptions;
  readonly pool: BackendPool;
  readonly metrics: Metrics;
  readonly log: Logger;
}

/** What the link needs of its session. */
export interface LinkHost {
  readonly sessionId: string;
  isClosed(): boolean;
  /** The client's HELO/EHLO as the backend must get it again on a new connection; null before one. */
  hello(): { verb: 'EHLO' | 'HELO'; name: string } | null;
  /** The client authenticated: a lost connection cannot be replayed, and none is pooled. */
  authenticated(): boolean;
  /** The backend connection closed (perhaps in the middle of a message). */
  onClosed(): void;
  /** A backend failure during a command ends the session. */
  onFailed(): void;
}

/** No backend for the command: the client's reply, and what it means for the session. */
export interface LinkRefusal {
  reply: Reply;
  /** The session ends with this outcome. */
  endReason?: string;
  /** The backend refused the client's HELO/EHLO: the client has to send it again. */
  forgetHelo?: true;
}

/** A transaction whose MAIL waits for its first RCPT (backend.deferMail). */
export interface DeferredMail {
  readonly sender: ParsedPath;
  readonly params: readonly MailParam[];
  readonly log: { mail: number };
  mailRefused: Reply | null;
}

export class BackendLink {
  /** The connection this session uses (null before the client's HELO/EHLO). */
  conn: BackendConnection | null = null;
  /** The backend this session uses (log line). */
  name: string | null = null;
  private target: BackendTarget | null = null;
  /** The backend's answer to binding this client (XCLIENT/EHLO), sent when the client said HELO/EHLO. */
  private binding: Promise<Reply | 'lost' | null> | null = null;

  constructor(
    private readonly deps: LinkDeps,
    private readonly client: ClientIdentity,
    private readonly host: LinkHost,
  ) {}

  private identity(): ClientIdentity {
    return { ...this.client };
  }

  /**
   * Takes a backend connection: the pool's candidates in MX order; a backend that refuses, times
   * out or answers 421 is marked down and the next one is tried. Backends at maxConnections are
   * skipped; when none had room, waits up to acquireTimeout for one to free up, then throws
   * BackendBusyError. Otherwise throws the last failure.
   */
  private async open(): Promise<BackendConnection> {
    const m = this.deps.metrics;
    const pool = this.deps.pool;
    const host = this.host;
    let last: unknown = null;
    const identity = this.identity();
    const started = Date.now();
    for (;;) {
      let full = false;
      for (const t of await pool.candidates()) {
        if (host.isClosed()) break;
        const t0 = Date.now();
        try {
          // A pooled connection is bound to this client at its HELO/EHLO (bind).
          const got = await pool.acquire(t, () => BackendConnection.open({ ...this.deps.backend, host: t.host, port: t.port }, identity));
          if (got === 'full') {
            full = true;
            continue;
          }
          const b = got.conn;
          if (got.reused) m.backendReused.inc({ backend: t.name });
          else m.backendConnectDuration.observe({ backend: t.name }, b.connectMs / 1000);
          if (host.isClosed()) {
            this.release(b, t);
            break;
          }
          pool.succeeded(t);
          m.backendSessions.inc({ backend: t.name });
          b.onReply = (command, r, ms) => {
            m.backendReplies.inc({ command, class: `${replyClass(r)}xx` });
            m.backendReplyDuration.observe({ command }, ms / 1000);
          };
          b.on('close', () => host.onClosed());
          this.name = t.name;
          this.target = t;
          return b;
        } catch (err) {
          const kind = err instanceof BackendError ? err.kind : 'connect';
          m.backendFailures.inc({ backend: t.name, kind });
          this.deps.log.warn({ session: host.sessionId, backend: t.name, err: (err as Error).message, kind, ms: Date.now() - t0 }, 'backend unavailable');
          pool.failed(t, `${kind}: ${(err as Error).message}`);
          last = err;
        }
      }
      if (!full || host.isClosed()) break;
      const waited = Date.now() - started;
      if (!(await pool.waitForRoom(pool.limits.acquireTimeout - waited))) {
        m.backendBusy.inc();
        this.deps.log.warn({ session: host.sessionId, ms: Date.now() - started }, 'every backend connection in use');
        throw new BackendBusyError(Date.now() - started);
      }
    }
    throw last ?? new BackendError('connect', host.isClosed() ? 'client left' : 'no backend configured');
  }

  /** Sends the client's identity and HELO/EHLO to the backend without waiting for the answer. */
  bind(b: BackendConnection, verb: 'EHLO' | 'HELO', name: string): void {
    this.binding = b.bind(this.identity(), { verb, name }).catch((e: unknown) => {
      const kind = e instanceof BackendError ? e.kind : 'protocol';
      this.deps.metrics.backendFailures.inc({ backend: this.name ?? '', kind });
      this.deps.log.warn({ session: this.host.sessionId, err: (e as Error).message, kind }, 'backend refused the client binding');
      b.destroy();
      return 'lost' as const;
    });
  }

  /**
   * A backend for the next command: the one the client's HELO/EHLO was bound to (its refusal of
   * that HELO/EHLO is the answer to this command), or one reopened and bound again if it was lost.
   */
  async ensure(): Promise<BackendConnection | LinkRefusal> {
    const hostname = this.deps.hostname;
    if (this.binding) {
      const bound = await this.binding;
      this.binding = null;
      if (bound !== null && bound !== 'lost') {
        // The backend refused the HELO/EHLO that doorman answered for it: say so now, and forget
        // the HELO so that the client has to send it again.
        return { reply: bound, forgetHelo: true };
      }
    }
    if (this.conn?.alive) return this.conn;
    if (!this.conn) {
      // The session's first backend connection (at its HELO/EHLO).
      try {
        this.conn = await this.open();
        return this.conn;
      } catch (err) {
        // No backend for this session: 421 and the session ends. A backend that refused doorman
        // at its greeting (even with 5xx) is doorman's problem, not the client's: 4xx too.
        if (err instanceof BackendBusyError) return { reply: R.overloaded(hostname), endReason: 'backend-busy' };
        return { reply: R.unavailable(hostname), endReason: 'backend-unavailable' };
      }
    }
    if (this.host.authenticated()) return { reply: R.lostBackend(hostname) }; // the login cannot be replayed
    try {
      const b = await this.open();
      this.conn = b;
      const hello = this.host.hello();
      if (hello) {
        const r = await b.bind(this.identity(), hello);
        if (r) return { reply: R.lostBackend(hostname) };
      }
      return b;
    } catch (err) {
      if (err instanceof BackendBusyError) return { reply: R.overloaded(hostname) };
      return { reply: R.lostBackend(hostname) };
    }
  }

  /** A deferred MAIL goes to the backend (with the RCPT that follows it in the same write). */
  sendDeferredMail(b: BackendConnection, txn: DeferredMail): Promise<Reply> {
    return b.command(formatMailRcpt('MAIL FROM', txn.sender, txn.params)).then(
      (x) => {
        txn.log.mail = x.code;
        if (replyClass(x) !== 2) txn.mailRefused = x;
        return x;
      },
      (e: unknown) => (txn.mailRefused = this.failed(e)),
    );
  }

  /** Hands a backend connection whose state is known to be clean to the pool, or closes it. */
  release(b: BackendConnection, t = this.target): void {
    if (t && !this.host.authenticated() && b.reusable && this.deps.pool.idleOptions.max > 0) this.deps.pool.putIdle(t, b);
    else b.quit();
  }

  /** A backend failure during a command: the client gets 421 and the session ends. */
  failed(e: unknown): Reply {
    const kind = e instanceof BackendError ? e.kind : 'protocol';
    this.deps.metrics.backendFailures.inc({ backend: this.name ?? '', kind });
    this.deps.log.warn({ session: this.host.sessionId, err: (e as Error).message, kind }, 'backend failed');
    this.host.onFailed();
    return R.lostBackend(this.deps.hostname);
  }

  /** A backend failure at the end of data: the message is tempfailed. */
  failedAtEndOfData(e: unknown): Reply {
    const kind = e instanceof BackendError ? e.kind : 'protocol';
    this.deps.metrics.backendFailures.inc({ backend: this.name ?? '', kind });
    this.deps.log.warn({ session: this.host.sessionId, err: (e as Error).message }, 'backend failed at end of data');
    return R.backendTempfail();
  }
}
