/**
 * inbound.ts — the message in progress: the client's DATA, from its 354 to the final reply.
 *
 * An `Inbound` opens and owns the current message (message.ts, towards the backend; the
 * MessageHost it is given is built here from this host) and when it started, and reads the client's DATA chunks (`chunk`): the minimum data rate (421 and close), the
 * checks that stop a message (data.ts: size, bare newline, long line), the chunks forwarded or,
 * for the last ones, held for the final "." (nothing else must run first), the body fed to the
 * rules that read it, the header block held for the data_headers rules and then released with
 * the X-Doorman-Tag headers, and the end of data (`finish`): the data_end rules, the backend's
 * reply or the reply for a stopped message, the transaction's log entry, the message metrics
 * and the junk-count reset after a delivered message.
 *
 * The session keeps starting it (DATA's checks, the 354), the rule pipeline (the rules are called
 * through the host, which builds their events), the back-pressure flag and reading the client
 * (the host's), the reply queue, the socket and the end of the session.
 */
import type { BackendConnection } from '../backend/connection.js';
import type { Limits } from '../config/schema.js';
import type { Metrics } from '../metrics/registry.js';
import type { StageVerdict } from '../pipeline/verdict.js';
import { describeReply, R, reply, type Reply } from '../protocol/reply.js';
import { abortReply, headerBlock, outcomeOf, queueIdOf, stopReason, tooSlow } from './data.js';
import type { DataEvent, Framing } from './framing.js';
import { Message, type MessageHost } from './message.js';
import type { TxnLog } from './session-log.js';
import type { Spool } from './spool.js';
import { stripClaimed } from './trace.js';

/** What the message in progress needs of its session. */
export interface InboundHost {
  readonly hostname: string;
  /** The current limits (read at each use: limits reload). */
  limits(): Limits;
  readonly metrics: Metrics;
  readonly framing: Framing;
  /** Some rule acts at data_end: the last chunks are not held for the final ".". */
  hasDataEndRules(): boolean;
  /** The data_headers rules' verdict for the header block. */
  headerRules(headers: Buffer, truncated: boolean): StageVerdict | Promise<StageVerdict>;
  /** The data_end rules' verdict. */
  endRules(size: number): StageVerdict | Promise<StageVerdict>;
  /** Body chunks to the rules that read them; a Promise while a reader lags (back-pressure). */
  feedBody(chunks: readonly Buffer[], last: boolean): void | Promise<void>;
  /**
   * Writes doorman's header fields before the message: Received and Authentication-Results as
   * configured, the X-Doorman-Tag headers (the session's, the transaction's and `extra`).
   */
  writeHeaders(extra: readonly string[]): void;
  /** The message is over the size the session enforces (SIZE, maxMessageSize). */
  oversized(m: Message): boolean;
  /** Waiting for the backend to drain: no more chunks are read. */
  backendCongested(): boolean;
  setBackendCongested(v: boolean): void;
  /** Stops reading the client (the backend does not keep up). */
  pauseClient(): void;
  /** Reads the client again after a back-pressure stop (the backend drained, closed, or refused). */
  uncongest(): void;
  /** This message is still the session's current one. */
  isCurrent(i: Inbound): boolean;
  /** A backend failure during a command, as the client's reply (the session ends). */
  failed(e: unknown): Reply;
  /** A backend failure at the end of data, as the client's reply. */
  failedAtEndOfData(e: unknown): Reply;
  /** Logs a backend that accepted the message after refusing a chunk of it (the refusal stands). */
  acceptedAfterRefusal(refused: Reply, last: Reply): void;
  /** Reads the client again if nothing holds it (input buffer, backend back-pressure). */
  resumeIfRoom(): void;
  /** Drops the backend connection: it must never see an end of data. */
  destroyBackend(): void;
  setTimeout(ms: number): void;
  violation(kind: string): void;
  /** The client sends too slowly: the session ends with `r`. */
  tooSlow(r: Reply): void;
  /** The end of data is the command being answered (doorman_command_duration_seconds). */
  commandStarted(): void;
  /** A message was delivered (the junk command count starts again). */
  delivered(): void;
  /** The message is over: the transaction ends and `r` is queued as DATA's final reply. */
  finished(r: Reply): void;
}

