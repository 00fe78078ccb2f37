/**
 * context.ts — the session as its command handlers see it: one object, no host per part.
 *
 * The shared state (state.ts), the session's deps, its side of the rule pipeline (stages.ts),
 * its backend link (backend-link.ts), its log line (session-log.ts), how a reply is queued and
 * how a backend connection is got for a command. `Session` implements it.
 */
import type { BackendConnection } from '../backend/connection.js';
import type { Reply } from '../protocol/reply.js';
import type { BackendLink } from './backend-link.js';
import type { Pending } from './reply-writer.js';
import type { SessionLog } from './session-log.js';
import type { SessionStages } from './stages.js';
import type { SessionDeps, SessionState } from './state.js';

export interface SessionContext {
  readonly state: SessionState;
  readonly deps: SessionDeps;
  readonly stages: SessionStages;
  readonly link: BackendLink;
  readonly sessionLog: SessionLog;
  /** Queues the reply of the command being handled, counted (ReplyWriter.answer). */
  queue(verb: string, r: Pending, note?: (r: Reply) => void): void;
  /**
   * A backend for the next command (BackendLink.ensure); otherwise the client's reply, after
   * forgetting a HELO/EHLO the backend refused or noting why the session ends.
   */
  ensureBackend(): Promise<BackendConnection | Reply>;
}
