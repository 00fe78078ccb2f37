/**
 * etrn.ts — the ETRN command (RFC 1985): relayed to a backend that offers it (Postfix flushes the
 * node's deferred mail), after the etrn-stage rules (the relay rule: clients with relay rights
 * only); 502 when the backend does not offer it. Its reply is the backend's.
 *
 * The session keeps its state (HELO/EHLO, the backend's capabilities, the transaction), the rule
 * pipeline (the rules are called through the host) and the backend connection.
 */
import { BackendConnection } from '../backend/connection.js';
import type { StageVerdict } from '../pipeline/verdict.js';
import { R, type Reply } from '../protocol/reply.js';
import type { Pending } from './reply-writer.js';

/** A domain, "@domain" (its subdomains too) or "#queue" (RFC 1985 §5), as Postfix takes them. */
const NODE = /^[@#]?[A-Za-z0-9][A-Za-z0-9.-]{0,254}$/;

/** What ETRN needs of its session. */
export interface EtrnHost {
  /** The client said HELO or EHLO. */
  readonly helo: boolean;
  /** The backend offered ETRN (in its EHLO reply). */
  readonly offered: boolean;
  /** A transaction is open (ETRN is refused inside one). */
  readonly inTransaction: boolean;
  /** Queues ETRN's reply. */
  queue(r: Pending): void;
  /** The etrn-stage rules' verdict for `node`. */
  rules(node: string): StageVerdict | Promise<StageVerdict>;
  /** The backend connection, or the client's reply when there is none. */
  backend(): Promise<BackendConnection | Reply>;
  /** A backend failure during the command: the client's reply (the session ends). */
  failed(e: unknown): Reply;
}

/** The ETRN command with its argument `arg`. */
export async function etrn(host: EtrnHost, arg: string): Promise<void> {
  if (!host.helo) return host.queue(R.needHelo());
  if (!host.offered) return host.queue(R.notImplemented());
  if (host.inTransaction) return host.queue(R.authInTransaction());
  const node = arg.trim();
  if (!NODE.test(node)) return host.queue(R.syntax('ETRN domain'));
  const v = await host.rules(node);
  if (v.reply) return host.queue(v.reply);
  const b = await host.backend();
  if (!(b instanceof BackendConnection)) return host.queue(b);
  host.queue(b.command(`ETRN ${node}`).catch((e: unknown) => host.failed(e)));
}
