/**
 * framing.ts — bytes from the client → command lines and DATA chunks.
 *
 * Knows nothing of SMTP verbs beyond the line-length classes. Two modes:
 *
 * Command mode (`nextCommand`): a line ends at LF. A line ended by CRLF is normal; a line ended
 * by a bare LF, or holding a bare CR, is reported (`bare`) so the session can refuse it or treat
 * it as a line under the `normalize` policy. Lines longer than their limit are never buffered
 * whole: the excess is discarded up to the next LF and one `too_long` event is returned.
 *
 * DATA mode (`beginData`, `nextData`): chunks are passed on as they arrive, with the client's
 * dot-stuffing kept byte for byte. End of data is recognised only as CRLF "." CRLF
 * (RFC 5321 §4.1.1.4). A bare CR or LF can never become a message boundary for the backend:
 *   - policy `normalize` (default): each bare CR or LF becomes CRLF, and a "." that then starts
 *     a line is stuffed, so `\n.\n`, `\r.\r`, `\n.\r\n` reach the backend as ordinary lines;
 *   - policy `reject`: output stops at the first bare CR/LF (`bareNewline` is set) and the
 *     session refuses the message; nothing after it reaches the backend.
 * Bytes that could be the start of CRLF.CRLF are held back until the next chunk decides them,
 * so the backend never sees an end of data that doorman has not seen first.
 */
import { copyOf } from '../protocol/bytes.js';

export type BareNewlinePolicy = 'normalize' | 'reject';

export interface FramingLimits {
  /** Longest command line in octets, CRLF included (RFC 5321 §4.5.3.1.4: 512). */
  maxCommandLine: number;
  /** Extra octets allowed on MAIL/RCPT lines for extension parameters (RFC 5321 §4.5.3.1.4). */
  extensionAllowance: number;
  /** Longest AUTH line or SASL response, CRLF included (RFC 4954 §4: 12288). */
  maxAuthLine: number;
  /** Longest text line in DATA, CRLF included (RFC 5321 §4.5.3.1.6: 1000); 0 = no limit. */
  maxDataLine: number;
  /** What to do with a bare CR or LF. */
  bareNewline: BareNewlinePolicy;
}

export type CommandEvent =
  | { readonly type: 'line'; readonly line: Buffer; readonly bareLf: boolean; readonly bareCr: boolean }
  | { readonly type: 'too_long' };

/** Bytes to forward (possibly none), and whether the end of data was reached after them. */
export interface DataEvent {
  readonly chunks: Buffer[];
  readonly end: boolean;
}

const CR = 0x0d;
const LF = 0x0a;
const DOT = 0x2e;
/** A line end followed by a stuffing dot. */
const LF_DOT = Buffer.from('\n.');
const CRLF = Buffer.from('\r\n');
const STUFF = Buffer.from('.');

export class Framing {
  private queue: Buffer[] = [];
  private queued = 0;
  private mode: 'command' | 'data' = 'command';
  /** Command mode: discarding an over-long line until its LF. */
  private discarding = false;
  /** Command mode: SASL exchange in progress (responses use the AUTH line limit). */
  sasl = false;

  // DATA state
  private lineStart = true;
  private stuffNext = false;
  private lineLen = 0;
  private held: Buffer | null = null;
  /** Octets of message data received (client form, final "." CRLF excluded). */
  dataBytes = 0;
  /** A DATA line exceeded `maxDataLine`. */
  longLine = false;
  /** A bare CR or LF was seen in DATA. */
  bareNewline = false;

  constructor(private readonly limits: FramingLimits) {}

