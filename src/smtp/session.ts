/**
 * session.ts — one client session: the SMTP state machine between a client and the backend.
 *
 * Order of work for a session:
 *   1. connect-stage rules; a refusal costs the backend nothing (no connection is opened);
 *   2. doorman's own greeting; no backend connection yet: a client that connects and says
 *      nothing (or only what doorman answers itself) costs the backend nothing. Its HELO/EHLO
 *      takes one from the pool (a prepared spare or one an earlier session left clean, re-bound
 *      with XCLIENT; else a new one: greeting, EHLO, STARTTLS), within backend.maxConnections;
 *   3. commands: one guard prelude (limits, bare CR/LF, non-SMTP) then a typed handler table.
 *      MAIL, RCPT, RSET and NOOP are pipelined: their replies are queued in order and written
 *      together when the client's group is read; the backend gets them without waiting.
 *   4. DATA streams chunk by chunk to the backend with back-pressure; the final "." is sent only
 *      after the size, line and bare-newline checks and the data_end rules passed. Otherwise
 *      the backend connection is dropped (the backend never sees an end of data) and reopened
 *      for the next transaction.
 * The client gets 250 for a message only when the backend said 250 for it; any backend failure
 * becomes a 4xx. Replies are written only by `send` / `flush`; all formatting is in protocol/reply.ts.
 */
import { Subject } from 'rxjs';
import type net from 'node:net';
import tls from 'node:tls';
import type { Logger } from 'pino';
import { BackendConnection, BackendError, type BackendOptions, type Capabilities } from '../backend/connection.js';
import { BackendBusyError, type BackendPool, type BackendTarget } from '../backend/pool.js';
import type { ProxiedAddress } from '../backend/proxy-protocol.js';
import type { Limits } from '../config/schema.js';
import type { RuleSet } from '../config/rules.js';
import type { Metrics } from '../metrics/registry.js';
import { parseAddress, type ClientAddress } from '../net/ip.js';
import type { SessionEvent, SessionSnapshot, Stage } from '../pipeline/events.js';
import { openPipeline, type PipelineSession } from '../pipeline/run.js';
import { EMPTY_VERDICT, type RuleOutcome, type StageVerdict } from '../pipeline/verdict.js';
import { addressOf, type ParsedPath } from '../protocol/address.js';
import { formatMailRcpt, parseMailRcpt, type MailParam } from '../protocol/params.js';
import { heloArgument, KNOWN_VERBS, NON_SMTP_VERBS, NOT_IMPLEMENTED_VERBS, parseCommand, type Command } from './commands.js';
import { Framing, Unstuffer, type CommandEvent } from './framing.js';
import { describeReply, formatReply, R, reply, replyClass, type Reply } from '../protocol/reply.js';

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
}

interface Transaction {
  sender: ParsedPath;
  params: readonly MailParam[];
  smtputf8: boolean;
  /** Recipients the backend accepted. */
  rcpts: ParsedPath[];
  /** RCPT commands forwarded (accepted or pending). */
  rcptForwarded: number;
  /** RCPT commands tried (any outcome). */
  rcptTried: number;
  /** The backend's answer to MAIL; null while a deferred MAIL waits for the first RCPT (backend.deferMail). */
  mail: Promise<Reply> | null;
  /** The backend refused the deferred MAIL (or was lost): the answer to every RCPT of this transaction. */
  mailRefused: Reply | null;
  tags: string[];
  log: TxnLog;
  /** The rule whose `accept` at MAIL allowlisted this transaction (and no other). */
  acceptedBy?: string;
}

/** One MAIL attempt in the session log: sender, each recipient's reply, and the message's fate. */
interface TxnLog {
  from: string;
  /** Reply code to MAIL. */
  mail: number;
  rcpts: { to: string; code: number }[];
  /** Recipients past MAX_LOGGED_RCPTS, counted only. */
  moreRcpts?: number;
  size?: number;
  outcome?: 'accepted' | 'rejected' | 'tempfailed';
  reply?: string;
  queueId?: string;
  rule?: string;
}

/** Bounds on one session's log line. */
const MAX_LOGGED_TXNS = 50;
const MAX_LOGGED_RCPTS = 100;
/** Rule findings (other than pass) kept for the session log line; the rest are counted (moreRules). */
const MAX_LOGGED_OUTCOMES = 100;
/** Distinct tags kept per session and per transaction (each becomes an X-Doorman-Tag header); the rest are counted (moreTags). */
const MAX_TAGS = 10;
/** X-Doorman-Tag headers added to one message, at most. */
const MAX_TAG_HEADERS = 20;
/** Longest tag text in a header, octets. */
const MAX_TAG_OCTETS = 900;
/**
 * Octets doorman may add to a message (its X-Doorman-Tag headers): the advertised SIZE is the
 * backend's less this, so a message that fits doorman's SIZE still fits the backend's with them.
 */
const TAG_HEADROOM = MAX_TAG_HEADERS * ('X-Doorman-Tag: '.length + MAX_TAG_OCTETS + 2);

/**
 * Junk commands (Postfix smtpd_junk_command_limit: NOOP, VRFY, ETRN, RSET; here also the other
 * commands answered without a transaction: HELO, EHLO, HELP, EXPN): limits.maxJunkCommands of them
 * between delivered messages, then 421 4.7.0.
 */
const JUNK_VERBS = new Set(['NOOP', 'VRFY', 'ETRN', 'RSET', 'HELO', 'EHLO', 'HELP', 'EXPN']);

type Pending = Reply | Promise<Reply>;

/** Verbs whose replies may be queued (RFC 2920 §3.1: may appear anywhere in a group). */
const PIPELINABLE = new Set(['MAIL', 'RCPT', 'RSET', 'NOOP']);
/** Keep at most this many unanswered pipelined commands before writing replies. */
const MAX_QUEUED_REPLIES = 100;
/** EHLO keywords doorman passes through when the backend offers them. */
const PASSTHROUGH_CAPS = ['PIPELINING', '8BITMIME', 'SMTPUTF8', 'ENHANCEDSTATUSCODES', 'DSN', 'ETRN'];

export class Session {
  /** Unique per process and start time (no per-session randomness on the hot path). */
  readonly id = nextSessionId();
  readonly started = Date.now();
  private socket: net.Socket;
  private readonly framing: Framing;
  private backend: BackendConnection | null = null;
  private readonly client: ClientAddress;
  private tls: boolean;
  private helo: string | null = null;
  private esmtp = false;
  private auth: { mechanism: string; login: string | null } | null = null;
  private txn: Transaction | null = null;
  /** MAIL commands evaluated so far: the current transaction's number (SessionSnapshot.transaction). */
  private txnNumber = 0;
  /** Allowlisted for the session (an accept at connect or HELO); a MAIL accept is the transaction's. */
  private acceptedBy: string | null = null;
  /** Aborted when the session ends (SessionSnapshot.ended). */
  private readonly ended = new AbortController();
  private sessionTags: string[] = [];
  private refusedAtConnect = false;
  private outq: Pending[] = [];
  private pumping = false;
  private repump = false;
  /** Bytes received before the greeting (pregreet), and what they looked like. */
  private pregreet = 0;
  private pregreetKind = '';
  /** When the current incomplete command line started arriving (0: none). */
  private partialSince = 0;
  private authFailures = 0;
  /** When the current DATA started (min data rate). */
  private dataStarted = 0;
  /** Greeting sent: commands may be read. */
  private greeted = false;
  /** A closing reply was written; the socket ends once it is flushed. */
  private closing = false;
  private closed = false;
  private dataWaiter: (() => void) | null = null;
  private errors = 0;
  private unknown = 0;
  private commands = 0;
  /** Junk commands since the session started or last delivered a message. */
  private junk = 0;
  /** The client does not read its replies: no command is executed until they drain. */
  private clientCongested = false;
  /** The client half-closed: what it sent is still executed and answered, then the session ends. */
  private clientEnded = false;
  private caps: Capabilities = new Map();
  private readonly outcomes: RuleOutcome[] = [];
  private droppedOutcomes = 0;
  private readonly txnLogs: TxnLog[] = [];
  private droppedTxnLogs = 0;
  private droppedTags = 0;
  private endReason = 'closed';
  private data: DataState | null = null;
  private backendCongested = false;
  /** Resolves when the session has ended. */
  readonly done: Promise<void>;
  /** The session as a stream of typed events; completes when the session ends. */
  readonly events$ = new Subject<SessionEvent>();
  /** The rule pipeline following events$: each event's verdict (pipeline/run.ts). */
  private readonly pipe: PipelineSession;
  private resolveDone!: () => void;

