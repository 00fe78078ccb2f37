/**
 * session.ts — one client session: the SMTP state machine between a client and the backend.
 *
 * Order of work for a session:
 *   1. the connect-stage rules and doorman's own greeting (greeting.ts); no backend connection
 *      yet: a client that says nothing (or only what doorman answers itself) costs the backend
 *      nothing. Its HELO/EHLO takes one from the pool (a prepared spare or one an earlier session
 *      left clean, re-bound with XCLIENT; else a new one), within backend.maxConnections;
 *   2. commands: one guard prelude (guards.ts) then a typed handler table. MAIL, RCPT, RSET and
 *      NOOP are pipelined: their replies are queued in order and written together when the
 *      client's group is read; the backend gets them without waiting;
 *   3. DATA streams chunk by chunk to the backend with back-pressure (inbound.ts); the final "."
 *      is sent only after the size, line and bare-newline checks and the data_end rules passed.
 *      Otherwise the backend connection is dropped (the backend never sees an end of data) and
 *      reopened for the next transaction.
 * The client gets 250 for a message only when the backend said 250 for it; any backend failure
 * becomes a 4xx. The session owns the lifecycle (start, close, shutdown, the socket's events),
 * the input loop, dispatch, the handlers of HELO/EHLO, MAIL, RCPT, DATA (its start), RSET, QUIT
 * and the one-line commands, the session state they share (HELO, TLS, AUTH, the transaction,
 * tags) and its side of the rule pipeline (events$, each stage's verdict, the rule findings for
 * the log). Its parts are handed what they need through narrow hosts:
 *   greeting.ts      the connect-stage rules, the greeting, the 220- teaser and pregreet;
 *   guards.ts        the checks before every command (limits, bare CR/LF, non-SMTP), counters;
 *   transaction.ts   one transaction: sender, recipients, MAIL (deferred or not), RCPT, RSET;
 *   inbound.ts       the message in progress: its message.ts, DATA chunks, header and end rules,
 *                    the final reply; data.ts  the DATA policy's checks and abort replies;
 *   message.ts       one message towards the backend (DATA or BDAT), back-pressure, abort;
 *   backend-link.ts  which backend connection, binding, deferred MAIL, failures → a reply;
 *   auth.ts          the AUTH command, SASL relay; extensions.ts  the EHLO keywords, MAIL/RCPT params;
 *   starttls.ts      the STARTTLS command and the client socket's TLS upgrade;
 *   etrn.ts          the ETRN command, relayed to the backend;
 *   reply-writer.ts  every byte to the client (queued or now) and output back-pressure;
 *   session-log.ts   the one log line per session.
 */
import { Subject } from 'rxjs';
import type net from 'node:net';
import type tls from 'node:tls';
import type { Logger } from 'pino';
import { BackendConnection, type BackendOptions, type Capabilities } from '../backend/connection.js';
import type { BackendPool } from '../backend/pool.js';
import type { ProxiedAddress } from '../backend/proxy-protocol.js';
import type { Limits } from '../config/schema.js';
import type { RuleSet } from '../config/rules.js';
import type { Metrics } from '../metrics/registry.js';
import { parseAddress, type ClientAddress } from '../net/ip.js';
import type { SessionEvent, SessionSnapshot, Stage } from '../pipeline/events.js';
import { openPipeline, type PipelineSession } from '../pipeline/run.js';
import { EMPTY_VERDICT, type RuleOutcome, type StageVerdict } from '../pipeline/verdict.js';
import { addressOf } from '../protocol/address.js';
import { heloArgument, type Command } from './commands.js';
import { etrn } from './etrn.js';
import { Greeting } from './greeting.js';
import { Guards, pipelinable } from './guards.js';
import { BackendLink } from './backend-link.js';
import { AuthCommand } from './auth.js';
import { oversized } from './data.js';
import { Inbound, type InboundHost } from './inbound.js';
import { authMechanisms, ehloKeywords, sizeLimit } from './extensions.js';
import { Framing, Unstuffer, type CommandEvent } from './framing.js';
import { MAX_TAG_HEADERS, type Message } from './message.js';
import { ReplyWriter, type Pending } from './reply-writer.js';
import { startTls } from './starttls.js';
import { MAX_LOGGED_OUTCOMES, ruleLogEntry, SessionLog } from './session-log.js';
import { mailRefused, parsed, parseMail, parseRcpt, reset, Transaction } from './transaction.js';
import { describeReply, R, reply, type Reply } from '../protocol/reply.js';

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

