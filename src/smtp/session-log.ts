/**
 * session-log.ts — the one log line per session, and the bounds that keep it small.
 *
 * Owns what the line says about the session's transactions (each MAIL attempt: sender, each
 * recipient's reply, the message's fate) and the counts of what was left off: transactions past
 * MAX_LOGGED_TXNS, recipients past MAX_LOGGED_RCPTS, tags past their bound. The rule findings are
 * collected by the session (noteOutcome, bounded by MAX_LOGGED_OUTCOMES) and handed in when the
 * line is written, once, at the session's end (`written` says whether it was).
 */
import type { Logger } from 'pino';
import { ruleLogEntry, type RuleOutcome } from '../pipeline/verdict.js';

export { ruleLogEntry };

/** One MAIL attempt in the session log: sender, each recipient's reply, and the message's fate. */
export interface TxnLog {
  from: string;
  /** Reply code to MAIL. */
  mail: number;
  rcpts: { to: string; code: number }[];
  /** Recipients past MAX_LOGGED_RCPTS, counted only. */
  moreRcpts?: number;
  size?: number;
  outcome?: 'accepted' | 'rejected' | 'tempfailed';
  reply?: string;
  queueId?: string;
  rule?: string;
}

/** Bounds on one session's log line. */
const MAX_LOGGED_TXNS = 50;
const MAX_LOGGED_RCPTS = 100;
/** Rule findings (other than pass) kept for the session log line; the rest are counted (moreRules). */
export const MAX_LOGGED_OUTCOMES = 100;
/** Distinct tags kept per session and per transaction (each becomes an X-Doorman-Tag header); the rest are counted (moreTags). */
export const MAX_TAGS = 10;

/** What the session tells the log line about itself when it ends. */
export interface SessionFacts {
  session: string;
  client: string;
  port: number;
  listener: string;
  backend: string | null;
  helo: string | null;
  tls: boolean;
  login: string | null;
  outcomes: readonly RuleOutcome[];
  droppedOutcomes: number;
  outcome: string;
  commands: number;
  errors: number;
  started: number;
}

export class SessionLog {
  private readonly txnLogs: TxnLog[] = [];
  private droppedTxnLogs = 0;
  private droppedTags = 0;
  /** The line was written (the session ended). */
  written = false;

  constructor(private readonly log: Logger) {}

  /** A new MAIL attempt's entry (counted only past MAX_LOGGED_TXNS). */
  newTxn(from: string): TxnLog {
    const log: TxnLog = { from, mail: 0, rcpts: [] };
    if (this.txnLogs.length < MAX_LOGGED_TXNS) this.txnLogs.push(log);
    else this.droppedTxnLogs++;
    return log;
  }

  /** A recipient's reply in its transaction's entry (counted only past MAX_LOGGED_RCPTS). */
  noteRcpt(txn: TxnLog, to: string, code: number): void {
    if (txn.rcpts.length < MAX_LOGGED_RCPTS) txn.rcpts.push({ to, code });
    else txn.moreRcpts = (txn.moreRcpts ?? 0) + 1;
  }

  /** Adds tags not yet in `list`, at most `max`; the rest are counted for the log. */
  addTags(list: string[], tags: readonly string[], max = MAX_TAGS): void {
    for (const t of tags) {
      if (list.includes(t)) continue;
      if (list.length < max) list.push(t);
      else this.droppedTags++;
    }
  }

  /** Writes the session's log line (once). */
  write(f: SessionFacts): void {
    if (this.written) return;
    this.written = true;
    this.log.info(
      {
        session: f.session,
        // The front that saw the session: this SMTP session's, or fronts/ (policy, milter).
        front: 'smtp',
        client: f.client,
        port: f.port,
        listener: f.listener,
        backend: f.backend,
        helo: f.helo,
        tls: f.tls,
        login: f.login,
        transactions: this.txnLogs,
        ...(this.droppedTxnLogs ? { moreTransactions: this.droppedTxnLogs } : {}),
        rules: f.outcomes.map(ruleLogEntry),
        ...(f.droppedOutcomes ? { moreRules: f.droppedOutcomes } : {}),
        ...(this.droppedTags ? { moreTags: this.droppedTags } : {}),
        outcome: f.outcome,
        commands: f.commands,
        errors: f.errors,
        ms: Date.now() - f.started,
      },
      'session',
    );
  }
}