  constructor(
    socket: net.Socket,
    private readonly peer: ProxiedAddress,
    private readonly deps: SessionDeps,
    opts: { tls: boolean; initial?: Buffer },
  ) {
    this.socket = socket;
    this.tls = opts.tls;
    this.client = parseAddress(peer.address);
    const l = deps.limits;
    this.framing = new Framing({
      maxCommandLine: l.maxCommandLine,
      extensionAllowance: l.extensionAllowance,
      maxAuthLine: l.maxAuthLine,
      maxDataLine: l.maxDataLine,
      bareNewline: l.bareNewline,
    });
    this.done = new Promise((r) => (this.resolveDone = r));
    this.pipe = openPipeline(deps.rules.rules, {
      metrics: deps.metrics,
      onRuleError: (rule, kind, err) => deps.log.warn({ session: this.id, rule, kind, err: err instanceof Error ? err.message : String(err) }, 'rule failed'),
      late: (o) => this.lateOutcome(o),
      maxPendingDryRun: l.maxPendingDryRun,
      unstuff: () => {
        const u = new Unstuffer();
        return (chunks) => u.push(chunks);
      },
    }).attach(this.events$, this.ended.signal);
    // Bytes that came with a PROXY header, before the greeting: pregreet like any other.
    if (opts.initial?.length) this.onData(opts.initial);
    this.attach(socket);
  }

  // ---------------------------------------------------------------- lifecycle

  async start(): Promise<void> {
    const connect = await this.runRules('connect', () => ({ stage: 'connect', session: this.snapshot() }));
    if (this.closed) return;
    if (connect.reply) {
      if (connect.reply.code >= 500) {
        // RFC 5321 §3.1: 554 instead of 220, then wait for QUIT and answer 503 meanwhile.
        this.refusedAtConnect = true;
        this.endReason = 'refused';
        this.greeted = true;
        this.send(connect.reply);
        this.pump();
        return;
      }
      this.endReason = 'refused';
      this.send(connect.reply.closes ? connect.reply : R.unavailable(this.deps.hostname));
      return;
    }
    // postscreen-style teaser: "220-" now, the rest after greetDelay; early talkers are caught.
    const teaser = this.deps.limits.greetDelay > 0;
    if (teaser) this.socket.write(`220-${this.deps.hostname} ESMTP\r\n`);
    const teaserWait = teaser ? new Promise((r) => setTimeout(r, this.deps.limits.greetDelay)) : Promise.resolve();
    await teaserWait;
    if (this.closed) return;
    if (this.pregreet > 0) {
      // A client that talks before the greeting is not an MTA waiting its turn (postscreen pregreet).
      const kind = this.pregreetKind;
      this.violation('pregreet');
      this.deps.log.info({ session: this.id, client: this.client.text, bytes: this.pregreet, kind }, 'client talked before the greeting');
      if (this.deps.limits.pregreetAction === 'drop') {
        this.endReason = 'pregreet';
        this.greeted = true;
        this.send(R.protocolError());
        return;
      }
    }
    this.greeted = true;
    this.send(teaser ? reply(220, '', `${this.deps.hostname} ESMTP`) : R.greeting(this.deps.hostname));
    this.pump();
  }

  /** SIGTERM deadline: tell the client and close. */
  shutdown(): void {
    if (this.closed) return;
    this.endReason = 'shutdown';
    this.send(R.shuttingDown(this.deps.hostname));
  }

