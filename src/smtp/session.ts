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
 * the input loop, dispatch, the start of DATA and the one-line commands; what it knows lives in
 * one SessionState (state.ts) its parts share, and the command handlers take the session itself
 * as their context (context.ts). Its parts:
 *   state.ts         client, listener, TLS, HELO, login, transaction, tags, end reason, snapshot;
 *   stages.ts        its side of the rule pipeline: events$, each stage's verdict, findings for the log;
 *   envelope.ts      HELO/EHLO, MAIL, RCPT and RSET;
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
import type net from 'node:net';
import { TLSSocket } from 'node:tls';
import { BackendConnection } from '../backend/connection.js';
import type { ProxiedAddress } from '../backend/proxy-protocol.js';
import { addressOf } from '../protocol/address.js';
import { formatAuthResults } from '../protocol/auth-results.js';
import { describeReply, R, reply, type Reply } from '../protocol/reply.js';
import { AuthCommand } from './auth.js';
import { BackendLink } from './backend-link.js';
import type { Command } from './commands.js';
import type { SessionContext } from './context.js';
import { oversized } from './data.js';
import { authAllowed, helo, mail, rcpt, rset } from './envelope.js';
import { etrn } from './etrn.js';
import { Framing, type CommandEvent } from './framing.js';
import { Greeting } from './greeting.js';
import { Guards, pipelinable } from './guards.js';
import { Inbound, type InboundHost } from './inbound.js';
import { MAX_TAG_HEADERS, type Message } from './message.js';
import { ReplyWriter, type Pending } from './reply-writer.js';
import { SessionLog } from './session-log.js';
import { SessionStages } from './stages.js';
import { Spool } from './spool.js';
import { startTls } from './starttls.js';
import { SessionState, type SessionDeps } from './state.js';
import { authResultsField, MAX_AUTH_RESULTS_OCTETS, receivedField } from './trace.js';

export type { ListenerRuntime, SessionDeps } from './state.js';

/** Keep at most this many unanswered pipelined commands before writing replies. */
const MAX_QUEUED_REPLIES = 100;

export class Session implements SessionContext {
  /** What the session knows, shared with its parts (state.ts). */
  readonly state: SessionState;
  /** The session's side of the rule pipeline: events$, each stage's verdict (stages.ts). */
  readonly stages: SessionStages;
  /** The backend connection this session uses, and how it gets one. */
  readonly link: BackendLink;
  readonly sessionLog: SessionLog;
  /** Resolves when the session has ended. */
  readonly done: Promise<void>;
  private socket: net.Socket;
  private readonly framing: Framing;
  /** Every byte to the client: replies, queued or now, and output back-pressure. */
  private readonly out: ReplyWriter;
  /** The connect-stage rules, the greeting and pregreet (greeting.ts). */
  private readonly greeting: Greeting;
  /** The guard prelude's checks and counters (commands, unknown, junk). */
  private readonly guards: Guards;
  /** The AUTH command: its checks, rules, relay and failure count (auth.ts). */
  private readonly authCommand: AuthCommand;
  /** The message in progress (DATA or BDAT towards the backend); null outside one. */
  private data: Inbound | null = null;
  private pumping = false;
  private repump = false;
  /** When the current incomplete command line started arriving (0: none). */
  private partialSince = 0;
  private closed = false;
  private dataWaiter: (() => void) | null = null;
  /** The client half-closed: what it sent is still executed and answered, then the session ends. */
  private clientEnded = false;
  private backendCongested = false;
  /** When the command being handled was taken from the input (for doorman_command_duration_seconds). */
  private commandStarted = 0;
  private resolveDone!: () => void;

