/**
 * connection.ts — one SMTP client connection to the backend MTA.
 *
 * Opens the TCP connection (optionally sending a PROXY protocol header first), reads the
 * greeting, says EHLO, upgrades with STARTTLS when the backend offers it (policy `auto`). When
 * the client has said HELO/EHLO, `bind` passes the real client to Postfix with XCLIENT (its HELO
 * name included, so no EHLO follows; the command is built in xclient.ts), or sends the client's
 * HELO/EHLO. It is a command FIFO:
 * `command()` may be called several times without waiting (backend PIPELINING); replies are
 * matched to commands in order. DATA bytes are written raw with back-pressure (`writeData`
 * returns false until `drain`).
 *
 * Every wait has a deadline (connect, greeting, command, end of data). Any failure — refused,
 * timed out, closed, garbage — rejects the pending commands with a BackendError and destroys
 * the socket; the session turns that into a 4xx for the client, never a 250.
 */
import net from 'node:net';
import tls from 'node:tls';
import { EventEmitter } from 'node:events';
import { parseReplyLines, replyClass, type Reply } from '../protocol/reply.js';
import { proxyHeaderV1, proxyHeaderV2 } from './proxy-protocol.js';
import { xclientAttributes, xclientCommand, type ClientIdentity } from './xclient.js';

export { xtext, type ClientIdentity } from './xclient.js';

export interface BackendOptions {
  host: string;
  port: number;
  /** Name doorman gives in its own EHLO to the backend. */
  heloName: string;
  /** TCP connect deadline, ms. */
  connectTimeout: number;
  /** Deadline for the backend's greeting, ms. */
  greetingTimeout: number;
  /** Deadline for a reply to a command, ms. */
  commandTimeout: number;
  /** Deadline for the reply to the end of data, ms. */
  dataTimeout: number;
  /** STARTTLS towards the backend: when offered (`auto`), never, or required. */
  starttls: 'auto' | 'off' | 'require';
  /** Verify the backend's certificate. */
  tlsVerify: boolean;
  /** Pass the client with XCLIENT when the backend offers it. */
  xclient: boolean;
  /** Send the client's HELO name and protocol inside XCLIENT (HELO=, PROTO=) instead of its EHLO after it. */
  xclientHelo: boolean;
  /** Relay DATA as BDAT to a backend that offers CHUNKING and PIPELINING. */
  chunking: boolean;
  /** Answer MAIL locally and send it with the first RCPT to a backend that offers PIPELINING. */
  deferMail: boolean;
  /** Send a PROXY protocol header to the backend. */
  proxyProtocol: 'off' | 'v1' | 'v2';
  /** A Received: field when the backend cannot be told the client (`auto`), always, or never. */
  traceHeader: 'auto' | 'always' | 'never';
  /** Authentication-Results on messages the rules authenticated. */
  authResults: boolean;
  /** Where a held message past limits.holdInMemory is spooled ('' = temporary folder). */
  spoolDir: string;
}

export type BackendFailure = 'connect' | 'timeout' | 'closed' | 'protocol' | 'refused' | 'tls';

export class BackendError extends Error {
  constructor(
    readonly kind: BackendFailure,
    message: string,
    readonly reply?: Reply,
    /** The backend refused doorman in its greeting (any code: the client gets 421 4.4.1, never a 5xx). */
    readonly atGreeting = false,
  ) {
    // Operational failures, not bugs: no stack trace (capturing one costs more than the rest).
    const limit = Error.stackTraceLimit;
    Error.stackTraceLimit = 0;
    super(message);
    Error.stackTraceLimit = limit;
    this.name = 'BackendError';
  }
}

/** EHLO keywords → their parameters (upper-cased keyword). */
export type Capabilities = Map<string, string>;

export function parseCapabilities(r: Reply): Capabilities {
  const caps: Capabilities = new Map();
  for (const line of r.lines.slice(1)) {
    const [kw, ...rest] = line.trim().split(/\s+/);
    if (kw) caps.set(kw.toUpperCase(), rest.join(' '));
  }
  return caps;
}

