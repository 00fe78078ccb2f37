/**
 * message.ts — one message on its way to the backend, as DATA or as BDAT.
 *
 * DATA: the client gets its 354 at once while the backend's is awaited; the bytes that come
 * before it are held (`early`, bounded: past limits.maxBuffered the client is no longer read).
 * BDAT (RFC 3030) towards a backend that offers CHUNKING: the client's dot-stuffing is removed
 * on the way (Unstuffer), one BDAT per batch of chunks, and a refused chunk decides the message.
 * Back-pressure: when the backend's socket is full, the client is not read until it drains.
 * The message can be aborted (the backend connection is dropped: it never sees an end of data),
 * or ended (`end`: the last bytes with the final "." or BDAT LAST; a refused message is RSET).
 * It also writes doorman's X-Doorman-Tag headers. What to refuse, and when, is the session's
 * DATA policy (size, lines, bare newlines, data_headers and data_end rules).
 */
import type { BackendConnection } from '../backend/connection.js';
import { copyOf } from '../protocol/bytes.js';
import { R, replyClass, type Reply } from '../protocol/reply.js';
import { Unstuffer } from './framing.js';

/** X-Doorman-Tag headers added to one message, at most. */
export const MAX_TAG_HEADERS = 20;
/** Longest tag text in a header, octets. */
const MAX_TAG_OCTETS = 900;
/**
 * Octets doorman may add to a message (its X-Doorman-Tag headers; Received and
 * Authentication-Results, at most 3,000 octets, fit in it unless nearly every tag is used, and a
 * message over the backend's SIZE with them is refused by doorman): the advertised SIZE is the
 * backend's less this, so a message that fits doorman's SIZE still fits the backend's with them.
 */
export const TAG_HEADROOM = MAX_TAG_HEADERS * ('X-Doorman-Tag: '.length + MAX_TAG_OCTETS + 2);

export type AbortReason = 'size' | 'bare_newline' | 'long_line' | 'rule' | 'backend' | 'backend_refused';

/** What a message needs of its session: the client's reading, stopped and resumed. */
export interface MessageHost {
  readonly maxBuffered: number;
  /** The client is not read for the backend's sake (its socket is paused). */
  isCongested(): boolean;
  setCongested(v: boolean): void;
  /** Stops reading the client. */
  pauseClient(): void;
  /** Reads the client again after a back-pressure stop. */
  uncongest(): void;
  /** This message is still the session's current one. */
  isCurrent(m: Message): boolean;
  /** A backend failure during a command, as the client's reply. */
  failed(e: unknown): Reply;
  /** A backend failure at the end of data, as the client's reply. */
  failedAtEndOfData(e: unknown): Reply;
  /** The backend took LAST after refusing a chunk: the refusal stands. */
  acceptedAfterRefusal(refused: Reply, last: Reply): void;
}

export class Message {
  aborted: null | AbortReason = null;
  /** Relayed as BDAT (RFC 3030): the stuffing is removed on the way; null for DATA. */
  private readonly bdat: Unstuffer | null;
  /** The first refusal of a BDAT chunk (the message's fate, whatever LAST gets). */
  private bdatRefused: Reply | null = null;
  /** Settle when each non-last chunk's reply has been looked at (bdatRefused set if refused). */
  private readonly bdatReplies: Promise<void>[] = [];
  /** The backend answered 354 (or the message goes as BDAT): bytes may go to it. */
  private ready: boolean;
  /** Bytes received before the backend's 354. */
  private early: Buffer[] = [];
  private earlyBytes = 0;
  /** The backend's refusal of DATA, answered after the client's end of data. */
  refused: Reply | null = null;
  /** The backend's reply to DATA; null when the message goes as BDAT (no DATA, no 354). */
  private readonly backendReply: Promise<Reply> | null;
  /** Held header chunks while data_headers rules are pending; null when streaming. */
  pendingHeaders: Buffer[] | null;
  headerRule: { reply: Reply; rule: string } | null = null;
  /** The message's last chunks, written together with the final "." (fewer writes). */
  tail: Buffer[] = [];
  /** Octets doorman added to the message (X-Doorman-Tag headers). */
  added = 0;
  /** doorman's header fields, not yet sent: they go in front of the next bytes. */
  private prefix: Buffer | null = null;

