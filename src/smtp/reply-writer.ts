/**
 * reply-writer.ts — every byte doorman writes to a client goes through here.
 *
 * A session's `ReplyWriter` owns its side of the client socket: replies written now (`send`),
 * replies queued in order and written in one go (`queue`/`flush`: a pipelined group answered in
 * one write, each Promise awaited in turn), the 220- teaser (`sendContinued`), the error count
 * (limits.maxErrors, then 421) and the close after a closing reply (the socket ends once written).
 * Output is back-pressure like input (`congested`): while the client has not read what was
 * written, the session reads and executes nothing; a client that reads nothing within
 * limits.writeTimeout is dropped. Each command's reply is counted as it is queued (`answer`:
 * doorman_commands_total, doorman_command_duration_seconds), a backend's reply when it comes.
 * Before a session exists, the listener refuses with `endWith`.
 * All formatting is in protocol/reply.ts.
 */
import type net from 'node:net';
import type { Metrics } from '../metrics/registry.js';
import { formatReply, R, replyClass, type Reply } from '../protocol/reply.js';

export type Pending = Reply | Promise<Reply>;

/** What the writer needs of its session. */
export interface WriterHost {
  readonly hostname: string;
  readonly maxErrors: number;
  readonly writeTimeout: number;
  /** Where each command's reply is counted. */
  readonly metrics: Metrics;
  /** The session has ended. */
  isClosed(): boolean;
  /** Ends the session (its socket is written and ended, or 2 s have passed). */
  close(): void;
  /** The error count passed limits.maxErrors: a 421 is written and the session ends. */
  tooManyErrors(): void;
  /** The client read nothing within writeTimeout: the session is dropped. */
  writeTimedOut(unread: number): void;
  /** The client read its replies (`socket` drained): the session may read again. */
  drained(socket: net.Socket): void;
}

/** Writes one reply to a socket that has no session (the listener's refusals) and ends it. */
export function endWith(socket: net.Socket, r: Reply): void {
  socket.end(formatReply(r));
}

export class ReplyWriter {
  private outq: Pending[] = [];
  /** A closing reply was written; the socket ends once it is flushed. */
  closing = false;
  /** Replies of class 4 or 5 written so far. */
  errors = 0;
  /** The client does not read its replies: no command is executed until they drain. */
  congestedNow = false;

  constructor(
    private socket: net.Socket,
    private readonly host: WriterHost,
  ) {}

  /** After STARTTLS: the TLS socket. */
  setSocket(socket: net.Socket): void {
    this.socket = socket;
  }

  /** Replies queued and not yet written. */
  get queued(): number {
    return this.outq.length;
  }

  /** Forgets the queued replies (the session answers otherwise). */
  dropQueued(): void {
    this.outq = [];
  }

  /**
   * Queues the reply of the command `verb` taken from the input at `started` (performance.now()),
   * counted when it is known (at once for a Reply, when it comes for a Promise), then `note`d.
   */
  answer(verb: string, r: Pending, started: number, note?: (r: Reply) => void): void {
    const m = this.host.metrics;
    const counted = (x: Reply): Reply => {
      m.commands.inc({ verb, class: `${replyClass(x)}xx` });
      m.commandDuration.observe({ verb }, (performance.now() - started) / 1000);
      note?.(x);
      return x;
    };
    // A reply known now is counted now (no Promise); a backend's reply when it comes.
    this.queue(r instanceof Promise ? r.then(counted) : counted(r));
  }

  /** Writes a reply now (after anything queued is flushed by the caller). */
  send(r: Reply): void {
    if (this.host.isClosed() || this.closing) return;
    this.account(r);
    this.socket.write(formatReply(r));
    if (r.closes) this.closeAfterWrite();
  }

  /** Writes a reply's lines as continuation lines ("220-…"): the rest of the reply follows later. */
  sendContinued(r: Reply): void {
    if (this.host.isClosed() || this.closing) return;
    const text = String(formatReply(r));
    const at = text.lastIndexOf('\n', text.length - 2) + 1;
    this.socket.write(`${text.slice(0, at + 3)}-${text.slice(at + 4)}`);
  }

  /** Queues a reply (or the promise of one), written in order by `flush`. */
  queue(r: Pending): void {
    this.outq.push(r);
  }

  /** Ends the socket once written; the session closes when it has finished (or 2 s later). */
  closeAfterWrite(): void {
    this.closing = true;
    this.outq = [];
    this.socket.end();
    const t = setTimeout(() => this.host.close(), 2000);
    t.unref();
    this.socket.once('finish', () => this.host.close());
  }

  private account(r: Reply): void {
    if (r.code >= 400) this.errors++;
  }

  /** Waits for every queued reply, in order, and writes them in one go. */
  async flush(): Promise<void> {
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
      if (this.host.isClosed() || this.closing) return;
      if (!closes && this.errors > this.host.maxErrors) {
        out.push(formatReply(R.tooManyErrors(this.host.hostname)));
        closes = true;
        this.host.tooManyErrors();
      }
      this.socket.write(out.length === 1 ? (out[0] as string | Buffer) : Buffer.concat(out.map((o) => (typeof o === 'string' ? Buffer.from(o, 'utf8') : o))));
      if (closes) return this.closeAfterWrite();
    }
  }

  /**
   * Output is back-pressure like input: while the client has not read what was written
   * (write() returned false, past the socket's high-water mark), its commands are neither read
   * nor executed. On 'drain' the session goes on; a client that reads nothing within
   * limits.writeTimeout is dropped (it would not read a 421 either).
   */
  congested(): boolean {
    if (this.congestedNow) return true;
    const s = this.socket;
    if (!s.writableNeedDrain) return false;
    this.congestedNow = true;
    s.pause();
    const timer = setTimeout(() => {
      if (this.host.isClosed() || this.socket !== s) return;
      this.host.writeTimedOut(s.writableLength);
    }, this.host.writeTimeout);
    timer.unref();
    s.once('drain', () => {
      clearTimeout(timer);
      this.congestedNow = false;
      this.host.drained(s);
    });
    return true;
  }
}
