/**
 * greeting.ts — the session's opening: the connect-stage rules, the greeting and pregreet.
 *
 * A `Greeting` owns what happens between the accepted connection and the first command read:
 * the connect-stage verdict (a 5xx instead of 220 then only QUIT, RFC 5321 §3.1; a 4xx or a
 * closing reply ends the session), the postscreen-style teaser ("220-" at once, the rest after
 * limits.greetDelay), and pregreet detection: bytes that arrive before the greeting are counted
 * and classified (TLS, HTTP, SMTP); a client that talked first is a violation, logged, and
 * dropped with limits.pregreetAction = drop. Until `sent`, the session reads no command.
 *
 * The session keeps the socket, the input buffer (the early bytes stay in it, read as commands
 * after the greeting), the rule pipeline (the rules are called through the host) and its end.
 */
import type { Logger } from 'pino';
import type { Limits } from '../config/schema.js';
import type { StageVerdict } from '../pipeline/verdict.js';
import { R, reply, type Reply } from '../protocol/reply.js';

/** What the greeting needs of its session. */
export interface GreetingHost {
  readonly hostname: string;
  /** The current limits (read at each use: limits reload). */
  limits(): Limits;
  readonly log: Logger;
  /** For the pregreet log line. */
  readonly session: string;
  readonly client: string;
  /** The connect-stage rules' verdict. */
  connectRules(): StageVerdict | Promise<StageVerdict>;
  isClosed(): boolean;
  /** Writes a reply now. */
  send(r: Reply): void;
  /** Writes the first line of a multi-line reply (the "220-" teaser). */
  sendContinued(r: Reply): void;
  /** The reply about to be sent ends the session, for `reason` (the session log's outcome). */
  ending(reason: string): void;
  /** Refused at connect with a 5xx: the session now answers only QUIT (guards.ts). */
  refusedAtConnect(): void;
  violation(kind: string): void;
  /** The greeting is out: read the commands received so far. */
  pump(): void;
}

export class Greeting {
  /** Greeting sent (or the reply instead of it): commands may be read. */
  sent = false;
  /** Bytes received before the greeting (pregreet), and what they looked like. */
  private pregreet = 0;
  private pregreetKind = '';

  constructor(private readonly host: GreetingHost) {}

  /** The client sent something before the greeting. */
  get talked(): boolean {
    return this.pregreet > 0;
  }

  /** Bytes received before the greeting: counted, the first chunk classified. */
  early(chunk: Buffer): void {
    if (this.pregreet === 0) this.pregreetKind = chunk[0] === 0x16 ? 'tls' : /^(GET|POST|HEAD|CONNECT) /.test(chunk.subarray(0, 8).toString('latin1')) ? 'http' : 'smtp';
    this.pregreet += chunk.length;
  }

  /** The connect-stage rules, then the greeting (or the refusal instead of it). */
  async run(): Promise<void> {
    const host = this.host;
    const connect = await host.connectRules();
    if (host.isClosed()) return;
    if (connect.reply) {
      if (connect.reply.code >= 500) {
        // RFC 5321 §3.1: 554 instead of 220, then wait for QUIT and answer 503 meanwhile.
        host.refusedAtConnect();
        host.ending('refused');
        this.sent = true;
        host.send(connect.reply);
        host.pump();
        return;
      }
      host.ending('refused');
      host.send(connect.reply.closes ? connect.reply : R.unavailable(host.hostname));
      return;
    }
    // postscreen-style teaser: "220-" now, the rest after greetDelay; early talkers are caught.
    const teaser = host.limits().greetDelay > 0;
    if (teaser) host.sendContinued(R.greeting(host.hostname));
    const teaserWait = teaser ? new Promise((r) => setTimeout(r, host.limits().greetDelay)) : Promise.resolve();
    await teaserWait;
    if (host.isClosed()) return;
    if (this.pregreet > 0) {
      // A client that talks before the greeting is not an MTA waiting its turn (postscreen pregreet).
      const kind = this.pregreetKind;
      host.violation('pregreet');
      host.log.info({ session: host.session, client: host.client, bytes: this.pregreet, kind }, 'client talked before the greeting');
      if (host.limits().pregreetAction === 'drop') {
        host.ending('pregreet');
        this.sent = true;
        host.send(R.protocolError());
        return;
      }
    }
    this.sent = true;
    host.send(teaser ? reply(220, '', `${host.hostname} ESMTP`) : R.greeting(host.hostname));
    host.pump();
  }
}
