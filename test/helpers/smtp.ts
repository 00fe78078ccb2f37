/**
 * smtp.ts — a raw SMTP client for tests: exact bytes out, replies parsed, no politeness.
 * Binds to other 127.0.0.x addresses to stand in for other client hosts.
 *
 *   const c = await SmtpClient.open(port, { localAddress, ehlo: 'mta.example.org' }); // 220, EHLO 250
 *   const r = await c.message({ from, to: ['b@example.com'], body });                // MAIL 250, RCPT 250, DATA 354
 *   assert.equal(r.code, 250);                                                       // the end of data
 *
 * greet() when the greeting is what the test checks, transaction() when a refusal at MAIL or RCPT
 * is, cmd()/write()/reply() for everything else.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import tls from 'node:tls';

export interface TestReply {
  code: number;
  lines: string[];
  /** Text of all lines joined with a space (code and separators removed). */
  text: string;
  raw: string;
}

export interface ConnectOptions {
  host?: string;
  localAddress?: string;
  /** Implicit TLS (smtps role). */
  tls?: boolean;
}

export interface GreetOptions extends ConnectOptions {
  /** Sent first: a PROXY v1 header 'PROXY <proxy>\r\n' (e.g. 'TCP4 127.0.0.40 127.0.0.1 40000 25'), or a v2 header as bytes. */
  proxy?: string | Buffer;
  /** How long to wait for the greeting (ms). */
  timeout?: number;
}

export interface OpenOptions extends GreetOptions {
  /** The EHLO name (default client.example.net); false stops after the greeting. */
  ehlo?: string | false;
  /** After EHLO: STARTTLS, the handshake, and EHLO again. */
  starttls?: boolean;
}

export interface Message {
  from: string;
  to: string | string[];
  /** Appended to MAIL FROM:<from>, e.g. 'SIZE=1234 BODY=8BITMIME'. */
  params?: string;
  /**
   * Sent after DATA exactly as given (not dot-stuffed; see dotStuff) with the end of data, in one
   * write: '.\r\n' if it ends with CRLF, else '\r\n.\r\n'. Left out: the conversation stops at DATA's 354.
   */
  body?: string | Buffer;
  /** How long to wait for the reply to the end of data (ms). */
  timeout?: number;
}

/** The replies of one transaction, up to the first refusal. */
export interface Replies {
  mail: TestReply;
  rcpt: TestReply[];
  data?: TestReply;
  /** The reply to the end of data. */
  end?: TestReply;
  /** The last reply received: the refusal that stopped the conversation, DATA's 354 without a body, else `end`. */
  last: TestReply;
}

/** A client that has read the greeting. */
export type Greeted = SmtpClient & { readonly greeting: TestReply };

export class SmtpClient {
  /** EHLO keywords from open() (after STARTTLS: the second EHLO's). */
  keywords = new Map<string, string>();
  private buf = '';
  private waiters: (() => void)[] = [];
  private ended = false;
  readonly closed: Promise<void>;
  private markClosed!: () => void;

  private constructor(public socket: net.Socket) {
    this.closed = new Promise((r) => (this.markClosed = r));
    this.attach(socket);
  }

  static connect(port: number, opts: ConnectOptions = {}): Promise<SmtpClient> {
    return new Promise((resolve, reject) => {
      const host = opts.host ?? '127.0.0.1';
      const base = { host, port, ...(opts.localAddress ? { localAddress: opts.localAddress } : {}) };
      const s = opts.tls ? tls.connect({ ...base, rejectUnauthorized: false }) : net.connect(base);
      s.once(opts.tls ? 'secureConnect' : 'connect', () => {
        s.removeListener('error', reject);
        resolve(new SmtpClient(s));
      });
      s.once('error', reject);
    });
  }

  /** Connects and reads the greeting, whatever it is. */
  static async greet(port: number, opts: GreetOptions = {}): Promise<Greeted> {
    const c = await SmtpClient.connect(port, opts);
    if (typeof opts.proxy === 'string') c.send(`PROXY ${opts.proxy}`);
    else if (opts.proxy) c.write(opts.proxy);
    const greeting = await c.reply(opts.timeout);
    return Object.assign(c, { greeting });
  }

  /** Connects, expects a 220 greeting and a 250 to EHLO (unless `ehlo: false`): a client ready for MAIL. */
  static async open(port: number, opts: OpenOptions = {}): Promise<Greeted> {
    const c = await SmtpClient.greet(port, opts);
    assert.equal(c.greeting.code, 220, c.greeting.raw);
    if (opts.ehlo === false) return c;
    const name = opts.ehlo ?? 'client.example.net';
    const e = await c.ehlo(name);
    assert.equal(e.reply.code, 250, e.reply.raw);
    c.keywords = e.keywords;
    if (opts.starttls) {
      const s = await c.cmd('STARTTLS');
      assert.equal(s.code, 220, s.raw);
      await c.upgrade();
      const again = await c.ehlo(name);
      assert.equal(again.reply.code, 250, again.reply.raw);
      c.keywords = again.keywords;
    }
    return c;
  }

