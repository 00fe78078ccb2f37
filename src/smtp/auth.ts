/**
 * auth.ts — the AUTH relay: a SASL exchange between the client and the backend.
 *
 * doorman does not authenticate anyone: the backend does (Postfix with its SASL). This part
 * parses the AUTH command, relays each 334 challenge to the client and each response to the
 * backend, checks the responses (base64 or "*", one line, no NUL or bare CR) and cancels the
 * exchange at the backend ("*") when the client sends something else. It learns the login name
 * from PLAIN and LOGIN for the log and the rules (never the password).
 *
 * `AuthCommand` is the AUTH command's handler: when AUTH is allowed (after EHLO, once, outside a
 * transaction, offered by the backend, over TLS unless the listener allows plaintext), the
 * auth-stage rules (called through the host: the session builds the event), the relay, and the
 * failure count (limits.maxAuthFailures: 421 and the session ends). The session keeps who
 * authenticated (its snapshot, the EHLO keywords, the log line).
 */
import { BackendConnection, type Capabilities } from '../backend/connection.js';
import type { StageVerdict } from '../pipeline/verdict.js';
import { R, reply, type Reply } from '../protocol/reply.js';
import type { Command } from './commands.js';
import { authMechanisms } from './extensions.js';
import type { CommandEvent } from './framing.js';
import type { Pending } from './reply-writer.js';

/** What the relay needs of its session. */
export interface AuthHost {
  /** Writes a 334 challenge to the client. */
  challenge(r: Reply): void;
  /** The client's next line; null if it went away. */
  readLine(): Promise<CommandEvent | null>;
  isClosed(): boolean;
  /** Client lines are SASL responses (their own length limit) while on. */
  setSasl(on: boolean): void;
  /** A backend failure during a command, as the client's reply. */
  failed(e: unknown): Reply;
}

/** The relay's end: the client left (null), cancelled (no login attempt counted), or the backend's final reply. */
export type AuthResult = null | { cancelled: Reply } | { reply: Reply; login: string | null };

/** "AUTH mechanism [initial-response]"; null when malformed. */
export function parseAuth(arg: string): { mechanism: string; initial: string | undefined } | null {
  const [mechRaw = '', initial] = arg.trim().split(/\s+/);
  const mechanism = mechRaw.toUpperCase();
  if (!/^[A-Z0-9_-]{1,20}$/.test(mechanism) || (initial !== undefined && !/^([A-Za-z0-9+/]+=*|=)$/.test(initial))) return null;
  return { mechanism, initial };
}

/** The login an AUTH command names before any challenge (PLAIN with an initial response). */
export function initialLogin(mechanism: string, initial: string | undefined): string | null {
  return mechanism === 'PLAIN' && initial ? plainLogin(initial) : null;
}

/** Relays one AUTH exchange to `b`, starting with the client's AUTH command. */
export async function relayAuth(host: AuthHost, b: BackendConnection, mechanism: string, initial: string | undefined, known: string | null): Promise<AuthResult> {
  let login = known;
  let r = await b.command(`AUTH ${mechanism}${initial !== undefined ? ' ' + initial : ''}`).catch((e: unknown) => host.failed(e));
  let step = 0;
  host.setSasl(true);
  try {
    while (r.code === 334 && !host.isClosed()) {
      host.challenge(r);
      const ev = await host.readLine();
      if (!ev) return null;
      if (ev.type !== 'line' || ev.bareCr || ev.line.includes(0)) {
        // Cancel at the backend and tell the client.
        await b.command('*').catch(() => undefined);
        return { cancelled: ev.type === 'too_long' ? R.lineTooLong() : R.authCancelled() };
      }
      const resp = ev.line.toString('latin1');
      if (resp !== '*' && !/^([A-Za-z0-9+/]*=*)$/.test(resp)) {
        await b.command('*').catch(() => undefined);
        return { cancelled: reply(501, '5.5.2', 'Error: cannot decode response') };
      }
      if (mechanism === 'PLAIN' && step === 0 && login === null) login = plainLogin(resp);
      if (mechanism === 'LOGIN' && step === 0 && initial === undefined) login = b64(resp);
      step++;
      r = await b.command(resp).catch((e: unknown) => host.failed(e));
    }
  } finally {
    host.setSasl(false);
  }
  return { reply: r, login: login ?? (mechanism === 'LOGIN' && initial ? b64(initial) : null) };
}

function b64(s: string): string | null {
  try {
    const v = Buffer.from(s, 'base64').toString('utf8');
    // eslint-disable-next-line no-control-regex
    return v && !/[\x00-\x1f]/.test(v) ? v : null;
  } catch {
    return null;
  }
}

/** RFC 4616: authzid NUL authcid NUL passwd → authcid (never the password). */
function plainLogin(resp: string): string | null {
  const parts = Buffer.from(resp, 'base64').toString('utf8').split('\0');
  return parts.length === 3 && parts[1] ? parts[1] : null;
}

/** What the AUTH command needs of its session, besides the relay's needs. */
export interface AuthCommandHost extends AuthHost {
  readonly hostname: string;
  /** limits.maxAuthFailures (read at each failure: limits reload). */
  maxFailures(): number;
  /** Where the session is: EHLO said, already authenticated, inside a transaction. */
  state(): { ehlo: boolean; authenticated: boolean; inTransaction: boolean };
  /** The backend's EHLO capabilities (its AUTH mechanisms). */
  caps(): Capabilities;
  /** AUTH may be used on this connection (TLS, or the listener allows plaintext). */
  allowed(): boolean;
  /** Queues the AUTH reply (counted as the AUTH command's). */
  queue(r: Pending): void;
  /** The auth-stage rules' verdict. */
  rules(mechanism: string, login: string | null): StageVerdict | Promise<StageVerdict>;
  /** The session's backend connection, or the client's reply when there is none. */
  backend(): Promise<BackendConnection | Reply>;
  /** The backend said 235. */
  authenticated(mechanism: string, login: string | null): void;
  /** Too many failed attempts: counted, and the session ends after the 421. */
  flood(): void;
}

/** The AUTH command of one session, with its failure count. */
export class AuthCommand {
  private failures = 0;

  constructor(private readonly host: AuthCommandHost) {}

  async handle(c: Command): Promise<void> {
    const h = this.host;
    const st = h.state();
    if (!st.ehlo) return h.queue(R.needHelo());
    if (st.authenticated) return h.queue(R.authAlready());
    if (st.inTransaction) return h.queue(R.authInTransaction());
    const mechs = authMechanisms(h.caps());
    if (!mechs) return h.queue(R.authNotAvailable());
    if (!h.allowed()) return h.queue(R.authNeedsTls());
    const parsed = parseAuth(c.arg);
    if (!parsed) return h.queue(R.syntax('AUTH mechanism [initial-response]'));
    const { mechanism, initial } = parsed;
    const login = initialLogin(mechanism, initial);
    const v = await h.rules(mechanism, login);
    if (v.reply) return h.queue(v.reply);
    const b = await h.backend();
    if (!(b instanceof BackendConnection)) return h.queue(b);
    const result = await relayAuth(h, b, mechanism, initial, login);
    if (!result) return;
    if ('cancelled' in result) return h.queue(result.cancelled);
    const r = result.reply;
    if (r.code === 235) h.authenticated(mechanism, result.login);
    h.queue(r);
    if (r.code !== 235 && ++this.failures >= h.maxFailures()) {
      h.flood();
      h.queue(reply(421, '4.7.0', `${h.hostname} Error: too many authentication failures`));
    }
  }
}
