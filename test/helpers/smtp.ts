/**
 * smtp.ts — a raw SMTP client for tests: exact bytes out, replies parsed, no politeness.
 * Binds to other 127.0.0.x addresses to stand in for other client hosts.
 */
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

export class SmtpClient {
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

/** A whole transaction: MAIL, RCPT…, DATA, body (CRLF, already dot-stuffed), end. */
export async function sendMessage(c: SmtpClient, from: string, to: string[], stuffedBody: string | Buffer): Promise<TestReply> {
  const m = await c.cmd(`MAIL FROM:<${from}>`);
  if (m.code !== 250) return m;
  for (const r of to) {
    const rr = await c.cmd(`RCPT TO:<${r}>`);
    if (rr.code !== 250) return rr;
  }
  const d = await c.cmd('DATA');
  if (d.code !== 354) return d;
  c.write(stuffedBody);
  c.write('\r\n.\r\n');
  return c.reply(60_000);
}

/** Dot-stuffs a CRLF message body for DATA. */
export function dotStuff(body: string): string {
  return body.replace(/(^|\r\n)\./g, '$1..');
}