  /**
   * Starts a message on `b`: DATA is sent now (its 354 awaited in parallel), or nothing when it
   * goes as BDAT. With `holdHeaders`, the header block is held for the data_headers rules.
   */
  constructor(
    private readonly b: BackendConnection,
    opts: { bdat: boolean; holdHeaders: boolean },
    private readonly host: MessageHost,
  ) {
    this.bdat = opts.bdat ? new Unstuffer() : null;
    // BDAT needs no 354: bytes may go at once.
    this.ready = opts.bdat;
    this.pendingHeaders = opts.holdHeaders ? [] : null;
    this.backendReply = opts.bdat ? null : b.command('DATA').catch((e: unknown) => host.failed(e));
    if (this.backendReply) void this.backendReply.then((r) => this.answered(r));
  }

  /** The backend's reply to DATA: 354 releases the held bytes; else the message is refused. */
  private answered(r: Reply): void {
    const host = this.host;
    if (!host.isCurrent(this)) return;
    if (r.code === 354) {
      this.ready = true;
      const early = this.early;
      this.early = [];
      this.earlyBytes = 0;
      if (host.isCongested() && !this.b.alive) return;
      host.setCongested(false);
      this.write(early);
      if (!host.isCongested()) host.uncongest();
    } else {
      this.refused = r;
      this.aborted ??= 'backend_refused';
      this.early = [];
      if (host.isCongested()) host.uncongest();
    }
  }

  /** Refuses the message: the backend connection is dropped, so it never sees an end of data. */
  abort(reason: AbortReason): void {
    this.aborted = reason;
    this.b.destroy();
  }

  /** Holds message bytes until the header block is complete (data_headers rules). */
  holdHeaders(chunks: readonly Buffer[]): void {
    for (const c of chunks) this.pendingHeaders?.push(copyOf(c));
  }

  /**
   * Writes doorman's header fields before the message, this hop's group at the top: the
   * X-Doorman-Tag headers (the tags already bounded and distinct), then `fields`
   * (Authentication-Results, Received; CRLF-terminated).
   */
  writeHeaders(fields: readonly string[], tags: readonly string[]): void {
    if (!fields.length && !tags.length) return;
    const headers = Buffer.concat([tagHeaders(tags), Buffer.from(fields.join(''), 'latin1')]);
    this.added += headers.length;
    // Sent with the next bytes of the message (one write, one BDAT chunk), or with its tail.
    this.prefix = headers;
  }

  /** `list` with doorman's header fields in front, once. */
  private withPrefix(list: readonly Buffer[]): readonly Buffer[] {
    const p = this.prefix;
    if (!p) return list;
    this.prefix = null;
    return [p, ...list];
  }

  /** Message bytes towards the backend (held before its 354; as BDAT chunks; or raw). */
  write(chunks: Buffer | readonly Buffer[]): void {
    const b = this.b;
    if (!b.alive) return;
    const list = this.withPrefix(Buffer.isBuffer(chunks) ? [chunks] : chunks);
    if (!this.ready) {
      // Before the backend's 354: hold the bytes; stop reading when too many are held.
      if (this.refused) return;
      for (const c of list) {
        this.early.push(c);
        this.earlyBytes += c.length;
      }
      if (this.earlyBytes > this.host.maxBuffered && !this.host.isCongested()) {
        this.host.setCongested(true);
        this.host.pauseClient();
      }
      return;
    }
    if (!this.send(list)) this.congested();
  }