  /**
   * A message the server is expected to take up to the end of data: asserts 250 to MAIL and to each
   * RCPT and 354 to DATA, then sends the body. Returns the reply to the end of data, or without a
   * body, DATA's 354 (the client is left in DATA to write its own bytes).
   */
  async message(m: Message): Promise<TestReply> {
    const t = await this.transaction(m);
    assert.equal(t.mail.code, 250, t.mail.raw);
    for (const r of t.rcpt) assert.equal(r.code, 250, r.raw);
    assert.equal(t.data?.code, 354, t.last.raw);
    return t.last;
  }

  /** MAIL, RCPT for each recipient, DATA, the body and its end; stops at the first refusal. Asserts nothing. */
  async transaction(m: Message): Promise<Replies> {
    const mail = await this.cmd(`MAIL FROM:<${m.from}>${m.params ? ` ${m.params}` : ''}`);
    const replies: Replies = { mail, rcpt: [], last: mail };
    if (mail.code !== 250) return replies;
    for (const to of typeof m.to === 'string' ? [m.to] : m.to) {
      const r = await this.cmd(`RCPT TO:<${to}>`);
      replies.rcpt.push(r);
      replies.last = r;
      if (r.code !== 250) return replies;
    }
    replies.data = replies.last = await this.cmd('DATA');
    if (replies.data.code !== 354 || m.body === undefined) return replies;
    const body = typeof m.body === 'string' ? Buffer.from(m.body, 'latin1') : m.body;
    const end = body.subarray(-2).toString('latin1') === '\r\n' ? '.\r\n' : '\r\n.\r\n';
    this.write(Buffer.concat([body, Buffer.from(end, 'latin1')])); // one write, as a client sends a small message
    replies.end = replies.last = await this.reply(m.timeout ?? 60_000);
    return replies;
  }

  private attach(s: net.Socket): void {
    s.on('data', (d: Buffer) => {
      this.buf += d.toString('latin1');
      this.wake();
    });
    s.on('close', () => {
      this.ended = true;
      this.markClosed();
      this.wake();
    });
    s.on('error', () => undefined);
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  /** Next complete reply; rejects on timeout or when the server closed without one. */
  async reply(timeout = 10_000): Promise<TestReply> {
    const deadline = Date.now() + timeout;
    for (;;) {
      const r = this.take();
      if (r) return r;
      if (this.ended) throw new Error(`connection closed; pending: ${JSON.stringify(this.buf)}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timeout waiting for reply; pending: ${JSON.stringify(this.buf)}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  private take(): TestReply | null {
    const lines: string[] = [];
    let pos = 0;
    for (;;) {
      const nl = this.buf.indexOf('\r\n', pos);
      if (nl < 0) return null;
      const line = this.buf.slice(pos, nl);
      lines.push(line);
      pos = nl + 2;
      if (line[3] !== '-') break;
    }
    const raw = this.buf.slice(0, pos);
    this.buf = this.buf.slice(pos);
    const code = Number(lines[0]?.slice(0, 3));
    const texts = lines.map((l) => l.slice(4));
    return { code, lines: texts, text: texts.join(' '), raw };
  }

  /** Bytes received and not yet parsed as replies. */
  pending(): string {
    return this.buf;
  }

  write(data: string | Buffer): void {
    this.socket.write(typeof data === 'string' ? Buffer.from(data, 'latin1') : data);
  }

  send(line: string): void {
    this.write(line + '\r\n');
  }

  async cmd(line: string, timeout?: number): Promise<TestReply> {
    this.send(line);
    return this.reply(timeout);
  }

  /** EHLO and return the keywords (upper-cased first word of each line after the first). */
  async ehlo(name = 'client.example.net'): Promise<{ reply: TestReply; keywords: Map<string, string> }> {
    const reply = await this.cmd(`EHLO ${name}`);
    const keywords = new Map<string, string>();
    for (const l of reply.lines.slice(1)) {
      const [k, ...rest] = l.split(' ');
      if (k) keywords.set(k.toUpperCase(), rest.join(' '));
    }
    return { reply, keywords };
  }

  /** After a 220 to STARTTLS: upgrade this connection. */
  async upgrade(): Promise<void> {
    const plain = this.socket;
    plain.removeAllListeners('data');
    plain.removeAllListeners('close');
    const s = tls.connect({ socket: plain, rejectUnauthorized: false });
    await new Promise<void>((resolve, reject) => {
      s.once('secureConnect', () => resolve());
      s.once('error', reject);
    });
    this.socket = s;
    this.attach(s);
  }

  /** Resolves true if the server closes within `timeout` ms. */
  async waitClosed(timeout = 5000): Promise<boolean> {
    if (this.ended) return true;
    return Promise.race([this.closed.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), timeout))]);
  }

  close(): void {
    this.socket.destroy();
  }
}

/** Dot-stuffs a CRLF message body for DATA. */
export function dotStuff(body: string): string {
  return body.replace(/(^|\r\n)\./g, '$1..');
}