interface Pending {
  resolve: (r: Reply) => void;
  reject: (e: BackendError) => void;
  timeout: number;
  what: string;
  sent: number;
  /** Part of a SASL exchange (AUTH or a response to its 334): its reply says whether one is open. */
  sasl?: boolean;
  /** A DATA command: its 354 puts the connection in message mode. */
  data?: boolean;
}

const DOT_CRLF = Buffer.from('.\r\n');

/** Longest reply line and whole reply accepted from the backend (garbage protection). */
const MAX_REPLY_LINE = 4096;
const MAX_REPLY_LINES = 200;

export class BackendConnection extends EventEmitter {
  private socket: net.Socket;
  private buf = '';
  private lines: string[] = [];
  private pending: Pending[] = [];
  private timer: NodeJS.Timeout | null = null;
  private failure: BackendError | null = null;
  /** Capabilities from the last EHLO answered 250 (doorman's own, or a bound client's). */
  caps: Capabilities = new Map();
  /**
   * Capabilities from doorman's own EHLO when the connection was prepared (after STARTTLS): what
   * the backend offers doorman, and what doorman offers every client bound to this connection —
   * never what the backend told an earlier client of it (that may differ per client).
   */
  offered: Capabilities = new Map();
  /** The TLS state towards the backend. */
  tls = false;
  /** Milliseconds from connect() to the greeting. */
  connectMs = 0;
  /** Called with each reply, the command it answers and the round trip in ms (metrics). */
  onReply: ((command: string, reply: Reply, ms: number) => void) | null = null;

  private constructor(
    socket: net.Socket,
    private readonly opts: BackendOptions,
  ) {
    super();
    this.socket = socket;
    this.attach(socket);
  }

  /**
   * Connects and prepares a session: greeting, EHLO, STARTTLS (policy), EHLO again, XCLIENT.
   * Rejects with BackendError when the backend cannot take the session.
   */
  static async open(opts: BackendOptions, client: ClientIdentity): Promise<BackendConnection> {
    const started = Date.now();
    const socket = await connect(opts, client);
    const conn = new BackendConnection(socket, opts);
    try {
      const greeting = await conn.expect(opts.greetingTimeout, 'GREETING');
      if (greeting.code !== 220) {
        throw new BackendError('refused', `greeting ${greeting.code}`, greeting, true);
      }
      conn.connectMs = Date.now() - started;
      await conn.ehlo(opts.heloName);
      if (opts.starttls !== 'off' && conn.caps.has('STARTTLS')) {
        await conn.startTls();
        await conn.ehlo(opts.heloName);
      } else if (opts.starttls === 'require') {
        throw new BackendError('tls', 'backend offers no STARTTLS');
      }
      conn.offered = conn.caps;
      // XCLIENT is sent when the client has said HELO/EHLO (bind), its name along.
      if (opts.xclient) conn.xclientAllowed = xclientAttributes(conn.caps.get('XCLIENT'));
      return conn;
    } catch (err) {
      conn.destroy();
      throw err instanceof BackendError ? err : new BackendError('protocol', String(err));
    }
  }

  private async ehlo(name: string): Promise<Reply> {
    const r = await this.command(`EHLO ${name}`);
    if (r.code !== 250) throw new BackendError('refused', `EHLO ${r.code}`, r);
    this.caps = parseCapabilities(r);
    return r;
  }

  private async startTls(): Promise<void> {
    const r = await this.command('STARTTLS');
    if (r.code !== 220) {
      if (this.opts.starttls === 'require') throw new BackendError('tls', `STARTTLS ${r.code}`, r);
      return;
    }
    const plain = this.socket;
    plain.removeAllListeners('data');
    plain.removeAllListeners('close');
    plain.removeAllListeners('error');
    plain.on('error', () => undefined);
    const secure = await new Promise<tls.TLSSocket>((resolve, reject) => {
      const s = tls.connect({
        socket: plain,
        rejectUnauthorized: this.opts.tlsVerify,
        servername: net.isIP(this.opts.host) ? undefined : this.opts.host,
      });
      const t = setTimeout(() => reject(new BackendError('timeout', 'TLS handshake timeout')), this.opts.commandTimeout);
      s.once('secureConnect', () => {
        clearTimeout(t);
        resolve(s);
      });
      s.once('error', (e) => {
        clearTimeout(t);
        reject(new BackendError('tls', `TLS: ${e.message}`));
      });
    });
    this.socket = secure;
    this.attach(secure);
    this.tls = true;
  }