  /** Bytes to the backend now (its 354 came, or BDAT); false when its socket is full. */
  private send(list: readonly Buffer[]): boolean {
    const b = this.b;
    if (this.bdat) {
      // One BDAT per batch of chunks; a refused chunk decides the message (bdatRefused), and
      // no further chunk is sent after it (RFC 3030 §2).
      if (this.bdatRefused) return true;
      const body = this.bdat.push(list);
      if (body.length === 0) return true;
      const sent = b.bdat(body, false);
      this.bdatReplies.push(
        sent.reply.then(
          (r) => {
            if (replyClass(r) !== 2) this.bdatRefused ??= r;
          },
          () => undefined,
        ),
      );
      return sent.ok;
    }
    let ok = true;
    for (const c of list) if (!b.writeData(c)) ok = false;
    return ok;
  }

  /**
   * A held message (spool.ts) to the backend, after its data_end verdict: once the backend's 354
   * came (a refused DATA is answered by `end`), chunk by chunk, waiting whenever the backend's
   * socket is full — the client has sent everything, so nothing else is to be paused.
   */
  async replay(source: AsyncIterable<Buffer>): Promise<void> {
    if (this.backendReply) await this.backendReply;
    if (!this.ready) return;
    const b = this.b;
    for await (const c of source) {
      if (this.aborted || !b.alive) return;
      if (!this.send(this.withPrefix([c]))) {
        await new Promise<void>((resolve) => {
          const done = () => {
            b.off('close', done);
            resolve();
          };
          b.onceDrain(done);
          b.once('close', done);
        });
      }
    }
  }

  /** The backend's socket is full: stop reading the client until it drains. */
  private congested(): void {
    const host = this.host;
    if (host.isCongested()) return;
    host.setCongested(true);
    host.pauseClient();
    this.b.onceDrain(() => host.uncongest());
  }

  /** The end of the message (its tail and the final "." or BDAT LAST): the backend's verdict. */
  end(): Promise<Reply> {
    return this.bdat ? this.endBdat(this.bdat) : this.endDataCommand();
  }

  /** The end of a message sent with DATA: its last bytes and the dot, once the backend's 354 came. */
  private async endDataCommand(): Promise<Reply> {
    const b = this.b;
    const dataReply = (await this.backendReply) ?? R.backendTempfail();
    if (this.refused || dataReply.code !== 354) {
      const r = this.refused ?? dataReply;
      this.resetRefused(r);
      return r;
    }
    return b.alive ? b.endData(this.withPrefix(this.tail)).catch((e: unknown) => this.host.failedAtEndOfData(e)) : R.backendTempfail();
  }

  /**
   * The end of a message sent with BDAT. A refused chunk decides the message: no LAST follows it.
   * LAST may go before an earlier chunk's refusal came back (replies come in order, later): then
   * that refusal still decides, even if the backend took LAST (RFC 3030 §2 has it refuse every
   * chunk after a refused one; one that does not must not turn the refusal into a 250). Otherwise
   * the last chunk's reply is the message's fate. A failed transaction is RSET.
   */
  private async endBdat(unstuffer: Unstuffer): Promise<Reply> {
    const b = this.b;
    let r = this.bdatRefused;
    if (!r) {
      const last = b.alive ? await b.bdat(unstuffer.push(this.withPrefix(this.tail)), true).reply.catch((e: unknown) => this.host.failedAtEndOfData(e)) : R.backendTempfail();
      await Promise.all(this.bdatReplies);
      r = this.bdatRefused ?? last;
      if (this.bdatRefused && replyClass(last) === 2) this.host.acceptedAfterRefusal(this.bdatRefused, last);
    }
    if (replyClass(r) !== 2) this.resetRefused(r);
    return r;
  }

  /** The backend still holds the transaction whose data it refused: reset it (unless it is closing). */
  resetRefused(r: Reply): void {
    const b = this.b;
    if (!r.closes && b.alive) b.command('RSET').catch(() => undefined);
  }
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
