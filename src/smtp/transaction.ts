/**
 * transaction.ts — one mail transaction, from MAIL to its end of data (or RSET, HELO, STARTTLS).
 *
 * Owns what a transaction holds: the sender, its parameters and SMTPUTF8; the recipients tried,
 * forwarded and accepted by the backend; the backend's answer to MAIL — sent at once, or deferred
 * to the first RCPT the rules let through (backend.deferMail) — and that MAIL's refusal as the
 * answer to every RCPT; the transaction's tags and its allowlisting by a MAIL-stage accept. Also
 * MAIL's and RCPT's argument checks (syntax, parameters, SMTPUTF8, the recipient limit) and RSET
 * towards the backend. The session keeps the order of work (rules, which backend, the replies'
 * queue) and which transaction is current; a transaction is told per call what it needs (the
 * backend connection, how a backend failure becomes a reply).
 */
import type { BackendConnection, Capabilities } from '../backend/connection.js';
import type { ParsedPath } from '../protocol/address.js';
import type { AuthResult } from '../protocol/auth-results.js';
import { formatMailRcpt, parseMailRcpt, type MailParam } from '../protocol/params.js';
import { R, reply, replyClass, type Reply } from '../protocol/reply.js';
import { checkParams } from './extensions.js';
import type { TxnLog } from './session-log.js';

/** A MAIL FROM or RCPT TO argument that parsed: its path and parameters. */
export interface PathArg {
  readonly path: ParsedPath;
  readonly params: readonly MailParam[];
}

/** MAIL FROM's path and parameters, or the reply refusing its syntax. */
export function parseMail(arg: string): PathArg | Reply {
  const p = parseMailRcpt(arg, 'FROM');
  if (p.ok) return p;
  if (p.code === 'syntax') return R.syntax('MAIL FROM:<address>');
  if (p.code === 'param') return R.badParam(p.reason);
  return reply(501, '5.1.7', `Bad sender address syntax: ${p.reason}`);
}

/** RCPT TO's path and parameters, or the reply refusing its syntax. */
export function parseRcpt(arg: string): PathArg | Reply {
  const p = parseMailRcpt(arg, 'TO');
  if (p.ok) return p;
  if (p.code === 'syntax') return R.syntax('RCPT TO:<address>');
  if (p.code === 'param') return R.badParam(p.reason);
  return reply(501, '5.1.3', `Bad recipient address syntax: ${p.reason}`);
}

/** The argument parsed (not a reply refusing it). */
export function parsed(p: PathArg | Reply): p is PathArg {
  return 'path' in p;
}

/** MAIL's parameters (SIZE within `size`, those the backend offers) and SMTPUTF8: the refusal, or null. */
export function mailRefused(p: PathArg, caps: Capabilities, size: number): Reply | null {
  const checked = checkParams('MAIL', p.params, caps, size);
  if (checked) return checked;
  if (p.path.utf8 && !declaresUtf8(p.params)) return R.utf8NotDeclared();
  return null;
}

function declaresUtf8(params: readonly MailParam[]): boolean {
  return params.some((x) => x.key === 'SMTPUTF8');
}

/**
 * RSET: answered here when the backend has nothing to reset (no MAIL since the last end of data,
 * RSET or HELO), as the backend would; else relayed (a failure still answers 250).
 */
export function reset(b: BackendConnection | null): Reply | Promise<Reply> {
  if (!b?.alive || !b.transactionOpen) return R.rsetOk();
  return b.command('RSET').catch(() => R.rsetOk());
}

export class Transaction {
  readonly smtputf8: boolean;
  /** Recipients the backend accepted. */
  readonly rcpts: ParsedPath[] = [];
  /** RCPT commands forwarded (accepted or pending). */
  rcptForwarded = 0;
  /** RCPT commands tried (any outcome). */
  rcptTried = 0;
  /** The backend's answer to MAIL; null while a deferred MAIL waits for the first RCPT (backend.deferMail). */
  mail: Promise<Reply> | null = null;
  /** The backend refused the deferred MAIL (or was lost): the answer to every RCPT of this transaction. */
  mailRefused: Reply | null = null;
  readonly tags: string[] = [];
  /** Authentication results of this transaction's rules (SessionSnapshot.authResults), each once. */
  readonly authResults: AuthResult[] = [];

  constructor(
    readonly sender: ParsedPath,
    readonly params: readonly MailParam[],
    readonly log: TxnLog,
    /** The rule whose `accept` at MAIL allowlisted this transaction (and no other). */
    readonly acceptedBy?: string,
  ) {
    this.smtputf8 = declaresUtf8(params);
  }

  /** Adds the results a stage's rules gave (a result already held, repeated at each RCPT, is kept once). */
  addAuthResults(results: readonly AuthResult[]): void {
    for (const r of results) if (!this.authResults.some((x) => sameResult(x, r))) this.authResults.push(r);
  }

  /** MAIL to the backend now (not deferred); `refused` is told when the backend says no. */
  sendMail(b: BackendConnection, on: { refused: () => void; failed: (e: unknown) => Reply }): Promise<Reply> {
    this.mail = b.command(formatMailRcpt('MAIL FROM', this.sender, this.params)).then(
      (x) => {
        if (x.code !== 250) on.refused();
        return x;
      },
      (e: unknown) => on.failed(e),
    );
    return this.mail;
  }

  /** RCPT's parameters, SMTPUTF8 and the recipient limit: the refusal, or null. */
  rcptRefused(p: PathArg, caps: Capabilities, size: number, maxRecipients: number): Reply | null {
    const checked = checkParams('RCPT', p.params, caps, size);
    if (checked) return checked;
    if (p.path.utf8 && !this.smtputf8) return R.utf8NotDeclared();
    if (this.rcptForwarded >= maxRecipients) return R.tooManyRcpts();
    return null;
  }

  /**
   * RCPT to the backend, after a deferred MAIL (`sendMail`, in the same write) when none was sent
   * yet. The answer is the backend's, or — when it refused the deferred MAIL before it (or was
   * lost) — that refusal, counted once. Replies come in order: MAIL's before this RCPT's.
   */
  async forwardRcpt(
    b: BackendConnection,
    p: PathArg,
    on: { sendMail: () => Promise<Reply>; failed: (e: unknown) => Reply },
  ): Promise<Reply> {
    this.mail ??= on.sendMail();
    this.rcptForwarded++;
    const sent = b.command(formatMailRcpt('RCPT TO', p.path, p.params));
    await this.mail;
    const x = await sent.catch((e: unknown) => this.mailRefused ?? on.failed(e));
    const r = this.mailRefused ?? x;
    if (replyClass(r) === 2) this.rcpts.push(p.path);
    else this.rcptForwarded--;
    return r;
  }
}

function sameResult(a: AuthResult, b: AuthResult): boolean {
  return (
    a.method === b.method &&
    a.result === b.result &&
    a.reason === b.reason &&
    a.props.length === b.props.length &&
    a.props.every(([k, v], i) => b.props[i]?.[0] === k && b.props[i]?.[1] === v)
  );
}