  constructor(
    socket: net.Socket,
    peer: ProxiedAddress,
    readonly deps: SessionDeps,
    opts: { tls: boolean; initial?: Buffer },
  ) {
    this.socket = socket;
    const s = (this.state = new SessionState(peer, deps.listener, opts.tls));
    const l = deps.limits;
    this.framing = new Framing({
      maxCommandLine: l.maxCommandLine,
      extensionAllowance: l.extensionAllowance,
      maxAuthLine: l.maxAuthLine,
      maxDataLine: l.maxDataLine,
      bareNewline: l.bareNewline,
    });
    this.sessionLog = new SessionLog(deps.log);
    this.stages = new SessionStages(s, deps, this.sessionLog);
    this.guards = new Guards({
      hostname: deps.hostname,
      get limits() {
        return deps.limits;
      },
      violation: (kind) => this.violation(kind),
      refusedAtConnect: () => s.refusedAtConnect,
    });
    this.link = new BackendLink(
      deps,
      { ...peer, address: s.client.text },
      {
        sessionId: s.id,
        isClosed: () => this.closed,
        hello: () => (s.helo ? { verb: s.esmtp ? 'EHLO' : 'HELO', name: s.helo } : null),
        authenticated: () => s.auth !== null,
        onClosed: () => this.onBackendClosed(),
        onFailed: () => (s.endReason = 'backend-failed'),
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
      close: () => this.close(s.endReason),
      tooManyErrors: () => (s.endReason = 'too-many-errors'),
      writeTimedOut: (unread) => {
        this.violation('write_timeout');
        deps.log.warn({ session: s.id, client: s.client.text, unread, ms: deps.limits.writeTimeout }, 'client does not read its replies: dropped');
        s.endReason = 'write-timeout';
        this.close('write-timeout');
      },
      drained: (sock) => {
        if (!this.backendCongested) sock.resume();
        this.pump();
      },
    });
    this.authCommand = new AuthCommand({
      hostname: deps.hostname,
      maxFailures: () => deps.limits.maxAuthFailures,
      state: () => ({ ehlo: !!s.helo && s.esmtp, authenticated: s.auth !== null, inTransaction: s.txn !== null }),
      caps: () => s.caps,
      allowed: () => authAllowed(this),
      queue: (r) => this.queue('AUTH', r),
      rules: (mechanism, login) => this.stages.run('auth', () => ({ stage: 'auth', session: s.snapshot(), mechanism, login })),
      backend: () => this.ensureBackend(),
      authenticated: (mechanism, login) => {
        s.auth = { mechanism, login };
        deps.log.info({ session: s.id, mechanism, login }, 'authenticated');
      },
      flood: () => {
        this.violation('auth_flood');
        s.endReason = 'too-many-errors';
      },
      challenge: (r) => this.out.send(r),
      readLine: () => this.readLine(),
      isClosed: () => this.closed,
      setSasl: (on) => (this.framing.sasl = on),
      failed: (e) => this.link.failed(e),
    });
    this.greeting = new Greeting({
      hostname: deps.hostname,
      limits: () => deps.limits,
      log: deps.log,
      session: s.id,
      client: s.client.text,
      connectRules: () => this.stages.run('connect', () => ({ stage: 'connect', session: s.snapshot() })),
      isClosed: () => this.closed,
      send: (r) => this.out.send(r),
      sendContinued: (r) => this.out.sendContinued(r),
      ending: (reason) => (s.endReason = reason),
      refusedAtConnect: () => (s.refusedAtConnect = true),
      violation: (kind) => this.violation(kind),
      pump: () => this.pump(),
    });
    this.done = new Promise((r) => (this.resolveDone = r));
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
    this.state.endReason = 'shutdown';
    this.out.send(R.shuttingDown(this.deps.hostname));
  }

  async ensureBackend(): Promise<BackendConnection | Reply> {
    const got = await this.link.ensure();
    if (got instanceof BackendConnection) return got;
    if (got.forgetHelo) this.state.forgetHelo();
    if (got.endReason) this.state.endReason = got.endReason;
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
    if (!this.out.congestedNow) this.socket.resume();
    this.pump();
  }