/** The message in progress: from DATA's 354 to its final reply. */
export class Inbound {
  /** When the DATA started (min data rate). */
  readonly started = Date.now();

  /** The message towards the backend (DATA or BDAT). */
  readonly message: Message;
  /** The held message (a rule reads the body): sent after the data_end verdict; null: streamed. */
  private readonly spool: Spool | null;
  /** The spool's disk is behind: wait before reading more. */
  private spoolBehind: void | Promise<void> = undefined;
  /** Incoming Authentication-Results claiming this name are removed (null: none are). */
  private readonly authservId: string | null;
  /** Tags of the data_headers verdict, written with the held message's header fields. */
  private headerTags: readonly string[] = [];

  /**
   * `holdHeaders`: the header block is held for the data_headers rules and cleaned of
   * Authentication-Results fields claiming `authservId` (null: not cleaned). `spool`: the whole
   * message is held until the data_end verdict, whose header fields then precede it.
   */
  constructor(
    b: BackendConnection,
    opts: { bdat: boolean; holdHeaders: boolean; authservId: string | null; spool: Spool | null },
    private readonly log: TxnLog,
    private readonly host: InboundHost,
  ) {
    this.message = new Message(b, opts, this.messageHost());
    this.spool = opts.spool;
    this.authservId = opts.authservId;
  }

  /** The session ended with the message unfinished: the held copy is dropped. */
  dispose(): void {
    this.spool?.dispose();
  }

  /** What the message needs of the session: reading the client stopped and resumed, failures. */
  private messageHost(): MessageHost {
    const h = this.host;
    return {
      maxBuffered: h.limits().maxBuffered,
      isCongested: () => h.backendCongested(),
      setCongested: (v) => h.setBackendCongested(v),
      pauseClient: () => h.pauseClient(),
      uncongest: () => h.uncongest(),
      isCurrent: () => h.isCurrent(this),
      failed: (e) => h.failed(e),
      failedAtEndOfData: (e) => h.failedAtEndOfData(e),
      acceptedAfterRefusal: (refused, last) => h.acceptedAfterRefusal(refused, last),
    };
  }

  /** One DATA event from the framing. False when the session ends (too slow). */
  async chunk(ev: DataEvent): Promise<boolean> {
    const h = this.host;
    if (this.tooSlow()) return false;
    // The last chunks of a message wait for the final "." when nothing else must run first.
    const tail = ev.end && !h.hasDataEndRules() && !h.backendCongested() && !this.spool;
    this.forward(ev.chunks, tail);
    if (this.spoolBehind) await this.spoolBehind;
    // Rules reading the body get the chunks; a reader lagging past its bound holds the client.
    const fed = h.feedBody(this.message.aborted ? [] : ev.chunks, ev.end);
    if (fed) await fed;
    h.resumeIfRoom();
    if (ev.end) await this.finish();
    else if (this.message.pendingHeaders) await this.headerRules();
    return true;
  }

  /** A DATA slower than limits.minDataRate after its grace period: 421 and close (nothing delivered). */
  private tooSlow(): boolean {
    const h = this.host;
    const l = h.limits();
    if (!tooSlow(l.minDataRate, l.dataTimeout, this.started, h.framing.dataBytes)) return false;
    h.violation('slow_client');
    h.tooSlow(reply(421, '4.4.2', `${h.hostname} Error: data arriving too slowly, closing connection`));
    return true;
  }

  /** Forwards message bytes unless the message is already refused. */
  private forward(chunks: Buffer[], hold = false): void {
    const d = this.message;
    const f = this.host.framing;
    if (d.aborted) return;
    d.aborted = stopReason(f, this.host.limits().bareNewline === 'reject', this.host.oversized(d));
    if (d.aborted) return d.abort(d.aborted);
    if (d.pendingHeaders) return d.holdHeaders(chunks);
    if (hold) d.tail = chunks;
    else this.out(chunks);
  }