  /** Adds bytes received from the client. */
  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.queue.push(chunk);
    this.queued += chunk.length;
  }

  /** Bytes received and not yet consumed. */
  get buffered(): number {
    return this.queued + (this.held?.length ?? 0);
  }

  get inData(): boolean {
    return this.mode === 'data';
  }

  /** Drops everything buffered (STARTTLS: plaintext after the command must not survive). */
  discard(): number {
    const n = this.buffered;
    this.queue = [];
    this.queued = 0;
    this.held = null;
    this.discarding = false;
    return n;
  }

  /** Next command line, or null when more bytes are needed. */
  nextCommand(): CommandEvent | null {
    if (this.mode !== 'command') throw new Error('nextCommand in data mode');
    for (;;) {
      if (this.queued === 0) return null;
      const buf = this.coalesce();
      const lf = buf.indexOf(LF);
      if (this.discarding) {
        if (lf < 0) {
          this.consume(buf.length);
          return null;
        }
        this.consume(lf + 1);
        this.discarding = false;
        continue;
      }
      const limit = this.lineLimit(buf);
      if (lf < 0) {
        if (buf.length >= limit) {
          this.consume(buf.length);
          this.discarding = true;
          return { type: 'too_long' };
        }
        return null;
      }
      if (lf + 1 > limit) {
        this.consume(lf + 1);
        return { type: 'too_long' };
      }
      const crlf = lf > 0 && buf[lf - 1] === CR;
      const line = copyOf(buf.subarray(0, crlf ? lf - 1 : lf));
      this.consume(lf + 1);
      return { type: 'line', line, bareLf: !crlf, bareCr: line.includes(CR) };
    }
  }

  /** Switches to DATA mode: the bytes that follow are message data. */
  beginData(): void {
    this.mode = 'data';
    this.lineStart = true;
    this.stuffNext = false;
    this.lineLen = 0;
    this.held = null;
    this.dataBytes = 0;
    this.longLine = false;
    this.bareNewline = false;
  }

  /**
   * Next DATA event: chunks to forward (possibly none) and `end` when CRLF.CRLF followed them;
   * the framing is then back in command mode with any pipelined bytes kept. Null when no bytes
   * are waiting.
   */
  nextData(): DataEvent | null {
    if (this.mode !== 'data') throw new Error('nextData in command mode');
    const next = this.queue.shift();
    if (!next) return null;
    this.queued -= next.length;
    let buf = next;
    if (this.held) {
      buf = Buffer.concat([this.held, next]);
      this.held = null;
    }
    return this.scan(buf);
  }

  private scan(buf: Buffer): DataEvent {
    const out: Buffer[] = [];
    const emitting = () => !(this.bareNewline && this.limits.bareNewline === 'reject');
    const len = buf.length;
    let i = 0;
    let from = 0;
    const flush = (to: number) => {
      if (to > from && emitting()) out.push(buf.subarray(from, to));
    };
    if (this.stuffNext && len > 0) {
      if (buf[0] === DOT && emitting()) out.push(STUFF);
      this.stuffNext = false;
    }
    while (i < len) {
      if (this.lineStart) {
        if (buf[i] === DOT) {
          if (i + 1 >= len) return this.hold(buf, i, out, flush);
          const b1 = buf[i + 1];
          if (b1 === CR) {
            if (i + 2 >= len) return this.hold(buf, i, out, flush);
            if (buf[i + 2] === LF) {
              flush(i);
              this.dataBytes += i;
              const rest = buf.subarray(i + 3);
              this.mode = 'command';
              if (rest.length) {
                this.queue.unshift(rest);
                this.queued += rest.length;
              }
              return { chunks: out, end: true };
            }
          }
          if (b1 === CR || b1 === LF) {
            // A stuffing dot directly before a bare break: the line's content is empty, so
            // the dot is dropped rather than left alone on a line (".\r\n" would end the data).
            flush(i);
            from = i + 1;
          }
          // RFC 5321 §4.5.3.1.6: the stuffing dot does not count towards the line length.
          this.lineLen = -1;
        }
        this.lineStart = false;
      }
      const p = nextBreak(buf, i);
      if (p < 0) {
        this.addLineLen(len - i);
        i = len;
        break;
      }
      this.addLineLen(p - i);
      if (buf[p] === CR) {
        if (p + 1 >= len) return this.hold(buf, p, out, flush);
        if (buf[p + 1] === LF) {
          this.lineLen = 0;
          this.lineStart = true;
          i = p + 2;
          continue;
        }
      }
      // A bare CR or a bare LF.
      flush(p);
      this.bareNewline = true;
      if (this.limits.bareNewline === 'reject') {
        i = p + 1;
        continue;
      }
      out.push(CRLF);
      this.lineLen = 0;
      i = p + 1;
      from = i;
      if (i < len) {
        if (buf[i] === DOT) out.push(STUFF);
      } else {
        this.stuffNext = true;
      }
    }
    flush(len);
    this.dataBytes += len;
    return { chunks: out, end: false };
  }

  private hold(buf: Buffer, at: number, out: Buffer[], flush: (to: number) => void): DataEvent {
    flush(at);
    this.held = copyOf(buf.subarray(at));
    this.dataBytes += at;
    return { chunks: out, end: false };
  }

  private addLineLen(n: number): void {
    this.lineLen += n;
    if (this.limits.maxDataLine > 0 && this.lineLen + 2 > this.limits.maxDataLine) this.longLine = true;
  }

  private lineLimit(buf: Buffer): number {
    if (this.sasl) return this.limits.maxAuthLine;
    const verb = buf.subarray(0, 5).toString('latin1').toUpperCase();
    if (verb === 'AUTH ') return this.limits.maxAuthLine;
    if (verb === 'MAIL ' || verb === 'RCPT ') return this.limits.maxCommandLine + this.limits.extensionAllowance;
    return this.limits.maxCommandLine;
  }

  private coalesce(): Buffer {
    if (this.queue.length > 1) this.queue = [Buffer.concat(this.queue)];
    return this.queue[0] ?? Buffer.alloc(0);
  }

  private consume(n: number): void {
    const buf = this.coalesce();
    const rest = buf.subarray(n);
    this.queue = rest.length ? [rest] : [];
    this.queued = rest.length;
  }
}

/** Index of the next CR or LF at or after `from`, or -1. */
function nextBreak(buf: Buffer, from: number): number {
  const cr = buf.indexOf(CR, from);
  const lf = buf.indexOf(LF, from);
  if (cr < 0) return lf;
  if (lf < 0) return cr;
  return cr < lf ? cr : lf;
}

/**
 * The message as the backend stores it from DATA: dot-stuffed CRLF lines → lines with the
 * stuffing dot removed (RFC 5321 §4.5.2), for BDAT (RFC 3030), which carries octets as they are.
 * Fed the chunks `nextData` emits, in order; keeps the line-start state across chunk boundaries.
 * (Those chunks always have CRLF line ends: a bare CR/LF is normalised or refused before.)
 */
export class Unstuffer {
  private lineStart = true;
  /** Octets produced so far. */
  length = 0;

  /** The chunks without their stuffing dots: cut only where a dot is removed, not at every line. */
  push(chunks: readonly Buffer[]): Buffer[] {
    const out: Buffer[] = [];
    for (const c of chunks) {
      if (c.length === 0) continue;
      let from = this.lineStart && c[0] === DOT ? 1 : 0;
      let removed = from;
      for (let at = c.indexOf(LF_DOT, from); at >= 0; at = c.indexOf(LF_DOT, from)) {
        out.push(c.subarray(from, at + 1));
        from = at + 2;
        removed++;
      }
      if (from < c.length) out.push(c.subarray(from));
      this.length += c.length - removed;
      this.lineStart = c[c.length - 1] === LF;
    }
    return out;
  }
}