/** Keep at most this many unanswered pipelined commands before writing replies. */
const MAX_QUEUED_REPLIES = 100;

export class Session {
  /** Unique per process and start time (no per-session randomness on the hot path). */
  readonly id = nextSessionId();
  readonly started = Date.now();
  private socket: net.Socket;
  private readonly framing: Framing;
  /** The backend connection this session uses, and how it gets one. */
  private readonly link: BackendLink;
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
  /** Every byte to the client: replies, queued or now, and output back-pressure. */
  private readonly out: ReplyWriter;
  private pumping = false;
  private repump = false;
  /** When the current incomplete command line started arriving (0: none). */
  private partialSince = 0;
  /** The connect-stage rules, the greeting and pregreet (greeting.ts). */
  private readonly greeting: Greeting;
  private closed = false;
  private dataWaiter: (() => void) | null = null;
  /** The guard prelude's checks and counters (commands, unknown, junk). */
  private readonly guards: Guards;
  /** The client half-closed: what it sent is still executed and answered, then the session ends. */
  private clientEnded = false;
  private caps: Capabilities = new Map();
  private readonly outcomes: RuleOutcome[] = [];
  private droppedOutcomes = 0;
  private readonly sessionLog: SessionLog;
  /** The AUTH command: its checks, rules, relay and failure count (auth.ts). */
  private readonly authCommand: AuthCommand;
  private endReason = 'closed';
  /** The message in progress (DATA or BDAT towards the backend); null outside one. */
  private data: Inbound | null = null;
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
    this.sessionLog = new SessionLog(deps.log);
    this.guards = new Guards({
      hostname: deps.hostname,
      get limits() {
        return deps.limits;
      },
      violation: (kind) => this.violation(kind),
      refusedAtConnect: () => this.refusedAtConnect,
    });
    this.link = new BackendLink(
      deps,
      { ...peer, address: this.client.text },
      {
        sessionId: this.id,
        isClosed: () => this.closed,
        hello: () => (this.helo ? { verb: this.esmtp ? 'EHLO' : 'HELO', name: this.helo } : null),
        authenticated: () => this.auth !== null,
        onClosed: () => this.onBackendClosed(),
        onFailed: () => (this.endReason = 'backend-failed'),
      },
    );
    this.out = new ReplyWriter(socket, {
      hostname: deps.hostname,
      metrics: deps.metrics,
      get maxErrors() {
        return deps.limits.maxErrors;
      },
      get writeTimeout() {
        return deps.limits.writeTimeout;
      },
      isClosed: () => this.closed,
      close: () => this.close(this.endReason),
      tooManyErrors: () => (this.endReason = 'too-many-errors'),
      writeTimedOut: (unread) => {
        this.violation('write_timeout');
        this.deps.log.warn({ session: this.id, client: this.client.text, unread, ms: this.deps.limits.writeTimeout }, 'client does not read its replies: dropped');
        this.endReason = 'write-timeout';
        this.close('write-timeout');
      },
      drained: (s) => {
        if (!this.backendCongested) s.resume();
        this.pump();
      },
    });
    this.authCommand = new AuthCommand({
      hostname: deps.hostname,
      maxFailures: () => this.deps.limits.maxAuthFailures,
      state: () => ({ ehlo: !!this.helo && this.esmtp, authenticated: this.auth !== null, inTransaction: this.txn !== null }),
      caps: () => this.caps,
      allowed: () => this.authAllowed(),
      queue: (r) => this.queue('AUTH', r),
      rules: (mechanism, login) => this.runRules('auth', () => ({ stage: 'auth', session: this.snapshot(), mechanism, login })),
      backend: () => this.ensureBackend(),
      authenticated: (mechanism, login) => {
        this.auth = { mechanism, login };
        this.deps.log.info({ session: this.id, mechanism, login }, 'authenticated');
      },
      flood: () => {
        this.violation('auth_flood');
        this.endReason = 'too-many-errors';
      },
      challenge: (r) => this.send(r),
      readLine: () => this.readLine(),
      isClosed: () => this.closed,
      setSasl: (on) => (this.framing.sasl = on),
      failed: (e) => this.backendFailed(e),
    });
    this.greeting = new Greeting({
      hostname: deps.hostname,
      limits: () => deps.limits,
      log: deps.log,
      session: this.id,
      client: this.client.text,
      connectRules: () => this.runRules('connect', () => ({ stage: 'connect', session: this.snapshot() })),
      isClosed: () => this.closed,
      send: (r) => this.send(r),
      sendContinued: (r) => this.out.sendContinued(r),
      ending: (reason) => (this.endReason = reason),
      refusedAtConnect: () => (this.refusedAtConnect = true),
      violation: (kind) => this.violation(kind),
      pump: () => this.pump(),
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

  /** The connect-stage rules and the greeting (greeting.ts); then commands are read. */
  start(): Promise<void> {
    return this.greeting.run();
  }

  /** SIGTERM deadline: tell the client and close. */
  shutdown(): void {
    if (this.closed) return;
    this.endReason = 'shutdown';
    this.send(R.shuttingDown(this.deps.hostname));
  }

  /** The backend connection this session uses (null before the client's HELO/EHLO). */
  private get backend(): BackendConnection | null {
    return this.link.conn;
  }

  /**
   * A backend for the next command (BackendLink.ensure); otherwise the client's reply, after
   * forgetting a HELO/EHLO the backend refused or noting why the session ends.
   */
  private async ensureBackend(): Promise<BackendConnection | Reply> {
    const got = await this.link.ensure();
    if (got instanceof BackendConnection) return got;
    if (got.forgetHelo) {
      this.helo = null;
      this.esmtp = false;
    }
    if (got.endReason) this.endReason = got.endReason;
    return got.reply;
  }

  private onBackendClosed(): void {
    if (this.data && !this.data.message.aborted) this.data.message.aborted = 'backend';
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

  /** A closing reply was written; the socket ends once it is flushed. */
  private get closing(): boolean {
    return this.out.closing;
  }

  /** The client does not read its replies: no command is executed until they drain. */
  private get clientCongested(): boolean {
    return this.out.congestedNow;
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
    if (!this.greeting.sent && !this.greeting.talked) return this.close('client-closed');
    const w = this.dataWaiter;
    this.dataWaiter = null;
    w?.();
    this.pump();
  }

  private onData(chunk: Buffer): void {
    if (this.closed || this.closing) return;
    if (!this.greeting.sent) {
      this.greeting.early(chunk);
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
      this.link.release(this.backend);
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
    this.out.send(r);
  }

  /** Waits for every queued reply, in order, and writes them in one go. */
  private flush(): Promise<void> {
    return this.out.flush();
  }

  /** Queues the reply of the command being handled, counted (ReplyWriter.answer). */
  private queue(verb: string, r: Pending, note?: (r: Reply) => void): void {
    this.out.answer(verb, r, this.commandStarted, note);
  }

  /** Adds tags not yet in `list`, at most `max` (default MAX_TAGS); the rest are counted for the log. */
  private addTags(list: string[], tags: readonly string[], max?: number): void {
    this.sessionLog.addTags(list, tags, max);
  }

  /** Writes the message's X-Doorman-Tag headers (distinct, at most MAX_TAG_HEADERS) to the backend. */
  private writeTags(...lists: (readonly string[])[]): void {
    const tags: string[] = [];
    for (const l of lists) this.addTags(tags, l, MAX_TAG_HEADERS);
    this.data?.message.writeTags(tags);
  }

  // ---------------------------------------------------------------- input loop

  private pump(): void {
    if (this.closed || this.closing || !this.greeting.sent) return;
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
        this.out.dropQueued();
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
        // The message in progress reads it (inbound.ts); false: the session ends (too slow).
        if (this.data && !(await this.data.chunk(ev))) return;
        continue;
      }
      if (this.out.congested()) return;
      const ev = this.framing.nextCommand();
      if (!ev) {
        if (this.out.queued === 0) {
          if (this.clientEnded) {
            // Every command was answered: end the session once the replies are written.
            if (this.endReason === 'closed') this.endReason = 'client-closed';
            return this.out.closeAfterWrite();
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
      if (this.out.queued >= MAX_QUEUED_REPLIES) await this.flush();
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
    this.commandStarted = performance.now();
    const g = this.guards.check(ev);
    if ('quit' in g) return this.quit();
    if ('reject' in g) {
      if (g.endReason) this.endReason = g.endReason;
      return this.reject(g.reject, g.reply);
    }
    const cmd = g.command;
    // Without backend PIPELINING every command waits for the previous reply.
    if (!pipelinable(cmd.verb) || !this.caps.has('PIPELINING')) await this.flush();
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
    AUTH: (c: Command) => this.authCommand.handle(c),
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
    this.link.bind(b, verb, name);
    this.helo = name;
    this.esmtp = verb === 'EHLO';
    this.txn = null;
    this.caps = verb === 'EHLO' ? b.offered : new Map();
    if (verb === 'HELO') return this.queue(verb, reply(250, '', this.deps.hostname));
    return this.queue(verb, reply(250, '', [this.deps.hostname, ...this.extensions()]));
  }

  /** The EHLO keywords (extensions.ts) for this session's backend, listener and state. */
  private extensions(): string[] {
    const mechs = authMechanisms(this.caps);
    const auth = mechs && this.authAllowed() && !this.auth ? mechs : null;
    return ehloKeywords(this.caps, this.sizeLimit(), { starttls: !!this.deps.listener.secureContext && !this.tls, auth });
  }

  /** The SIZE doorman advertises and enforces (extensions.ts). */
  private sizeLimit(): number {
    return sizeLimit(this.caps, this.deps.limits.maxMessageSize);
  }

  /** The client's message is over the advertised SIZE, or with doorman's headers over the backend's. */
  private oversized(d: Message): boolean {
    return oversized(this.framing.dataBytes, d.added, this.caps, this.deps.limits.maxMessageSize);
  }

  private authAllowed(): boolean {
    return this.tls || this.deps.listener.authPlaintext;
  }

  private async onMail(c: Command): Promise<void> {
    if (!this.helo) return this.queue('MAIL', R.needHelo());
    if (this.txn) return this.queue('MAIL', R.nestedMail());
    const p = parseMail(c.arg);
    if (!parsed(p)) return this.queue('MAIL', p);
    const log = this.sessionLog.newTxn(addressOf(p.path));
    const answer = (r: Pending) => this.queue('MAIL', r, (x) => (log.mail = x.code));
    const refused = mailRefused(p, this.caps, this.sizeLimit());
    if (refused) return answer(refused);
    this.txnNumber++;
    const v = await this.runRules('mail', () => ({ stage: 'mail', session: this.snapshot(), sender: p.path, params: p.params }));
    if (v.reply) return answer(v.reply);
    const b = await this.ensureBackend();
    if (!(b instanceof BackendConnection)) return answer(b);
    const txn = new Transaction(p.path, p.params, log, v.acceptedBy || undefined);
    this.addTags(txn.tags, v.tags);
    this.txn = txn;
    // Deferred: the syntax, parameters and size are checked here; the backend gets MAIL in one write
    // with the first RCPT the rules let through (a round trip less per message, none at all for a
    // transaction whose recipients are all refused here). Its refusal of the sender is then the
    // answer to that RCPT, as Postfix gives it with smtpd_delay_reject = yes.
    // Only in an ESMTP session: after HELO the backend has not offered PIPELINING to this client
    // (Postfix counts such commands as improper pipelining, smtpd_forbid_unauth_pipelining).
    if (this.deps.backend.deferMail && this.esmtp && b.pipelining) return answer(R.mailOk());
    answer(
      txn.sendMail(b, {
        refused: () => {
          if (this.txn === txn) this.txn = null;
        },
        failed: (e) => this.backendFailed(e),
      }),
    );
  }

  private async onRcpt(c: Command): Promise<void> {
    if (!this.helo) return this.queue('RCPT', R.needHelo());
    const txn = this.txn;
    if (!txn) return this.queue('RCPT', R.needMail());
    txn.rcptTried++;
    const p = parseRcpt(c.arg);
    if (!parsed(p)) return this.queue('RCPT', p);
    const to = addressOf(p.path);
    const answer = (r: Pending) =>
      this.queue('RCPT', r, (x) => this.sessionLog.noteRcpt(txn.log, to, x.code));
    const refused = txn.rcptRefused(p, this.caps, this.sizeLimit(), this.deps.limits.maxRecipients);
    if (refused) return answer(refused);
    const v = await this.runRules('rcpt', () => ({ stage: 'rcpt', session: this.snapshot(), recipient: p.path, params: p.params }));
    if (v.reply) return answer(v.reply);
    if (this.txn !== txn) return answer(R.needMail());
    const b = this.backend;
    if (!b?.alive) return answer(R.lostBackend(this.deps.hostname));
    if (txn.mailRefused) return answer(txn.mailRefused);
    this.addTags(txn.tags, v.tags);
    answer(txn.forwardRcpt(b, p, { sendMail: () => this.link.sendDeferredMail(b, txn), failed: (e) => this.backendFailed(e) }));
  }

  private onRset(c: Command): void {
    if (c.arg.trim()) return this.queue('RSET', R.syntax('RSET'));
    this.txn = null;
    this.queue('RSET', reset(this.backend));
  }

  private quit(): void {
    if (!this.refusedAtConnect) this.endReason = 'quit';
    this.queue('QUIT', R.bye(this.deps.hostname));
  }

  /** The STARTTLS command (starttls.ts); the session's socket and state after TLS. */
  private onStartTls(c: Command): Promise<void> {
    const { deps } = this;
    return startTls(
      {
        secureContext: deps.listener.secureContext,
        tls: this.tls,
        listener: deps.listener.name,
        metrics: deps.metrics,
        framing: this.framing,
        socket: this.socket,
        handshakeTimeout: deps.limits.tlsHandshakeTimeout,
        queue: (r) => this.queue('STARTTLS', r),
        send: (r) => this.send(r),
        injected: (bytes) => {
          this.violation('starttls_injection');
          deps.log.warn({ session: this.id, bytes }, 'plaintext after STARTTLS discarded');
        },
        replaceSocket: (secure) => {
          this.socket = secure;
          this.out.setSocket(secure);
          this.attach(secure);
        },
        failed: () => this.close('tls-failed'),
        secured: () => {
          this.tls = true;
          this.helo = null;
          this.esmtp = false;
          this.txn = null;
        },
      },
      c.arg,
    );
  }

  /** The ETRN command (etrn.ts). */
  private onEtrn(c: Command): Promise<void> {
    return etrn(
      {
        helo: !!this.helo,
        offered: this.caps.has('ETRN'),
        inTransaction: this.txn !== null,
        queue: (r) => this.queue('ETRN', r),
        rules: (node) => this.runRules('etrn', () => ({ stage: 'etrn', session: this.snapshot(), node })),
        backend: () => this.ensureBackend(),
        failed: (e) => this.backendFailed(e),
      },
      c.arg,
    );
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
    const inbound = new Inbound(b, { bdat, holdHeaders: hasHeaderRules }, txn.log, this.inboundHost());
    this.send(R.startData());
    this.deps.metrics.commands.inc({ verb: 'DATA', class: '3xx' });
    this.socket.setTimeout(this.deps.limits.dataTimeout);
    this.data = inbound;
    this.framing.beginData();
    if (!hasHeaderRules) this.writeTags(this.sessionTags, txn.tags);
  }

  /** What the message in progress needs of the session (inbound.ts). */
  private inboundHost(): InboundHost {
    const deps = this.deps;
    return {
      hostname: deps.hostname,
      limits: () => deps.limits,
      metrics: deps.metrics,
      framing: this.framing,
      hasDataEndRules: () => deps.rules.stages.has('data_end'),
      headerRules: (headers, truncated) => this.runRules('data_headers', () => ({ stage: 'data_headers', session: this.snapshot(), headers, truncated })),
      endRules: (size) => this.runRules('data_end', () => ({ stage: 'data_end', session: this.snapshot(), size })),
      feedBody: (chunks, last) => (this.pipe.wantsBody ? this.pipe.body(chunks, last, () => this.snapshot()) : undefined),
      writeTags: (extra) => this.writeTags(this.sessionTags, this.txn?.tags ?? [], extra),
      oversized: (m) => this.oversized(m),
      backendCongested: () => this.backendCongested,
      setBackendCongested: (v) => (this.backendCongested = v),
      pauseClient: () => this.socket.pause(),
      uncongest: () => this.uncongest(),
      isCurrent: (i) => this.data === i,
      failed: (e) => this.backendFailed(e),
      failedAtEndOfData: (e) => this.link.failedAtEndOfData(e),
      acceptedAfterRefusal: (refused, last) =>
        deps.log.warn({ session: this.id, backend: this.link.name, refused: describeReply(refused), last: describeReply(last) }, 'backend accepted a message after refusing a chunk of it; the client gets the refusal'),
      resumeIfRoom: () => {
        if (this.framing.buffered <= deps.limits.maxBuffered && !this.backendCongested) this.socket.resume();
      },
      destroyBackend: () => this.backend?.destroy(),
      setTimeout: (ms) => this.socket.setTimeout(ms),
      violation: (kind) => this.violation(kind),
      tooSlow: (r) => {
        this.endReason = 'timeout';
        this.send(r);
      },
      commandStarted: () => (this.commandStarted = performance.now()),
      delivered: () => this.guards.delivered(),
      finished: (r) => {
        this.data = null;
        this.txn = null;
        this.queue('DATA_END', r);
      },
    };
  }

  /** A backend failure during a command: the client gets 421 and the session ends. */
  private backendFailed(e: unknown): Reply {
    return this.link.failed(e);
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

  /** The session's log line was written (it ended). */
  private get logged(): boolean {
    return this.sessionLog.written;
  }

  private logSession(): void {
    this.sessionLog.write({
      session: this.id,
      client: this.client.text,
      port: this.peer.port,
      listener: this.deps.listener.name,
      backend: this.link.name,
      helo: this.helo,
      tls: this.tls,
      login: this.auth?.login ?? null,
      outcomes: this.outcomes,
      droppedOutcomes: this.droppedOutcomes,
      outcome: this.endReason,
      commands: this.guards.commands,
      errors: this.out.errors,
      started: this.started,
    });
  }
}

const ID_PREFIX = `${process.pid.toString(36)}${Date.now().toString(36)}`;
let idCounter = 0;
function nextSessionId(): string {
  idCounter = (idCounter + 1) % 2_176_782_336; // 36^6
  return `${ID_PREFIX}${idCounter.toString(36).padStart(6, '0')}`;
}