  /** XCLIENT attributes the backend listed at connect; null when XCLIENT is not in use. */
  private xclientAllowed: Set<string> | null = null;
  /**
   * The backend accepted an XCLIENT: it now takes the connection for that client, and judges any
   * further XCLIENT by that client's address (Postfix checks smtpd_authorized_xclient_hosts against
   * the overridden address: a client from the internet is never authorized). The connection serves
   * that one client to its end and is never pooled.
   */
  private xclientBound = false;
  /** A MAIL was sent and its transaction has not ended yet (end of data, RSET, HELO/EHLO, XCLIENT). */
  private inTransaction = false;
  /** The backend waits for a SASL response (its last AUTH reply was 334). */
  private saslOpen = false;
  /** The backend accepted an AUTH (235): the connection speaks for that login from now on. */
  private authenticated = false;
  /** The backend answered DATA with 354 and has not seen the end of data: bytes are message text. */
  private dataOpen = false;

  /** The backend holds a transaction (a MAIL was sent and not ended): RSET has something to reset. */
  get transactionOpen(): boolean {
    return this.inTransaction;
  }

  /**
   * Binds the connection to a client that has said HELO/EHLO (a new connection, a spare taken from
   * the pool, or the same client's HELO/EHLO again, e.g. after STARTTLS). With XCLIENT: one command
   * carrying the client's address, port, reverse name and — where the backend takes them (Postfix:
   * HELO, PROTO) — its HELO name and protocol, so no EHLO has to follow; once per connection (a
   * connection already bound to the client gets its later HELO/EHLO as sent: a second XCLIENT would
   * be judged by the client's own address, and refused). Without XCLIENT (or without its HELO
   * attribute) the client's HELO/EHLO is sent as given. A transaction left open is reset first
   * (RSET, and its reply awaited).
   *
   * Resolves null when bound, or with the backend's refusal of the HELO/EHLO (for the client);
   * rejects with a BackendError when XCLIENT is refused or the connection is lost.
   */
  async bind(client: ClientIdentity, helo: { verb: 'EHLO' | 'HELO'; name: string }): Promise<Reply | null> {
    // XCLIENT is refused inside a transaction (an EHLO would reset it anyway, but one step at a time).
    if (this.inTransaction) await this.command('RSET').catch(() => undefined);
    const allowed = this.xclientAllowed;
    let heloSent = false;
    if (allowed && !this.xclientBound) {
      const x = xclientCommand(allowed, client, helo, this.opts.xclientHelo);
      heloSent = x.heloSent;
      const r = await this.command(x.line);
      // Postfix answers 220 (a new greeting).
      if (replyClass(r) !== 2) {
        this.destroy();
        throw new BackendError('refused', `XCLIENT ${r.code}`, r);
      }
      this.xclientBound = true;
      this.inTransaction = false;
    }
    if (heloSent) return null;
    const r = await this.command(`${helo.verb} ${helo.name}`);
    if (r.code !== 250) return r;
    if (helo.verb === 'EHLO') this.caps = parseCapabilities(r);
    this.inTransaction = false;
    return null;
  }

  /** Sends one command line; resolves with its reply. May be called again before it resolves. */
  command(line: string, timeout = this.opts.commandTimeout): Promise<Reply> {
    if (/[\r\n\0]/.test(line)) return Promise.reject(new BackendError('protocol', 'refusing to send CR/LF/NUL'));
    const verb = line.split(' ')[0] ?? line;
    // SASL responses are not commands: never let a credential become a metric label.
    const response = this.saslOpen || !/^[A-Z]{4,8}$/.test(verb);
    const p = this.expect(timeout, response ? 'AUTH_RESPONSE' : verb, { sasl: response || verb === 'AUTH', data: verb === 'DATA' });
    // Sent: the backend's state is unknown until the reply (it stays not reusable while pending).
    if (response) this.saslOpen = false;
    if (!this.failure) {
      this.batch();
      this.socket.write(`${line}\r\n`);
    }
    if (verb === 'MAIL') this.inTransaction = true;
    else if (verb === 'RSET') this.inTransaction = false;
    return p;
  }