  private attach(socket: net.Socket): void {
    socket.setNoDelay(true);
    socket.setTimeout(this.deps.limits.commandTimeout);
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('timeout', () => {
      this.state.endReason = 'timeout';
      this.out.send(R.timeout(this.deps.hostname));
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
    this.wake();
  }

  private onData(chunk: Buffer): void {
    if (this.closed || this.out.closing) return;
    if (!this.greeting.sent) {
      this.greeting.early(chunk);
    } else if (this.partialSince && !this.framing.inData && Date.now() - this.partialSince > this.deps.limits.commandTimeout) {
      // Slowloris: bytes trickle in, but no command completes within the command timeout.
      this.violation('slow_client');
      this.state.endReason = 'timeout';
      this.out.send(R.timeout(this.deps.hostname));
      return;
    }
    this.framing.push(chunk);
    if (this.framing.buffered > this.deps.limits.maxBuffered) this.socket.pause();
    this.wake();
  }

  /** Wakes a handler waiting for the client's next line (readLine), then runs the input loop. */
  private wake(): void {
    const w = this.dataWaiter;
    this.dataWaiter = null;
    w?.();
    this.pump();
  }

  private close(reason: string): void {
    if (this.closed) return;
    this.closed = true;
    const s = this.state;
    if (s.endReason === 'closed') s.endReason = reason;
    const w = this.dataWaiter;
    this.dataWaiter = null;
    w?.();
    if (this.data) {
      // Client vanished mid-DATA: the backend must never see an end of data.
      this.link.conn?.destroy();
      this.data.dispose();
    } else if (this.link.conn) {
      this.link.release(this.link.conn);
    }
    this.socket.destroy();
    this.stages.end();
    this.sessionLog.write({
      session: s.id,
      client: s.client.text,
      port: s.peer.port,
      listener: this.deps.listener.name,
      backend: this.link.name,
      helo: s.helo,
      tls: s.tls,
      login: s.auth?.login ?? null,
      outcomes: this.stages.outcomes,
      droppedOutcomes: this.stages.droppedOutcomes,
      outcome: s.endReason,
      commands: this.guards.commands,
      errors: this.out.errors,
      started: s.started,
    });
    this.resolveDone();
  }

  // ---------------------------------------------------------------- output

  queue(verb: string, r: Pending, note?: (r: Reply) => void): void {
    this.out.answer(verb, r, this.commandStarted, note);
  }

  /**
   * Writes doorman's header fields before the message (trace.ts): Received when the backend
   * cannot be told the client (backend.traceHeader), Authentication-Results when the rules
   * authenticated something (backend.authResults), the X-Doorman-Tag headers of `lists`
   * (distinct, at most MAX_TAG_HEADERS).
   */
  private writeHeaders(...lists: (readonly string[])[]): void {
    const { state: s, deps } = this;
    const tags: string[] = [];
    for (const l of lists) this.sessionLog.addTags(tags, l, MAX_TAG_HEADERS);
    const fields: string[] = [];
    const results = s.txn?.authResults ?? [];
    if (deps.backend.authResults && results.length) fields.push(authResultsField(formatAuthResults(deps.hostname, results, { fold: true, maxOctets: MAX_AUTH_RESULTS_OCTETS })));
    const trace = deps.backend.traceHeader;
    if (trace === 'always' || (trace === 'auto' && this.link.conn && !this.link.conn.knowsClient)) fields.push(this.received());
    this.data?.message.writeHeaders(fields, tags);
  }

  private received(): string {
    const s = this.state;
    const sock = this.socket;
    const tls = sock instanceof TLSSocket ? { protocol: sock.getProtocol(), cipher: sock.getCipher()?.name ?? null } : null;
    const rcpts = s.txn?.rcpts ?? [];
    const only = rcpts.length === 1 && rcpts[0] ? addressOf(rcpts[0]) : null;
    return receivedField({ hostname: this.deps.hostname, sessionId: s.id, clientAddress: s.client.text, helo: s.helo, esmtp: s.esmtp, tls, authenticated: s.auth !== null, recipient: only, date: new Date() });
  }

  // ---------------------------------------------------------------- input loop

  private pump(): void {
    if (this.closed || this.out.closing || !this.greeting.sent) return;
    if (this.pumping) {
      // Asked while the loop is finishing (e.g. a 'drain' in a nextTick): run again after it.
      this.repump = true;
      return;
    }
    this.pumping = true;
    this.repump = false;
    this.loop()
      .catch((err: unknown) => {
        this.deps.log.error({ session: this.state.id, err: err instanceof Error ? err.stack : String(err) }, 'session error');
        this.state.endReason = 'internal-error';
        this.out.dropQueued();
        this.out.send(reply(421, '4.3.0', `${this.deps.hostname} Error: internal error, closing connection`));
      })
      .finally(() => {
        this.pumping = false;
        if (!this.closed && this.framing.buffered <= this.deps.limits.maxBuffered && !this.backendCongested && !this.out.congestedNow) this.socket.resume();
        if (this.repump) this.pump();
      });
  }

  private async loop(): Promise<void> {
    while (!this.closed && !this.out.closing) {
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
            if (this.state.endReason === 'closed') this.state.endReason = 'client-closed';
            return this.out.closeAfterWrite();
          }
          if (this.framing.buffered > 0 && !this.partialSince) this.partialSince = Date.now();
          return;
        }
        await this.out.flush();
        continue;
      }
      this.partialSince = 0;
      this.socket.resume();
      await this.onCommandEvent(ev);
      if (this.out.queued >= MAX_QUEUED_REPLIES) await this.out.flush();
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

  private async onCommandEvent(ev: CommandEvent): Promise<void> {
    this.commandStarted = performance.now();
    const g = this.guards.check(ev);
    if ('quit' in g) return this.quit();
    if ('reject' in g) {
      if (g.endReason) this.state.endReason = g.endReason;
      return this.queue(g.reject, g.reply);
    }
    const cmd = g.command;
    // Without backend PIPELINING every command waits for the previous reply.
    if (!pipelinable(cmd.verb) || !this.state.caps.has('PIPELINING')) await this.out.flush();
    if (this.closed || this.out.closing) return;
    const handler = this.handlers[cmd.verb as keyof Session['handlers']];
    await handler(cmd);
  }

  private violation(kind: string): void {
    this.deps.metrics.protocolViolations.inc({ kind });
  }

  private readonly handlers = {
    HELO: (c: Command) => helo(this, c, 'HELO'),
    EHLO: (c: Command) => helo(this, c, 'EHLO'),
    MAIL: (c: Command) => mail(this, c),
    RCPT: (c: Command) => rcpt(this, c),
    DATA: (c: Command) => this.onDataCommand(c),
    RSET: (c: Command) => rset(this, c),
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

  private quit(): void {
    if (!this.state.refusedAtConnect) this.state.endReason = 'quit';
    this.queue('QUIT', R.bye(this.deps.hostname));
  }

  /** The STARTTLS command (starttls.ts); the session's socket and state after TLS. */
  private onStartTls(c: Command): Promise<void> {
    const { deps, state: s } = this;
    return startTls(
      {
        secureContext: deps.listener.secureContext,
        tls: s.tls,
        listener: deps.listener.name,
        metrics: deps.metrics,
        framing: this.framing,
        socket: this.socket,
        handshakeTimeout: deps.limits.tlsHandshakeTimeout,
        queue: (r) => this.queue('STARTTLS', r),
        send: (r) => this.out.send(r),
        injected: (bytes) => {
          this.violation('starttls_injection');
          deps.log.warn({ session: s.id, bytes }, 'plaintext after STARTTLS discarded');
        },
        replaceSocket: (secure) => {
          this.socket = secure;
          this.out.setSocket(secure);
          this.attach(secure);
        },
        failed: () => this.close('tls-failed'),
        secured: () => {
          s.tls = true;
          s.forgetHelo();
          s.txn = null;
        },
      },
      c.arg,
    );
  }

  /** The ETRN command (etrn.ts). */
  private onEtrn(c: Command): Promise<void> {
    const s = this.state;
    return etrn(
      {
        helo: !!s.helo,
        offered: s.caps.has('ETRN'),
        inTransaction: s.txn !== null,
        queue: (r) => this.queue('ETRN', r),
        rules: (node) => this.stages.run('etrn', () => ({ stage: 'etrn', session: s.snapshot(), node })),
        backend: () => this.ensureBackend(),
        failed: (e) => this.link.failed(e),
      },
      c.arg,
    );
  }

  // ---------------------------------------------------------------- DATA

  private onDataCommand(c: Command): void {
    const s = this.state;
    if (!s.helo) return this.queue('DATA', R.needHelo());
    const txn = s.txn;
    if (!txn) return this.queue('DATA', R.needMail());
    if (c.arg.trim()) return this.queue('DATA', R.syntax('DATA'));
    if (txn.rcpts.length === 0) return this.queue('DATA', txn.rcptTried > 0 ? R.noValidRcpt() : R.needRcpt());
    const b = this.link.conn;
    if (!b?.alive) {
      s.txn = null;
      return this.queue('DATA', R.lostBackend(this.deps.hostname));
    }
    // 354 is answered at once (the backend's DATA reply is awaited in parallel): the client starts
    // sending a round trip earlier. Nothing goes to the backend before its own 354 — the bytes wait
    // in `early` (bounded by back-pressure); if the backend refuses DATA, the message is read to its
    // end and the client gets the backend's refusal then.
    // A session recorded with its header blocks (record.headers) holds them as for header rules.
    const hasHeaderRules = this.deps.rules.stages.has('data_headers') || this.stages.recorder?.wantsHeaders === true;
    // The header block is held for the data_headers rules, and to remove Authentication-Results
    // claiming doorman's name; the whole message, when a rule reads the body (its verdict may
    // add header fields, which must precede the body).
    const holdHeaders = hasHeaderRules || this.deps.backend.authResults;
    const spool = this.stages.readsBody ? new Spool(this.deps.limits.holdInMemory, this.deps.backend.spoolDir) : null;
    // BDAT towards a backend that takes it, in an ESMTP session (the client said EHLO): the
    // message goes with its size, without DATA and the backend's 354.
    const bdat = this.deps.backend.chunking && s.esmtp && b.chunking;
    const authservId = this.deps.backend.authResults ? this.deps.hostname : null;
    const inbound = new Inbound(b, { bdat, holdHeaders, authservId, spool }, txn.log, this.inboundHost());
    this.out.send(R.startData());
    this.deps.metrics.commands.inc({ verb: 'DATA', class: '3xx' });
    this.socket.setTimeout(this.deps.limits.dataTimeout);
    this.data = inbound;
    this.framing.beginData();
    if (!holdHeaders && !spool) this.writeHeaders(s.tags, txn.tags);
  }

  /** What the message in progress needs of the session (inbound.ts). */
  private inboundHost(): InboundHost {
    const { deps, state: s } = this;
    return {
      hostname: deps.hostname,
      limits: () => deps.limits,
      metrics: deps.metrics,
      framing: this.framing,
      hasDataEndRules: () => deps.rules.stages.has('data_end'),
      headerRules: (headers, truncated) => this.stages.run('data_headers', () => ({ stage: 'data_headers', session: s.snapshot(), headers, truncated })),
      endRules: (size) => this.stages.run('data_end', () => ({ stage: 'data_end', session: s.snapshot(), size })),
      feedBody: (chunks, last) => this.stages.body(chunks, last),
      writeHeaders: (extra) => this.writeHeaders(s.tags, s.txn?.tags ?? [], extra),
      oversized: (m: Message) => oversized(this.framing.dataBytes, m.added, s.caps, deps.limits.maxMessageSize),
      backendCongested: () => this.backendCongested,
      setBackendCongested: (v) => (this.backendCongested = v),
      pauseClient: () => this.socket.pause(),
      uncongest: () => this.uncongest(),
      isCurrent: (i) => this.data === i,
      failed: (e) => this.link.failed(e),
      failedAtEndOfData: (e) => this.link.failedAtEndOfData(e),
      acceptedAfterRefusal: (refused, last) =>
        deps.log.warn({ session: s.id, backend: this.link.name, refused: describeReply(refused), last: describeReply(last) }, 'backend accepted a message after refusing a chunk of it; the client gets the refusal'),
      resumeIfRoom: () => {
        if (this.framing.buffered <= deps.limits.maxBuffered && !this.backendCongested) this.socket.resume();
      },
      destroyBackend: () => this.link.conn?.destroy(),
      setTimeout: (ms) => this.socket.setTimeout(ms),
      violation: (kind) => this.violation(kind),
      tooSlow: (r) => {
        s.endReason = 'timeout';
        this.out.send(r);
      },
      commandStarted: () => (this.commandStarted = performance.now()),
      delivered: () => this.guards.delivered(),
      finished: (r) => {
        this.data = null;
        s.txn = null;
        this.queue('DATA_END', r);
      },
    };
  }
}