  /**
   * Takes a backend connection: the pool's candidates in MX order; a backend that refuses, times
   * out or answers 421 is marked down and the next one is tried. Backends at maxConnections are
   * skipped; when none had room, waits up to acquireTimeout for one to free up, then throws
   * BackendBusyError. Otherwise throws the last failure.
   */
  private async openBackend(): Promise<BackendConnection> {
    const m = this.deps.metrics;
    const pool = this.deps.pool;
    let last: unknown = null;
    const identity = this.identity();
    const started = Date.now();
    for (;;) {
      let full = false;
      for (const t of await pool.candidates()) {
        if (this.closed) break;
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
          if (this.closed) {
            this.release(b, t);
            break;
          }
          pool.succeeded(t);
          m.backendSessions.inc({ backend: t.name });
          b.onReply = (command, r, ms) => {
            m.backendReplies.inc({ command, class: `${replyClass(r)}xx` });
            m.backendReplyDuration.observe({ command }, ms / 1000);
          };
          b.on('close', () => this.onBackendClosed());
          this.backendName = t.name;
          this.backendTarget = t;
          return b;
        } catch (err) {
          const kind = err instanceof BackendError ? err.kind : 'connect';
          m.backendFailures.inc({ backend: t.name, kind });
          this.deps.log.warn({ session: this.id, backend: t.name, err: (err as Error).message, kind, ms: Date.now() - t0 }, 'backend unavailable');
          pool.failed(t, `${kind}: ${(err as Error).message}`);
          last = err;
        }
      }
      if (!full || this.closed) break;
      const waited = Date.now() - started;
      if (!(await pool.waitForRoom(pool.limits.acquireTimeout - waited))) {
        m.backendBusy.inc();
        this.deps.log.warn({ session: this.id, ms: Date.now() - started }, 'every backend connection in use');
        throw new BackendBusyError(Date.now() - started);
      }
    }
    throw last ?? new BackendError('connect', this.closed ? 'client left' : 'no backend configured');
  }

  /** The backend this session uses (log line). */
  private backendName: string | null = null;
  private backendTarget: BackendTarget | null = null;

  /** The backend's answer to binding this client (XCLIENT/EHLO), sent when the client said HELO/EHLO. */
  private binding: Promise<Reply | 'lost' | null> | null = null;

  /** Sends the client's identity and HELO/EHLO to the backend without waiting for the answer. */
  private bind(b: BackendConnection, verb: 'EHLO' | 'HELO', name: string): void {
    this.binding = b.bind(this.identity(), { verb, name }).catch((e: unknown) => {
      const kind = e instanceof BackendError ? e.kind : 'protocol';
      this.deps.metrics.backendFailures.inc({ backend: this.backendName ?? '', kind });
      this.deps.log.warn({ session: this.id, err: (e as Error).message, kind }, 'backend refused the client binding');
      b.destroy();
      return 'lost' as const;
    });
  }

  private identity() {
    return { ...this.peer, address: this.client.text };
  }

  /**
   * A backend for the next command: the one the client's HELO/EHLO was bound to (its refusal of
   * that HELO/EHLO is the answer to this command), or one reopened and bound again if it was lost.
   */
  private async ensureBackend(): Promise<BackendConnection | Reply> {
    if (this.binding) {
      const bound = await this.binding;
      this.binding = null;
      if (bound !== null && bound !== 'lost') {
        // The backend refused the HELO/EHLO that doorman answered for it: say so now, and forget
        // the HELO so that the client has to send it again.
        this.helo = null;
        this.esmtp = false;
        return bound;
      }
    }
    if (this.backend?.alive) return this.backend;
    if (!this.backend) {
      // The session's first backend connection (at its HELO/EHLO).
      try {
        this.backend = await this.openBackend();
        return this.backend;
      } catch (err) {
        // No backend for this session: 421 and the session ends. A backend that refused doorman
        // at its greeting (even with 5xx) is doorman's problem, not the client's: 4xx too.
        if (err instanceof BackendBusyError) {
          this.endReason = 'backend-busy';
          return R.overloaded(this.deps.hostname);
        }
        this.endReason = 'backend-unavailable';
        return R.unavailable(this.deps.hostname);
      }
    }
    if (this.auth) return R.lostBackend(this.deps.hostname); // the login cannot be replayed
    try {
      const b = await this.openBackend();
      this.backend = b;
      if (this.helo) {
        const r = await b.bind(this.identity(), { verb: this.esmtp ? 'EHLO' : 'HELO', name: this.helo });
        if (r) return R.lostBackend(this.deps.hostname);
      }
      return b;
    } catch (err) {
      if (err instanceof BackendBusyError) return R.overloaded(this.deps.hostname);
      return R.lostBackend(this.deps.hostname);
    }
  }

  /** Hands a backend connection whose state is known to be clean to the pool, or closes it. */
  private release(b: BackendConnection, t = this.backendTarget): void {
    if (t && !this.auth && b.reusable && this.deps.pool.idleOptions.max > 0) this.deps.pool.putIdle(t, b);
    else b.quit();
  }

  private onBackendClosed(): void {
    if (this.data && !this.data.aborted) this.data.aborted = 'backend';
    // A closed socket never drains: read the client again (the rest of the message is discarded
    // and answered 451), instead of waiting for it until the data timeout.
    if (this.backendCongested) this.uncongest();
  }

  /** Reads the client again after a back-pressure stop (the backend drained, closed, or refused). */
  private uncongest(): void {
    this.backendCongested = false;
    if (!this.clientCongested) this.socket.resume();
    this.pump();
  }

  /**
   * Output is back-pressure like input: while the client has not read what was written
   * (write() returned false, past the socket's high-water mark), its commands are neither read
   * nor executed. On 'drain' the session goes on; a client that reads nothing within
   * limits.writeTimeout is dropped (it would not read a 421 either).
   */
  private outputCongested(): boolean {
    if (this.clientCongested) return true;
    const s = this.socket;
    if (!s.writableNeedDrain) return false;
    this.clientCongested = true;
    s.pause();
    const timer = setTimeout(() => {
      if (this.closed || this.socket !== s) return;
      this.violation('write_timeout');
      this.deps.log.warn({ session: this.id, client: this.client.text, unread: s.writableLength, ms: this.deps.limits.writeTimeout }, 'client does not read its replies: dropped');
      this.endReason = 'write-timeout';
      this.close('write-timeout');
    }, this.deps.limits.writeTimeout);
    timer.unref();
    s.once('drain', () => {
      clearTimeout(timer);
      this.clientCongested = false;
      if (!this.backendCongested) s.resume();
      this.pump();
    });
    return true;
  }

  private attach(socket: net.Socket): void {
    socket.setNoDelay(true);
    socket.setTimeout(this.deps.limits.commandTimeout);
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('timeout', () => {
      this.endReason = 'timeout';
      this.send(R.timeout(this.deps.hostname));
    });
    socket.on('end', () => this.onEnd());
    socket.on('error', () => this.close('error'));
    socket.on('close', () => this.close('client-closed'));
  }

  /**
   * The client sent FIN (the listener allows half-open sockets): a client that pipelines the
   * final "." and QUIT and then half-closes still gets its 250 and 221 — the backend has the
   * message, so a client that never read the 250 would send it again.
   */
  private onEnd(): void {
    this.clientEnded = true;
    // Gone before the greeting, having said nothing: nothing to answer; pending checks are dropped.
    if (!this.greeted && this.pregreet === 0) return this.close('client-closed');
    const w = this.dataWaiter;
    this.dataWaiter = null;
    w?.();
    this.pump();
  }

  private onData(chunk: Buffer): void {
    if (this.closed || this.closing) return;
    if (!this.greeted) {
      if (this.pregreet === 0) this.pregreetKind = chunk[0] === 0x16 ? 'tls' : /^(GET|POST|HEAD|CONNECT) /.test(chunk.subarray(0, 8).toString('latin1')) ? 'http' : 'smtp';
      this.pregreet += chunk.length;
    } else if (this.partialSince && !this.framing.inData && Date.now() - this.partialSince > this.deps.limits.commandTimeout) {
      // Slowloris: bytes trickle in, but no command completes within the command timeout.
      this.violation('slow_client');
      this.endReason = 'timeout';
      this.send(R.timeout(this.deps.hostname));
      return;
    }
    this.framing.push(chunk);
    if (this.framing.buffered > this.deps.limits.maxBuffered) this.socket.pause();
    const w = this.dataWaiter;
    this.dataWaiter = null;
    w?.();
    this.pump();
  }

  private close(reason: string): void {
    if (this.closed) return;
    this.closed = true;
    if (this.endReason === 'closed') this.endReason = reason;
    const w = this.dataWaiter;
    this.dataWaiter = null;
    w?.();
    if (this.data) {
      // Client vanished mid-DATA: the backend must never see an end of data.
      this.backend?.destroy();
    } else if (this.backend) {
      this.release(this.backend);
    }
    this.socket.destroy();
    // The last snapshot for the rules' end hooks; then the pipeline drops every pending check's
    // wait at once and ends the rules' state (after dry-run checks still running).
    if (this.heard('quit')) this.events$.next({ stage: 'quit', session: this.snapshot(), reason: this.endReason });
    this.ended.abort();
    this.events$.complete();
    this.logSession();
    this.resolveDone();
  }

  // ---------------------------------------------------------------- output

  /** Writes a reply now (after anything queued is flushed by the caller). */
  private send(r: Reply): void {
    if (this.closed || this.closing) return;
    this.account(r);
    this.socket.write(formatReply(r));
    if (r.closes) this.closeAfterWrite();
  }

  /** Ends the socket once written; the session closes when it has finished (or 2 s later). */
  private closeAfterWrite(): void {
    this.closing = true;
    this.outq = [];
    this.socket.end();
    const t = setTimeout(() => this.close(this.endReason), 2000);
    t.unref();
    this.socket.once('finish', () => this.close(this.endReason));
  }

  private account(r: Reply): void {
    if (r.code >= 400) this.errors++;
  }

  /** Waits for every queued reply, in order, and writes them in one go. */
  private async flush(): Promise<void> {
    while (this.outq.length) {
      const batch = this.outq;
      this.outq = [];
      const out: (string | Buffer)[] = [];
      let closes = false;
      for (const p of batch) {
        const r = p instanceof Promise ? await p : p;
        out.push(formatReply(r));
        this.account(r);
        if (r.closes) {
          closes = true;
          break;
        }
      }
      if (this.closed || this.closing) return;
      if (!closes && this.errors > this.deps.limits.maxErrors) {
        out.push(formatReply(R.tooManyErrors(this.deps.hostname)));
        closes = true;
        this.endReason = 'too-many-errors';
      }
      this.socket.write(out.length === 1 ? (out[0] as string | Buffer) : Buffer.concat(out.map((o) => (typeof o === 'string' ? Buffer.from(o, 'utf8') : o))));
      if (closes) return this.closeAfterWrite();
    }
  }

  private queue(verb: string, r: Pending, note?: (r: Reply) => void): void {
    const started = this.commandStarted;
    const counted = (x: Reply): Reply => {
      this.deps.metrics.commands.inc({ verb, class: `${replyClass(x)}xx` });
      this.deps.metrics.commandDuration.observe({ verb }, (performance.now() - started) / 1000);
      note?.(x);
      return x;
    };
    // A reply known now is counted now (no Promise); a backend's reply when it comes.
    this.outq.push(r instanceof Promise ? r.then(counted) : counted(r));
  }

  /** Adds tags not yet in `list`, at most `max`; the rest are counted for the log. */
  private addTags(list: string[], tags: readonly string[], max = MAX_TAGS): void {
    for (const t of tags) {
      if (list.includes(t)) continue;
      if (list.length < max) list.push(t);
      else this.droppedTags++;
    }
  }

  /** Writes the message's X-Doorman-Tag headers (distinct, at most MAX_TAG_HEADERS) to the backend. */
  private writeTags(...lists: (readonly string[])[]): void {
    const tags: string[] = [];
    for (const l of lists) this.addTags(tags, l, MAX_TAG_HEADERS);
    if (!tags.length) return;
    const headers = tagHeaders(tags);
    if (this.data) this.data.added += headers.length;
    this.writeBackend(headers);
  }

  private newTxnLog(from: string): TxnLog {
    const log: TxnLog = { from, mail: 0, rcpts: [] };
    if (this.txnLogs.length < MAX_LOGGED_TXNS) this.txnLogs.push(log);
    else this.droppedTxnLogs++;
    return log;
  }

  // ---------------------------------------------------------------- input loop

  private pump(): void {
    if (this.closed || this.closing || !this.greeted) return;
    if (this.pumping) {
      // Asked while the loop is finishing (e.g. a 'drain' in a nextTick): run again after it.
      this.repump = true;
      return;
    }
    this.pumping = true;
    this.repump = false;
    this.loop()
      .catch((err: unknown) => {
        this.deps.log.error({ session: this.id, err: err instanceof Error ? err.stack : String(err) }, 'session error');
        this.endReason = 'internal-error';
        this.outq = [];
        this.send(reply(421, '4.3.0', `${this.deps.hostname} Error: internal error, closing connection`));
      })
      .finally(() => {
        this.pumping = false;
        if (!this.closed && this.framing.buffered <= this.deps.limits.maxBuffered && !this.backendCongested && !this.clientCongested) this.socket.resume();
        if (this.repump) this.pump();
      });
  }

  private async loop(): Promise<void> {
    while (!this.closed && !this.closing) {
      if (this.framing.inData) {
        if (this.backendCongested) return;
        const ev = this.framing.nextData();
        if (!ev) {
          // Gone mid-DATA: the message is incomplete and never reaches the backend.
          if (this.clientEnded) this.close('client-closed');
          return;
        }
        if (this.tooSlow()) return;
        // The last chunks of a message wait for the final "." when nothing else must run first.
        const tail = ev.end && !this.hasDataEndRules && !this.backendCongested;
        this.forward(ev.chunks, tail);
        // Rules reading the body get the chunks; a reader lagging past its bound holds the client.
        const fed = this.pipe.wantsBody ? this.pipe.body(this.data?.aborted ? [] : ev.chunks, ev.end) : undefined;
        if (fed) await fed;
        if (this.framing.buffered <= this.deps.limits.maxBuffered && !this.backendCongested) this.socket.resume();
        if (ev.end) await this.finishData();
        else if (this.data?.pendingHeaders) await this.maybeRunHeaderRules();
        continue;
      }
      if (this.outputCongested()) return;
      const ev = this.framing.nextCommand();
      if (!ev) {
        if (this.outq.length === 0) {
          if (this.clientEnded) {
            // Every command was answered: end the session once the replies are written.
            if (this.endReason === 'closed') this.endReason = 'client-closed';
            return this.closeAfterWrite();
          }
          if (this.framing.buffered > 0 && !this.partialSince) this.partialSince = Date.now();
          return;
        }
        await this.flush();
        continue;
      }
      this.partialSince = 0;
      this.socket.resume();
      await this.onCommandEvent(ev);
      if (this.outq.length >= MAX_QUEUED_REPLIES) await this.flush();
    }
  }

  /** Next client line inside a handler (SASL exchange); null if the client went away. */
  private async readLine(): Promise<CommandEvent | null> {
    for (;;) {
      if (this.closed) return null;
      const ev = this.framing.nextCommand();
      if (ev) return ev;
      if (this.clientEnded) return null;
      await new Promise<void>((r) => (this.dataWaiter = r));
    }
  }

  // ---------------------------------------------------------------- guards and dispatch

  /** When the command being handled was taken from the input (for doorman_command_duration_seconds). */
  private commandStarted = 0;

  private async onCommandEvent(ev: CommandEvent): Promise<void> {
    this.commands++;
    this.commandStarted = performance.now();
    if (this.commands > this.deps.limits.maxCommands) {
      this.violation('command_flood');
      this.endReason = 'too-many-commands';
      return this.reject('LIMIT', R.tooManyCommands(this.deps.hostname));
    }
    if (ev.type === 'too_long') {
      this.violation('line_too_long');
      return this.reject('TOO_LONG', R.lineTooLong());
    }
    const { line } = ev;
    if (line.includes(0)) {
      this.violation('nul');
      return this.reject('NUL', R.nulInCommand());
    }
    if (ev.bareCr || (ev.bareLf && this.deps.limits.bareNewline === 'reject')) {
      this.violation('bare_lf');
      return this.reject('BARE', R.bareNewlineCommand());
    }
    if (ev.bareLf) this.violation('bare_lf');
    const cmd = parseCommand(line);
    if (this.refusedAtConnect) {
      if (cmd.verb === 'QUIT') return this.quit();
      return this.reject(cmd.verb, reply(503, '5.5.1', 'Error: no valid greeting; send QUIT'));
    }
    if (this.unknown >= this.deps.limits.maxUnknownCommands) {
      this.endReason = 'too-many-errors';
      return this.reject(cmd.verb, R.tooManyErrors(this.deps.hostname));
    }
    if (NON_SMTP_VERBS.has(cmd.verb) || /^[A-Za-z-]+:/.test(cmd.verb)) {
      this.violation('non_smtp');
      this.endReason = 'non-smtp';
      return this.reject('NONSMTP', reply(421, '4.7.0', `${this.deps.hostname} Error: non-SMTP command, closing connection`));
    }
    if (!KNOWN_VERBS.has(cmd.verb)) {
      this.unknown++;
      return this.reject('UNKNOWN', NOT_IMPLEMENTED_VERBS.has(cmd.verb) ? R.notImplemented() : R.unknown());
    }
    if (JUNK_VERBS.has(cmd.verb) && ++this.junk > this.deps.limits.maxJunkCommands) {
      this.violation('command_flood');
      this.endReason = 'too-many-commands';
      return this.reject(cmd.verb, R.tooManyCommands(this.deps.hostname));
    }
    // Without backend PIPELINING every command waits for the previous reply.
    if (!PIPELINABLE.has(cmd.verb) || !this.caps.has('PIPELINING')) await this.flush();
    if (this.closed || this.closing) return;
    const handler = this.handlers[cmd.verb as keyof Session['handlers']];
    await handler(cmd);
  }

  private reject(verb: string, r: Reply): void {
    this.queue(verb, r);
  }

  private violation(kind: string): void {
    this.deps.metrics.protocolViolations.inc({ kind });
  }

  private readonly handlers = {
    HELO: (c: Command) => this.onHelo(c, 'HELO'),
    EHLO: (c: Command) => this.onHelo(c, 'EHLO'),
    MAIL: (c: Command) => this.onMail(c),
    RCPT: (c: Command) => this.onRcpt(c),
    DATA: (c: Command) => this.onData_(c),
    RSET: (c: Command) => this.onRset(c),
    NOOP: (_c: Command) => this.queue('NOOP', R.noop()),
    QUIT: (_c: Command) => this.quit(),
    VRFY: (c: Command) => this.queue('VRFY', c.arg.trim() ? R.vrfy() : R.syntax('VRFY address')),
    EXPN: (_c: Command) => this.queue('EXPN', R.expn()),
    HELP: (_c: Command) => this.queue('HELP', R.help()),
    STARTTLS: (c: Command) => this.onStartTls(c),
    AUTH: (c: Command) => this.onAuth(c),
    ETRN: (c: Command) => this.onEtrn(c),
  } as const;

  // ---------------------------------------------------------------- handlers

  private async onHelo(c: Command, verb: 'HELO' | 'EHLO'): Promise<void> {
    const name = heloArgument(c.arg);
    if (!name) return this.queue(verb, R.syntax(`${verb} hostname`));
    if (/[^\x21-\x7e]/.test(name)) return this.queue(verb, R.badSyntax('invalid characters in hostname'));
    const v = await this.runRules('helo', () => ({ stage: 'helo', session: this.snapshot(), verb, name }));
    if (v.reply) return this.queue(verb, v.reply);
    if (v.acceptedBy) this.acceptedBy = v.acceptedBy;
    this.addTags(this.sessionTags, v.tags);
    const b = await this.ensureBackend();
    if (!(b instanceof BackendConnection)) return this.queue(verb, b);
    // Answered from the capabilities the backend gave doorman on this connection; the backend
    // learns the client's name in the background (XCLIENT HELO=, or its EHLO), and the next
    // command that needs the backend waits for that answer (ensureBackend).
    this.bind(b, verb, name);
    this.helo = name;
    this.esmtp = verb === 'EHLO';
    this.txn = null;
    this.caps = verb === 'EHLO' ? b.offered : new Map();
    if (verb === 'HELO') return this.queue(verb, reply(250, '', this.deps.hostname));
    return this.queue(verb, reply(250, '', [this.deps.hostname, ...this.extensions()]));
  }

  /** The EHLO keywords: what doorman implements ∩ what the backend offers. */
  private extensions(): string[] {
    const ext = PASSTHROUGH_CAPS.filter((k) => this.caps.has(k));
    ext.splice(this.caps.has('PIPELINING') ? 1 : 0, 0, `SIZE ${this.sizeLimit()}`);
    if (this.deps.listener.secureContext && !this.tls) ext.push('STARTTLS');
    const mechs = this.authMechanisms();
    if (mechs && this.authAllowed() && !this.auth) ext.push(`AUTH ${mechs}`);
    return ext;
  }

  /**
   * The SIZE doorman advertises and enforces: its own limit, and the backend's less the room for
   * the headers doorman adds (TAG_HEADROOM; the whole of a backend SIZE too small to spare it).
   */
  private sizeLimit(): number {
    const own = this.deps.limits.maxMessageSize;
    const theirs = this.backendSize();
    if (theirs === null) return own;
    return Math.min(own, theirs > 2 * TAG_HEADROOM ? theirs - TAG_HEADROOM : theirs);
  }

  /** The backend's SIZE (RFC 1870), null when it announces no limit. */
  private backendSize(): number | null {
    const theirs = Number.parseInt(this.caps.get('SIZE') ?? '', 10);
    return Number.isFinite(theirs) && theirs > 0 ? theirs : null;
  }

  /** The client's message is over the advertised SIZE, or with doorman's headers over the backend's. */
  private oversized(d: DataState): boolean {
    const n = this.framing.dataBytes;
    return n > this.sizeLimit() || n + d.added > (this.backendSize() ?? Infinity);
  }

  private authMechanisms(): string | null {
    const m = this.caps.get('AUTH');
    return m ? m.trim() : null;
  }

  private authAllowed(): boolean {
    return this.tls || this.deps.listener.authPlaintext;
  }

  private async onMail(c: Command): Promise<void> {
    if (!this.helo) return this.queue('MAIL', R.needHelo());
    if (this.txn) return this.queue('MAIL', R.nestedMail());
    const p = parseMailRcpt(c.arg, 'FROM');
    if (!p.ok) {
      if (p.code === 'syntax') return this.queue('MAIL', R.syntax('MAIL FROM:<address>'));
      if (p.code === 'param') return this.queue('MAIL', R.badParam(p.reason));
      return this.queue('MAIL', reply(501, '5.1.7', `Bad sender address syntax: ${p.reason}`));
    }
    const log = this.newTxnLog(addressOf(p.path));
    const answer = (r: Pending) => this.queue('MAIL', r, (x) => (log.mail = x.code));
    const checked = this.checkParams('MAIL', p.params);
    if (checked) return answer(checked);
    const smtputf8 = p.params.some((x) => x.key === 'SMTPUTF8');
    if (p.path.utf8 && !smtputf8) return answer(R.utf8NotDeclared());
    this.txnNumber++;
    const v = await this.runRules('mail', () => ({ stage: 'mail', session: this.snapshot(), sender: p.path, params: p.params }));
    if (v.reply) return answer(v.reply);
    const b = await this.ensureBackend();
    if (!(b instanceof BackendConnection)) return answer(b);
    const txn: Transaction = { sender: p.path, params: p.params, smtputf8, rcpts: [], rcptForwarded: 0, rcptTried: 0, mail: null, mailRefused: null, tags: [], log };
    this.addTags(txn.tags, v.tags);
    this.txn = txn;
    if (v.acceptedBy) txn.acceptedBy = v.acceptedBy;
    // Deferred: the syntax, parameters and size are checked here; the backend gets MAIL in one write
    // with the first RCPT the rules let through (a round trip less per message, none at all for a
    // transaction whose recipients are all refused here). Its refusal of the sender is then the
    // answer to that RCPT, as Postfix gives it with smtpd_delay_reject = yes.
    // Only in an ESMTP session: after HELO the backend has not offered PIPELINING to this client
    // (Postfix counts such commands as improper pipelining, smtpd_forbid_unauth_pipelining).
    if (this.deps.backend.deferMail && this.esmtp && b.pipelining) return answer(R.mailOk());
    txn.mail = b.command(formatMailRcpt('MAIL FROM', p.path, p.params)).then(
      (x) => {
        if (x.code !== 250 && this.txn === txn) this.txn = null;
        return x;
      },
      (e: unknown) => this.backendFailed(e),
    );
    answer(txn.mail);
  }

  /** A deferred MAIL goes to the backend (with the RCPT that follows it in the same write). */
  private sendDeferredMail(b: BackendConnection, txn: Transaction): Promise<Reply> {
    return b.command(formatMailRcpt('MAIL FROM', txn.sender, txn.params)).then(
      (x) => {
        txn.log.mail = x.code;
        if (replyClass(x) !== 2) txn.mailRefused = x;
        return x;
      },
      (e: unknown) => (txn.mailRefused = this.backendFailed(e)),
    );
  }

  /** MAIL/RCPT parameters doorman lets through: only those of advertised extensions. */
  private checkParams(verb: 'MAIL' | 'RCPT', params: readonly MailParam[]): Reply | null {
    for (const { key, value } of params) {
      if (verb === 'MAIL' && key === 'SIZE') {
        if (!value || !/^\d{1,20}$/.test(value)) return R.badParam('bad SIZE parameter');
        if (Number(value) > this.sizeLimit()) return R.tooBig();
        continue;
      }
      if (verb === 'MAIL' && key === 'BODY') {
        const v = (value ?? '').toUpperCase();
        if (v === '7BIT' || (v === '8BITMIME' && this.caps.has('8BITMIME'))) continue;
        return R.badParam(`unsupported BODY=${value ?? ''}`);
      }
      if (verb === 'MAIL' && key === 'SMTPUTF8' && value === null && this.caps.has('SMTPUTF8')) continue;
      if (verb === 'MAIL' && key === 'AUTH' && this.caps.has('AUTH')) continue;
      if (this.caps.has('DSN') && ((verb === 'MAIL' && (key === 'RET' || key === 'ENVID')) || (verb === 'RCPT' && (key === 'NOTIFY' || key === 'ORCPT')))) continue;
      return R.badParam(`unsupported option ${key}`);
    }
    return null;
  }

  private async onRcpt(c: Command): Promise<void> {
    if (!this.helo) return this.queue('RCPT', R.needHelo());
    const txn = this.txn;
    if (!txn) return this.queue('RCPT', R.needMail());
    const p = parseMailRcpt(c.arg, 'TO');
    if (!p.ok) {
      txn.rcptTried++;
      if (p.code === 'syntax') return this.queue('RCPT', R.syntax('RCPT TO:<address>'));
      if (p.code === 'param') return this.queue('RCPT', R.badParam(p.reason));
      return this.queue('RCPT', reply(501, '5.1.3', `Bad recipient address syntax: ${p.reason}`));
    }
    txn.rcptTried++;
    const to = addressOf(p.path);
    const answer = (r: Pending) =>
      this.queue('RCPT', r, (x) => {
        if (txn.log.rcpts.length < MAX_LOGGED_RCPTS) txn.log.rcpts.push({ to, code: x.code });
        else txn.log.moreRcpts = (txn.log.moreRcpts ?? 0) + 1;
      });
    const checked = this.checkParams('RCPT', p.params);
    if (checked) return answer(checked);
    if (p.path.utf8 && !txn.smtputf8) return answer(R.utf8NotDeclared());
    if (txn.rcptForwarded >= this.deps.limits.maxRecipients) return answer(R.tooManyRcpts());
    const v = await this.runRules('rcpt', () => ({ stage: 'rcpt', session: this.snapshot(), recipient: p.path, params: p.params }));
    if (v.reply) return answer(v.reply);
    if (this.txn !== txn) return answer(R.needMail());
    const b = this.backend;
    if (!b?.alive) return answer(R.lostBackend(this.deps.hostname));
    if (txn.mailRefused) return answer(txn.mailRefused);
    txn.mail ??= this.sendDeferredMail(b, txn);
    txn.rcptForwarded++;
    this.addTags(txn.tags, v.tags);
    answer(this.rcptReply(txn, p.path, b.command(formatMailRcpt('RCPT TO', p.path, p.params))));
  }

  /**
   * The answer to a forwarded RCPT: the backend's, or — when it refused the deferred MAIL before it
   * (or was lost) — that refusal, counted once. Replies come in order: MAIL's before this RCPT's.
   */
  private async rcptReply(txn: Transaction, path: ParsedPath, sent: Promise<Reply>): Promise<Reply> {
    await txn.mail;
    const x = await sent.catch((e: unknown) => txn.mailRefused ?? this.backendFailed(e));
    const r = txn.mailRefused ?? x;
    if (replyClass(r) === 2) txn.rcpts.push(path);
    else txn.rcptForwarded--;
    return r;
  }

  private onRset(c: Command): void {
    if (c.arg.trim()) return this.queue('RSET', R.syntax('RSET'));
    this.txn = null;
    const b = this.backend;
    // Nothing to reset at the backend (no MAIL since the last end of data, RSET or HELO): answered
    // here, as the backend would.
    if (!b?.alive || !b.transactionOpen) return this.queue('RSET', R.rsetOk());
    this.queue('RSET', b.command('RSET').catch(() => R.rsetOk()));
  }

  private quit(): void {
    if (!this.refusedAtConnect) this.endReason = 'quit';
    this.queue('QUIT', R.bye(this.deps.hostname));
  }

  private async onStartTls(c: Command): Promise<void> {
    const ctx = this.deps.listener.secureContext;
    if (!ctx) return this.queue('STARTTLS', R.tlsUnavailable());
    if (this.tls) return this.queue('STARTTLS', R.tlsActive());
    if (c.arg.trim()) return this.queue('STARTTLS', R.syntax('STARTTLS'));
    // CVE-2011-0411: plaintext pipelined after STARTTLS must not be executed after the handshake.
    const injected = this.framing.discard();
    if (injected > 0) {
      this.violation('starttls_injection');
      this.deps.log.warn({ session: this.id, bytes: injected }, 'plaintext after STARTTLS discarded');
    }
    this.deps.metrics.commands.inc({ verb: 'STARTTLS', class: '2xx' });
    this.socket.write(formatReply(R.tlsReady()));
    const plain = this.socket;
    plain.removeAllListeners('data');
    plain.removeAllListeners('timeout');
    plain.removeAllListeners('close');
    plain.removeAllListeners('end');
    plain.removeAllListeners('error');
    plain.on('error', () => undefined);
    const secure = new tls.TLSSocket(plain, { isServer: true, secureContext: ctx });
    this.socket = secure;
    this.attach(secure);
    // The handshake has its own short deadline (limits.tlsHandshakeTimeout), as on the smtps
    // listener: a client that says STARTTLS and then nothing must not hold its slot for minutes.
    const ok = await new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => {
        secure.destroy();
        resolve(false);
      }, this.deps.limits.tlsHandshakeTimeout);
      const done = (v: boolean) => {
        clearTimeout(timer);
        resolve(v);
      };
      secure.once('secure', () => done(true));
      secure.once('error', () => done(false));
      secure.once('close', () => done(false));
    });
    this.deps.metrics.tlsSessions.inc({ listener: this.deps.listener.name, mode: 'starttls', result: ok ? 'success' : 'failure' });
    if (!ok) return this.close('tls-failed');
    // RFC 3207 §4.2: forget everything learnt from the client before TLS.
    this.tls = true;
    this.helo = null;
    this.esmtp = false;
    this.txn = null;
    this.framing.discard();
  }

  private async onAuth(c: Command): Promise<void> {
    if (!this.helo || !this.esmtp) return this.queue('AUTH', R.needHelo());
    if (this.auth) return this.queue('AUTH', R.authAlready());
    if (this.txn) return this.queue('AUTH', R.authInTransaction());
    const mechs = this.authMechanisms();
    if (!mechs) return this.queue('AUTH', R.authNotAvailable());
    if (!this.authAllowed()) return this.queue('AUTH', R.authNeedsTls());
    const [mechRaw = '', initial] = c.arg.trim().split(/\s+/);
    const mechanism = mechRaw.toUpperCase();
    if (!/^[A-Z0-9_-]{1,20}$/.test(mechanism) || (initial !== undefined && !/^([A-Za-z0-9+/]+=*|=)$/.test(initial))) {
      return this.queue('AUTH', R.syntax('AUTH mechanism [initial-response]'));
    }
    let login = mechanism === 'PLAIN' && initial ? plainLogin(initial) : null;
    const v = await this.runRules('auth', () => ({ stage: 'auth', session: this.snapshot(), mechanism, login }));
    if (v.reply) return this.queue('AUTH', v.reply);
    const b = await this.ensureBackend();
    if (!(b instanceof BackendConnection)) return this.queue('AUTH', b);
    let r = await b.command(`AUTH ${mechanism}${initial !== undefined ? ' ' + initial : ''}`).catch((e: unknown) => this.backendFailed(e));
    let step = 0;
    this.framing.sasl = true;
    try {
      while (r.code === 334 && !this.closed) {
        this.socket.write(formatReply(r));
        const ev = await this.readLine();
        if (!ev) return;
        if (ev.type !== 'line' || ev.bareCr || ev.line.includes(0)) {
          // Cancel at the backend and tell the client.
          await b.command('*').catch(() => undefined);
          return this.queue('AUTH', ev.type === 'too_long' ? R.lineTooLong() : R.authCancelled());
        }
        const resp = ev.line.toString('latin1');
        if (resp !== '*' && !/^([A-Za-z0-9+/]*=*)$/.test(resp)) {
          await b.command('*').catch(() => undefined);
          return this.queue('AUTH', reply(501, '5.5.2', 'Error: cannot decode response'));
        }
        if (mechanism === 'PLAIN' && step === 0 && login === null) login = plainLogin(resp);
        if (mechanism === 'LOGIN' && step === 0 && initial === undefined) login = b64(resp);
        step++;
        r = await b.command(resp).catch((e: unknown) => this.backendFailed(e));
      }
    } finally {
      this.framing.sasl = false;
    }
    if (r.code === 235) {
      this.auth = { mechanism, login: login ?? (mechanism === 'LOGIN' && initial ? b64(initial) : null) };
      this.deps.log.info({ session: this.id, mechanism, login: this.auth.login }, 'authenticated');
    }
    this.queue('AUTH', r);
    if (r.code !== 235 && ++this.authFailures >= this.deps.limits.maxAuthFailures) {
      this.violation('auth_flood');
      this.endReason = 'too-many-errors';
      this.queue('AUTH', reply(421, '4.7.0', `${this.deps.hostname} Error: too many authentication failures`));
    }
  }

  /**
   * ETRN (RFC 1985): relayed to a backend that offers it (Postfix flushes the node's deferred
   * mail), after the etrn-stage rules (the relay rule: clients with relay rights only); 502 when
   * the backend does not offer it. Its reply is the backend's.
   */
  private async onEtrn(c: Command): Promise<void> {
    if (!this.helo) return this.queue('ETRN', R.needHelo());
    if (!this.caps.has('ETRN')) return this.queue('ETRN', R.notImplemented());
    if (this.txn) return this.queue('ETRN', R.authInTransaction());
    const node = c.arg.trim();
    // A domain, "@domain" (its subdomains too) or "#queue" (RFC 1985 §5), as Postfix takes them.
    if (!/^[@#]?[A-Za-z0-9][A-Za-z0-9.-]{0,254}$/.test(node)) return this.queue('ETRN', R.syntax('ETRN domain'));
    const v = await this.runRules('etrn', () => ({ stage: 'etrn', session: this.snapshot(), node }));
    if (v.reply) return this.queue('ETRN', v.reply);
    const b = await this.ensureBackend();
    if (!(b instanceof BackendConnection)) return this.queue('ETRN', b);
    this.queue('ETRN', b.command(`ETRN ${node}`).catch((e: unknown) => this.backendFailed(e)));
  }

  // ---------------------------------------------------------------- DATA

  private async onData_(c: Command): Promise<void> {
    if (!this.helo) return this.queue('DATA', R.needHelo());
    const txn = this.txn;
    if (!txn) return this.queue('DATA', R.needMail());
    if (c.arg.trim()) return this.queue('DATA', R.syntax('DATA'));
    if (txn.rcpts.length === 0) return this.queue('DATA', txn.rcptTried > 0 ? R.noValidRcpt() : R.needRcpt());
    const b = this.backend;
    if (!b?.alive) {
      this.txn = null;
      return this.queue('DATA', R.lostBackend(this.deps.hostname));
    }
    // 354 is answered at once (the backend's DATA reply is awaited in parallel): the client starts
    // sending a round trip earlier. Nothing goes to the backend before its own 354 — the bytes wait
    // in `early` (bounded by back-pressure); if the backend refuses DATA, the message is read to its
    // end and the client gets the backend's refusal then.
    const hasHeaderRules = this.deps.rules.stages.has('data_headers');
    // BDAT towards a backend that takes it, in an ESMTP session (the client said EHLO): the
    // message goes with its size, without DATA and the backend's 354.
    const bdat = this.deps.backend.chunking && this.esmtp && b.chunking;
    const d: DataState = {
      bdat: bdat ? new Unstuffer() : null,
      bdatRefused: null,
      bdatReplies: [],
      aborted: null,
      added: 0,
      pendingHeaders: hasHeaderRules ? [] : null,
      tail: [],
      headerRule: null,
      // BDAT needs no 354: bytes may go at once.
      ready: bdat,
      early: [],
      earlyBytes: 0,
      refused: null,
      backendReply: bdat ? null : b.command('DATA').catch((e: unknown) => this.backendFailed(e)),
    };
    this.data = d;
    if (d.backendReply) void d.backendReply.then((r) => {
      if (this.data !== d) return;
      if (r.code === 354) {
        d.ready = true;
        const early = d.early;
        d.early = [];
        d.earlyBytes = 0;
        if (this.backendCongested && !this.backend?.alive) return;
        this.backendCongested = false;
        this.writeBackend(early);
        if (!this.backendCongested) this.uncongest();
      } else {
        d.refused = r;
        d.aborted ??= 'backend_refused';
        d.early = [];
        if (this.backendCongested) this.uncongest();
      }
    });
    this.send(R.startData());
    this.deps.metrics.commands.inc({ verb: 'DATA', class: '3xx' });
    this.socket.setTimeout(this.deps.limits.dataTimeout);
    this.dataStarted = Date.now();
    this.framing.beginData();
    if (!hasHeaderRules) this.writeTags(this.sessionTags, txn.tags);
  }

  /** A DATA slower than limits.minDataRate after its grace period: 421 and close (nothing delivered). */
  private tooSlow(): boolean {
    const rate = this.deps.limits.minDataRate;
    if (rate === 0) return false;
    const elapsed = Date.now() - this.dataStarted;
    if (elapsed < Math.min(10_000, this.deps.limits.dataTimeout)) return false;
    if (this.framing.dataBytes >= (rate * elapsed) / 1000) return false;
    this.violation('slow_client');
    this.endReason = 'timeout';
    this.send(reply(421, '4.4.2', `${this.deps.hostname} Error: data arriving too slowly, closing connection`));
    return true;
  }

  /** Forwards message bytes unless the message is already refused. */
  private forward(chunks: Buffer[], hold = false): void {
    const d = this.data;
    if (!d) return;
    const f = this.framing;
    if (!d.aborted) {
      if (this.oversized(d)) d.aborted = 'size';
      else if (f.bareNewline && this.deps.limits.bareNewline === 'reject') d.aborted = 'bare_newline';
      else if (f.longLine) d.aborted = 'long_line';
      if (d.aborted) {
        this.backend?.destroy();
        return;
      }
    } else return;
    if (d.pendingHeaders) {
      for (const c of chunks) {
        d.pendingHeaders.push(Buffer.from(c));
      }
      return;
    }
    if (hold) d.tail = chunks;
    else this.writeBackend(chunks);
  }

  private get hasDataEndRules(): boolean {
    return this.deps.rules.stages.has('data_end');
  }

  private writeBackend(chunks: Buffer | readonly Buffer[]): void {
    const b = this.backend;
    if (!b?.alive) return;
    const list = Buffer.isBuffer(chunks) ? [chunks] : chunks;
    const d = this.data;
    if (d && !d.ready) {
      // Before the backend's 354: hold the bytes; stop reading when too many are held.
      if (d.refused) return;
      for (const c of list) {
        d.early.push(c);
        d.earlyBytes += c.length;
      }
      if (d.earlyBytes > this.deps.limits.maxBuffered && !this.backendCongested) {
        this.backendCongested = true;
        this.socket.pause();
      }
      return;
    }
    if (d?.bdat) {
      // One BDAT per batch of chunks; a refused chunk decides the message (bdatRefused), and
      // no further chunk is sent after it (RFC 3030 §2).
      if (d.bdatRefused) return;
      const body = d.bdat.push(list);
      if (body.length === 0) return;
      const sent = b.bdat(body, false);
      d.bdatReplies.push(
        sent.reply.then(
          (r) => {
            if (replyClass(r) !== 2) d.bdatRefused ??= r;
          },
          () => undefined,
        ),
      );
      if (!sent.ok) this.congested(b);
      return;
    }
    for (const c of list) if (!b.writeData(c)) this.congested(b);
  }

  /** The backend's socket is full: stop reading the client until it drains. */
  private congested(b: BackendConnection): void {
    if (this.backendCongested) return;
    this.backendCongested = true;
    this.socket.pause();
    b.onceDrain(() => this.uncongest());
  }

  /** With data_headers rules: hold the header block, evaluate, then release it. */
  private async maybeRunHeaderRules(final = false): Promise<void> {
    const d = this.data;
    if (!d?.pendingHeaders) return;
    const held = Buffer.concat(d.pendingHeaders);
    const end = held.indexOf('\r\n\r\n');
    const limit = this.deps.limits.maxHeaderBytes;
    const startsWithBlank = held.subarray(0, 2).equals(Buffer.from('\r\n'));
    if (end < 0 && !startsWithBlank && held.length < limit && !final) {
      d.pendingHeaders = [held];
      return;
    }
    d.pendingHeaders = null;
    const headerLen = startsWithBlank ? 0 : end >= 0 ? end + 2 : Math.min(held.length, limit);
    const v = await this.runRules('data_headers', () => ({
      stage: 'data_headers',
      session: this.snapshot(),
      headers: held.subarray(0, headerLen),
      truncated: end < 0 && !startsWithBlank,
    }));
    if (!d.aborted && v.reply) {
      d.aborted = 'rule';
      d.headerRule = { reply: v.reply, rule: v.decidedBy ?? '' };
      this.backend?.destroy();
      return;
    }
    this.writeTags(this.sessionTags, this.txn?.tags ?? [], v.tags);
    if (!d.aborted) this.writeBackend(held);
  }

  private async finishData(): Promise<void> {
    const d = this.data;
    const txn = this.txn;
    if (!d || !txn) return;
    this.commandStarted = performance.now();
    if (d.pendingHeaders) await this.maybeRunHeaderRules(true);
    this.socket.setTimeout(this.deps.limits.commandTimeout);
    const size = this.framing.dataBytes;
    this.deps.metrics.messageSize.observe(size);
    const msg = txn.log;
    msg.size = size;
    let r: Reply;
    if (!d.aborted && this.oversized(d)) d.aborted = 'size';
    if (d.aborted === 'backend_refused') {
      // The backend refused DATA and never saw a byte; clear the transaction it still holds.
      r = this.abortReply(d);
      this.resetRefused(r);
    } else if (d.aborted) {
      this.backend?.destroy();
      r = this.abortReply(d);
      if (d.headerRule) msg.rule = d.headerRule.rule;
    } else {
      const v = await this.runRules('data_end', () => ({ stage: 'data_end', session: this.snapshot(), size }));
      if (v.reply) {
        this.backend?.destroy();
        r = v.reply;
        msg.rule = v.decidedBy ?? undefined;
      } else {
        r = d.bdat ? await this.endBdat(d, d.bdat) : await this.endDataCommand(d);
        const q = /queued as ([A-Za-z0-9]+)/.exec(r.lines.join(' '));
        if (q?.[1]) msg.queueId = q[1];
      }
    }
    msg.outcome = replyClass(r) === 2 ? 'accepted' : replyClass(r) === 4 ? 'tempfailed' : 'rejected';
    // As Postfix: the junk command count starts again after a delivered message.
    if (msg.outcome === 'accepted') this.junk = 0;
    msg.reply = describeReply(r);
    this.deps.metrics.messages.inc({ outcome: msg.outcome });
    this.data = null;
    this.txn = null;
    this.queue('DATA_END', r);
  }

  /** The end of a message sent with DATA: its last bytes and the dot, once the backend's 354 came. */
  private async endDataCommand(d: DataState): Promise<Reply> {
    const b = this.backend;
    const dataReply = (await d.backendReply) ?? R.backendTempfail();
    if (d.refused || dataReply.code !== 354) {
      const r = d.refused ?? dataReply;
      this.resetRefused(r);
      return r;
    }
    return b?.alive ? b.endData(d.tail).catch((e: unknown) => this.dataFailed(e)) : R.backendTempfail();
  }

  /**
   * The end of a message sent with BDAT. A refused chunk decides the message: no LAST follows it.
   * LAST may go before an earlier chunk's refusal came back (replies come in order, later): then
   * that refusal still decides, even if the backend took LAST (RFC 3030 §2 has it refuse every
   * chunk after a refused one; one that does not must not turn the refusal into a 250). Otherwise
   * the last chunk's reply is the message's fate. A failed transaction is RSET.
   */
  private async endBdat(d: DataState, unstuffer: Unstuffer): Promise<Reply> {
    const b = this.backend;
    let r = d.bdatRefused;
    if (!r) {
      const last = b?.alive ? await b.bdat(unstuffer.push(d.tail), true).reply.catch((e: unknown) => this.dataFailed(e)) : R.backendTempfail();
      await Promise.all(d.bdatReplies);
      r = d.bdatRefused ?? last;
      if (d.bdatRefused && replyClass(last) === 2) {
        this.deps.log.warn({ session: this.id, backend: this.backendName, refused: describeReply(d.bdatRefused), last: describeReply(last) }, 'backend accepted a message after refusing a chunk of it; the client gets the refusal');
      }
    }
    if (replyClass(r) !== 2) this.resetRefused(r);
    return r;
  }

  /** The backend still holds the transaction whose data it refused: reset it (unless it is closing). */
  private resetRefused(r: Reply): void {
    const b = this.backend;
    if (!r.closes && b?.alive) b.command('RSET').catch(() => undefined);
  }

  private abortReply(d: DataState): Reply {
    switch (d.aborted) {
      case 'size':
        return R.tooBig();
      case 'bare_newline':
        this.violation('bare_lf');
        return R.bareNewline();
      case 'long_line':
        this.violation('line_too_long');
        return R.dataLineTooLong();
      case 'rule':
        return d.headerRule?.reply ?? R.tempfailLocal();
      case 'backend_refused':
        return d.refused ?? R.backendTempfail();
      default:
        return R.backendTempfail();
    }
  }

  private dataFailed(e: unknown): Reply {
    const kind = e instanceof BackendError ? e.kind : 'protocol';
    this.deps.metrics.backendFailures.inc({ backend: this.backendName ?? '', kind });
    this.deps.log.warn({ session: this.id, err: (e as Error).message }, 'backend failed at end of data');
    return R.backendTempfail();
  }

  /** A backend failure during a command: the client gets 421 and the session ends. */
  private backendFailed(e: unknown): Reply {
    const kind = e instanceof BackendError ? e.kind : 'protocol';
    this.deps.metrics.backendFailures.inc({ backend: this.backendName ?? '', kind });
    this.deps.log.warn({ session: this.id, err: (e as Error).message, kind }, 'backend failed');
    this.endReason = 'backend-failed';
    return R.lostBackend(this.deps.hostname);
  }

  // ---------------------------------------------------------------- rules

  /**
   * Evaluates one stage. The event (with its session snapshot) is built only when a rule acts on
   * the stage or someone observes events$: a stage without rules costs nothing.
   */
  private runRules(stage: Stage, make: () => SessionEvent): StageVerdict | Promise<StageVerdict> {
    if (!this.heard(stage)) return EMPTY_VERDICT;
    return this.evaluateStage(stage, make());
  }

  /** A rule acts on the stage, or someone besides the pipeline observes events$: only then is its event built. */
  private heard(stage: Stage): boolean {
    return this.deps.rules.stages.has(stage) || this.events$.observers.length > 1;
  }

  /** The pipeline's verdict for the event: synchronous when every rule answered at once. */
  private evaluateStage(stage: Stage, event: SessionEvent): StageVerdict | Promise<StageVerdict> {
    this.events$.next(event);
    const v = this.pipe.verdict(event);
    return v instanceof Promise ? v.then((x) => this.noteVerdict(stage, x)) : this.noteVerdict(stage, v);
  }

  private noteVerdict(stage: Stage, v: StageVerdict): StageVerdict {
    for (const o of v.outcomes) if (o.finding !== 'pass') this.noteOutcome(o);
    if (v.reply && v.decidedBy) {
      this.deps.metrics.rejections.inc({ rule: v.decidedBy, stage, code: String(v.reply.code), enhanced_code: v.reply.enhanced });
    }
    if (stage === 'connect' && v.acceptedBy) this.acceptedBy = v.acceptedBy;
    if (stage === 'connect') this.addTags(this.sessionTags, v.tags);
    return v;
  }

  /** A finding for the session log line, within MAX_LOGGED_OUTCOMES (the rest are counted). */
  private noteOutcome(o: RuleOutcome): void {
    if (this.outcomes.length < MAX_LOGGED_OUTCOMES) this.outcomes.push(o);
    else this.droppedOutcomes++;
  }

  /**
   * A dry-run finding that arrived after its stage's reply: in the session log line when it came
   * before the session ended, else in a log line of its own ('late rule finding').
   */
  private lateOutcome(o: RuleOutcome): void {
    if (o.finding === 'pass') return;
    if (!this.logged) this.noteOutcome(o);
    else this.deps.log.info({ session: this.id, client: this.client.text, rule: ruleLogEntry(o) }, 'late rule finding');
  }

  private snapshot(): SessionSnapshot {
    return {
      id: this.id,
      client: this.client,
      clientPort: this.peer.port,
      listener: { name: this.deps.listener.name, role: this.deps.listener.role },
      localAddress: this.peer.destAddress,
      tls: this.tls,
      helo: this.helo,
      esmtp: this.esmtp,
      auth: this.auth,
      transaction: this.txnNumber,
      sender: this.txn?.sender ?? null,
      recipients: this.txn ? [...this.txn.rcpts] : [],
      recipientsForwarded: this.txn?.rcptForwarded ?? 0,
      acceptedBy: this.acceptedBy ?? this.txn?.acceptedBy ?? null,
      ended: this.ended.signal,
    };
  }

  // ---------------------------------------------------------------- log

  private logged = false;

  private logSession(): void {
    if (this.logged) return;
    this.logged = true;
    this.deps.log.info(
      {
        session: this.id,
        client: this.client.text,
        port: this.peer.port,
        listener: this.deps.listener.name,
        backend: this.backendName,
        helo: this.helo,
        tls: this.tls,
        login: this.auth?.login ?? null,
        transactions: this.txnLogs,
        ...(this.droppedTxnLogs ? { moreTransactions: this.droppedTxnLogs } : {}),
        rules: this.outcomes.map(ruleLogEntry),
        ...(this.droppedOutcomes ? { moreRules: this.droppedOutcomes } : {}),
        ...(this.droppedTags ? { moreTags: this.droppedTags } : {}),
        outcome: this.endReason,
        commands: this.commands,
        errors: this.errors,
        ms: Date.now() - this.started,
      },
      'session',
    );
  }
}

/** One rule outcome as the session log shows it. */
function ruleLogEntry(o: RuleOutcome): object {
  return {
    rule: o.rule,
    stage: o.stage,
    finding: o.finding,
    action: o.action,
    effect: o.effect,
    ...(o.wouldBe ? { would: o.wouldBe } : {}),
    ...(o.reason ? { reason: o.reason } : {}),
    ...(o.reply ? { reply: describeReply(o.reply) } : {}),
  };
}

const ID_PREFIX = `${process.pid.toString(36)}${Date.now().toString(36)}`;
let idCounter = 0;
function nextSessionId(): string {
  idCounter = (idCounter + 1) % 2_176_782_336; // 36^6
  return `${ID_PREFIX}${idCounter.toString(36).padStart(6, '0')}`;
}

interface DataState {
  aborted: null | 'size' | 'bare_newline' | 'long_line' | 'rule' | 'backend' | 'backend_refused';
  /** Relayed as BDAT (RFC 3030): the stuffing is removed on the way; null for DATA. */
  bdat: Unstuffer | null;
  /** The first refusal of a BDAT chunk (the message's fate, whatever LAST gets). */
  bdatRefused: Reply | null;
  /** Settle when each non-last chunk's reply has been looked at (bdatRefused set if refused). */
  bdatReplies: Promise<void>[];
  /** The backend answered 354: bytes may go to it. */
  ready: boolean;
  /** Bytes received before the backend's 354. */
  early: Buffer[];
  earlyBytes: number;
  /** The backend's refusal of DATA, answered after the client's end of data. */
  refused: Reply | null;
  /** The backend's reply to DATA; null when the message goes as BDAT (no DATA, no 354). */
  backendReply: Promise<Reply> | null;
  /** Held header chunks while data_headers rules are pending; null when streaming. */
  pendingHeaders: Buffer[] | null;
  headerRule: { reply: Reply; rule: string } | null;
  /** The message's last chunks, written together with the final "." (fewer writes). */
  tail: Buffer[];
  /** Octets doorman added to the message (X-Doorman-Tag headers). */
  added: number;
}

function tagHeaders(tags: readonly string[]): Buffer {
  // eslint-disable-next-line no-control-regex
  return Buffer.from(tags.map((t) => `X-Doorman-Tag: ${truncateUtf8(t.replace(/[\x00-\x1f\x7f]/g, ' '), MAX_TAG_OCTETS)}\r\n`).join(''), 'utf8');
}

/** `s` cut to at most `max` octets of UTF-8, at a character boundary. */
function truncateUtf8(s: string, max: number): string {
  if (Buffer.byteLength(s, 'utf8') <= max) return s;
  let out = '';
  let n = 0;
  for (const ch of s) {
    n += Buffer.byteLength(ch, 'utf8');
    if (n > max) break;
    out += ch;
  }
  return out;
}

function b64(s: string): string | null {
  try {
    const v = Buffer.from(s, 'base64').toString('utf8');
    // eslint-disable-next-line no-control-regex
    return v && !/[\x00-\x1f]/.test(v) ? v : null;
  } catch {
    return null;
  }
}

/** RFC 4616: authzid NUL authcid NUL passwd → authcid (never the password). */
function plainLogin(resp: string): string | null {
  const parts = Buffer.from(resp, 'base64').toString('utf8').split('\0');
  return parts.length === 3 && parts[1] ? parts[1] : null;
}