  private corked = false;

  /**
   * Commands issued in one turn of the event loop go out in one write: the socket is corked at the
   * first and uncorked once the current work (its microtasks included) is done — before any wait
   * for I/O, so a command is never held back from a reply it waits for. With PIPELINING that is a
   * client's pipelined group (or a deferred MAIL with its RCPT) in one segment, not one per command.
   */
  private batch(): void {
    if (this.corked) return;
    this.corked = true;
    const socket = this.socket; // STARTTLS replaces it; uncork the one corked
    socket.cork();
    process.nextTick(() => {
      this.corked = false;
      socket.uncork();
    });
  }

  /** The backend takes pipelined commands (RFC 2920). */
  get pipelining(): boolean {
    return this.caps.has('PIPELINING');
  }

  /** Writes message bytes (already dot-stuffed, CRLF). Returns false under back-pressure. */
  writeData(chunk: Buffer): boolean {
    if (this.failure) return true;
    return this.socket.write(chunk);
  }

  /** BDAT is usable: the backend offers CHUNKING and PIPELINING (chunks go without waiting). */
  get chunking(): boolean {
    return this.caps.has('CHUNKING') && this.pipelining;
  }

  /**
   * One BDAT chunk (RFC 3030) with its command in one write: octets as the backend stores them
   * (no dot-stuffing). `last` ends the message; its reply is the message's. Returns the reply and
   * whether the socket took the write without back-pressure.
   */
  bdat(body: readonly Buffer[], last: boolean): { reply: Promise<Reply>; ok: boolean } {
    const size = body.reduce((n, b) => n + b.length, 0);
    const reply = this.expect(last ? this.opts.dataTimeout : this.opts.commandTimeout, last ? 'DATA_END' : 'BDAT');
    if (last) this.inTransaction = false;
    if (this.failure) return { reply, ok: true };
    const ok = this.socket.write(Buffer.concat([Buffer.from(`BDAT ${size}${last ? ' LAST' : ''}\r\n`, 'latin1'), ...body]));
    return { reply, ok };
  }

  /** Ends the message (CRLF.CRLF is completed by ".\r\n") and waits for the final reply. */
  endData(tail: readonly Buffer[] = []): Promise<Reply> {
    const p = this.expect(this.opts.dataTimeout, 'DATA_END');
    this.inTransaction = false;
    this.dataOpen = false;
    // The message's last bytes and the final "." go out in one write.
    if (!this.failure) this.socket.write(tail.length ? Buffer.concat([...tail, DOT_CRLF]) : DOT_CRLF);
    return p;
  }

  /** No command is waiting for its reply. */
  get quiet(): boolean {
    return this.pending.length === 0 && this.failure === null;
  }

  /**
   * Whether this connection can carry another client: its state is known to be clean — nothing
   * pending, no SASL exchange waiting for a response, not authenticated as a client's login, not
   * inside DATA — and it was never told a client (an XCLIENT, or a PROXY header: both name one
   * client for the rest of the connection). An open transaction is fine: bind() resets it. So a
   * spare (doorman's own EHLO only) is bound with XCLIENT to its first client; a backend that is
   * never told client addresses gets the next client's own HELO/EHLO.
   */
  get reusable(): boolean {
    return this.quiet && !this.saslOpen && !this.authenticated && !this.dataOpen && !this.xclientBound && this.opts.proxyProtocol === 'off';
  }

  /** Polite close: QUIT, then end the socket without waiting long. */
  quit(): void {
    if (this.failure) return;
    this.command('QUIT', 2000).then(
      () => this.destroy(),
      () => this.destroy(),
    );
    this.failure = new BackendError('closed', 'quit');
  }

  /** Drops the connection at once (message aborted: the backend never saw its end). */
  destroy(): void {
    if (!this.failure) this.failure = new BackendError('closed', 'closed by doorman');
    this.fail(this.failure);
    this.socket.destroy();
    this.markGone();
  }

  private goneEmitted = false;

  /** 'gone' once: the backend no longer holds a process for this connection (the pool counts it). */
  private markGone(): void {
    if (this.goneEmitted) return;
    this.goneEmitted = true;
    this.emit('gone');
  }