  /** Message bytes onwards: to the spool while the message is held, else to the backend. */
  private out(chunks: readonly Buffer[]): void {
    if (this.spool) this.spoolBehind = this.spool.write(chunks);
    else this.message.write(chunks);
  }

  /** With data_headers rules: hold the header block, evaluate, then release it. */
  private async headerRules(final = false): Promise<void> {
    const d = this.message;
    if (!d.pendingHeaders) return;
    const block = headerBlock(d.pendingHeaders, this.host.limits().maxHeaderBytes, final);
    const { held } = block;
    if (block.length === null) {
      d.pendingHeaders = [held];
      return;
    }
    d.pendingHeaders = null;
    const v = await this.host.headerRules(held.subarray(0, block.length), block.truncated);
    if (!d.aborted && v.reply) {
      d.aborted = 'rule';
      d.headerRule = { reply: v.reply, rule: v.decidedBy ?? '' };
      this.host.destroyBackend();
      return;
    }
    if (this.spool) this.headerTags = v.tags;
    else this.host.writeHeaders(v.tags);
    if (d.aborted) return;
    // RFC 8601 §5: no incoming Authentication-Results may speak for doorman's name.
    const clean = this.authservId === null ? held : Buffer.concat([stripClaimed(held.subarray(0, block.length), this.authservId), held.subarray(block.length)]);
    // At the end of data the whole message goes with the final "." (one write, one BDAT LAST).
    if (final && !this.spool && !this.host.hasDataEndRules()) d.tail = [clean];
    else this.out([clean]);
  }

  /** The final ".": the message's reply, its log entry and metrics; then the transaction ends. */
  private async finish(): Promise<void> {
    const h = this.host;
    const d = this.message;
    h.commandStarted();
    if (d.pendingHeaders) await this.headerRules(true);
    h.setTimeout(h.limits().commandTimeout);
    const size = h.framing.dataBytes;
    h.metrics.messageSize.observe(size);
    const msg = this.log;
    msg.size = size;
    let r: Reply;
    if (!d.aborted && h.oversized(d)) d.aborted = 'size';
    if (d.aborted === 'backend_refused') {
      // The backend refused DATA and never saw a byte; clear the transaction it still holds.
      r = abortReply(d, (kind) => h.violation(kind));
      d.resetRefused(r);
    } else if (d.aborted) {
      h.destroyBackend();
      r = abortReply(d, (kind) => h.violation(kind));
      if (d.headerRule) msg.rule = d.headerRule.rule;
    } else {
      const v = await h.endRules(size);
      if (v.reply) {
        h.destroyBackend();
        r = v.reply;
        msg.rule = v.decidedBy ?? undefined;
      } else if (this.spool && !(await this.release(v.tags))) {
        h.destroyBackend();
        r = R.tempfailLocal();
      } else {
        r = await d.end();
        const queueId = queueIdOf(r);
        if (queueId) msg.queueId = queueId;
      }
    }
    this.spool?.dispose();
    msg.outcome = outcomeOf(r);
    // As Postfix: the junk command count starts again after a delivered message.
    if (msg.outcome === 'accepted') h.delivered();
    msg.reply = describeReply(r);
    h.metrics.messages.inc({ front: 'smtp', outcome: msg.outcome });
    h.finished(r);
  }

  /**
   * The held message to the backend after its data_end verdict: doorman's header fields (with
   * the tags of both verdicts) first, then the message. False when the spool could not be read.
   */
  private async release(endTags: readonly string[]): Promise<boolean> {
    const spool = this.spool;
    if (!spool) return true;
    this.host.writeHeaders([...this.headerTags, ...endTags]);
    try {
      await this.message.replay(spool.read());
      return true;
    } catch {
      return false;
    }
  }
}