  get alive(): boolean {
    return this.failure === null;
  }

  /** The backend is told the real client's address: XCLIENT with ADDR, or a PROXY header. */
  get knowsClient(): boolean {
    return this.opts.proxyProtocol !== 'off' || !!this.xclientAllowed?.has('ADDR');
  }

  /** Waits until the socket can take more data. */
  onceDrain(cb: () => void): void {
    this.socket.once('drain', cb);
  }

  private expect(timeout: number, what: string, flags: { sasl?: boolean; data?: boolean } = {}): Promise<Reply> {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise<Reply>((resolve, reject) => {
      this.pending.push({ resolve, reject, timeout, what, sent: performance.now(), ...flags });
      if (this.pending.length === 1) this.arm();
    });
  }

  private arm(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    const head = this.pending[0];
    if (!head) return;
    this.timer = setTimeout(() => {
      this.fail(new BackendError('timeout', `no reply to ${head.what} within ${head.timeout} ms`));
      this.socket.destroy();
    }, head.timeout);
  }

  private attach(socket: net.Socket): void {
    socket.setNoDelay(true);
    socket.on('data', (d: Buffer) => this.onData(d.toString('latin1')));
    socket.on('error', (e) => this.fail(new BackendError('closed', e.message)));
    socket.on('close', () => {
      this.fail(new BackendError('closed', 'connection closed by backend'));
      this.markGone();
      this.emit('close');
    });
  }

  private onData(d: string): void {
    this.buf += d;
    for (;;) {
      const nl = this.buf.indexOf('\n');
      if (nl < 0) {
        if (this.buf.length > MAX_REPLY_LINE) this.garbage('reply line too long');
        return;
      }
      const line = this.buf.slice(0, nl).replace(/\r$/, '');
      this.buf = this.buf.slice(nl + 1);
      if (!/^[2-5]\d\d([ -]|$)/.test(line) || line.length > MAX_REPLY_LINE) return this.garbage(`bad reply line`);
      this.lines.push(line);
      if (this.lines.length > MAX_REPLY_LINES) return this.garbage('reply too long');
      if (line[3] === '-') continue;
      const lines = this.lines;
      this.lines = [];
      if (lines.some((l) => l.slice(0, 3) !== line.slice(0, 3))) return this.garbage('inconsistent reply codes');
      const raw = Buffer.from(lines.map((l) => l + '\r\n').join(''), 'latin1');
      const reply = parseReplyLines(lines, raw);
      const head = this.pending.shift();
      if (!head) {
        // Unsolicited: typically "421 … timeout" before closing.
        this.fail(new BackendError('closed', `unsolicited ${reply.code}`, reply));
        return;
      }
      this.arm();
      if (head.sasl) {
        this.saslOpen = reply.code === 334;
        if (reply.code === 235) this.authenticated = true;
      }
      if (head.data) this.dataOpen = reply.code === 354;
      this.onReply?.(head.what, reply, performance.now() - head.sent);
      head.resolve(reply);
      if (reply.code === 421) {
        this.fail(new BackendError('closed', 'backend sent 421', reply));
        this.socket.end();
      }
    }
  }

  private garbage(why: string): void {
    this.fail(new BackendError('protocol', why));
    this.socket.destroy();
  }

  private fail(err: BackendError): void {
    if (!this.failure) this.failure = err;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    const pending = this.pending;
    this.pending = [];
    for (const p of pending) p.reject(err);
  }
}

function connect(opts: BackendOptions, client: ClientIdentity): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: opts.host, port: opts.port });
    const t = setTimeout(() => {
      socket.destroy();
      reject(new BackendError('timeout', `connect timeout after ${opts.connectTimeout} ms`));
    }, opts.connectTimeout);
    socket.once('connect', () => {
      clearTimeout(t);
      socket.removeAllListeners('error');
      if (opts.proxyProtocol === 'v1') socket.write(proxyHeaderV1(client));
      else if (opts.proxyProtocol === 'v2') socket.write(proxyHeaderV2(client));
      resolve(socket);
    });
    socket.once('error', (e) => {
      clearTimeout(t);
      reject(new BackendError('connect', e.message));
    });
  });
}
