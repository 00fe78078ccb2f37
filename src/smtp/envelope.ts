/**
 * envelope.ts — the commands that build a transaction: HELO/EHLO, MAIL, RCPT and RSET.
 *
 * Each checks its argument and the session's state, asks the rules of its stage (stages.ts),
 * then the backend: HELO/EHLO takes a backend connection and is answered from the capabilities
 * the backend offered on it (the EHLO keywords doorman advertises: extensions.ts); MAIL opens the
 * transaction (transaction.ts), its backend MAIL sent at once or deferred to the first RCPT the
 * rules let through; RCPT is forwarded, its reply queued with the rest of the client's pipelined
 * group.
 */
import { BackendConnection } from '../backend/connection.js';
import { addressOf } from '../protocol/address.js';
import { R, reply } from '../protocol/reply.js';
import { heloArgument, type Command } from './commands.js';
import type { SessionContext } from './context.js';
import { authMechanisms, ehloKeywords, sizeLimit } from './extensions.js';
import type { Pending } from './reply-writer.js';
import { mailRefused, parsed, parseMail, parseRcpt, reset, Transaction } from './transaction.js';

export async function helo(ctx: SessionContext, c: Command, verb: 'HELO' | 'EHLO'): Promise<void> {
  const { state: s, deps } = ctx;
  const name = heloArgument(c.arg);
  if (!name) return ctx.queue(verb, R.syntax(`${verb} hostname`));
  if (/[^\x21-\x7e]/.test(name)) return ctx.queue(verb, R.badSyntax('invalid characters in hostname'));
  const v = await ctx.stages.run('helo', () => ({ stage: 'helo', session: s.snapshot(), verb, name }));
  if (v.reply) return ctx.queue(verb, v.reply);
  if (v.acceptedBy) s.acceptedBy = v.acceptedBy;
  ctx.sessionLog.addTags(s.tags, v.tags);
  const b = await ctx.ensureBackend();
  if (!(b instanceof BackendConnection)) return ctx.queue(verb, b);
  // Answered from the capabilities the backend gave doorman on this connection; the backend
  // learns the client's name in the background (XCLIENT HELO=, or its EHLO), and the next
  // command that needs the backend waits for that answer (ensureBackend).
  ctx.link.bind(b, verb, name);
  s.helo = name;
  s.esmtp = verb === 'EHLO';
  s.txn = null;
  s.caps = verb === 'EHLO' ? b.offered : new Map();
  if (verb === 'HELO') return ctx.queue(verb, reply(250, '', deps.hostname));
  return ctx.queue(verb, reply(250, '', [deps.hostname, ...extensions(ctx)]));
}

/** The EHLO keywords (extensions.ts) for this session's backend, listener and state. */
function extensions(ctx: SessionContext): string[] {
  const s = ctx.state;
  const mechs = authMechanisms(s.caps);
  const auth = mechs && authAllowed(ctx) && !s.auth ? mechs : null;
  return ehloKeywords(s.caps, sessionSize(ctx), { starttls: !!ctx.deps.listener.secureContext && !s.tls, auth });
}

/** AUTH is offered and taken: over TLS, or on a listener that allows it in plaintext. */
export function authAllowed(ctx: SessionContext): boolean {
  return ctx.state.tls || ctx.deps.listener.authPlaintext;
}

/** The SIZE doorman advertises and enforces (extensions.ts). */
export function sessionSize(ctx: SessionContext): number {
  return sizeLimit(ctx.state.caps, ctx.deps.limits.maxMessageSize);
}

export async function mail(ctx: SessionContext, c: Command): Promise<void> {
  const { state: s, deps } = ctx;
  if (!s.helo) return ctx.queue('MAIL', R.needHelo());
  if (s.txn) return ctx.queue('MAIL', R.nestedMail());
  const p = parseMail(c.arg);
  if (!parsed(p)) return ctx.queue('MAIL', p);
  const log = ctx.sessionLog.newTxn(addressOf(p.path));
  const answer = (r: Pending) => ctx.queue('MAIL', r, (x) => (log.mail = x.code));
  const refused = mailRefused(p, s.caps, sessionSize(ctx));
  if (refused) return answer(refused);
  s.txnNumber++;
  const v = await ctx.stages.run('mail', () => ({ stage: 'mail', session: s.snapshot(), sender: p.path, params: p.params }));
  if (v.reply) return answer(v.reply);
  const b = await ctx.ensureBackend();
  if (!(b instanceof BackendConnection)) return answer(b);
  const txn = new Transaction(p.path, p.params, log, v.acceptedBy || undefined);
  ctx.sessionLog.addTags(txn.tags, v.tags);
  txn.addAuthResults(v.results);
  s.txn = txn;
  // Deferred: the syntax, parameters and size are checked here; the backend gets MAIL in one write
  // with the first RCPT the rules let through (a round trip less per message, none at all for a
  // transaction whose recipients are all refused here). Its refusal of the sender is then the
  // answer to that RCPT, as Postfix gives it with smtpd_delay_reject = yes.
  // Only in an ESMTP session: after HELO the backend has not offered PIPELINING to this client
  // (Postfix counts such commands as improper pipelining, smtpd_forbid_unauth_pipelining).
  if (deps.backend.deferMail && s.esmtp && b.pipelining) return answer(R.mailOk());
  answer(
    txn.sendMail(b, {
      refused: () => {
        if (s.txn === txn) s.txn = null;
      },
      failed: (e) => ctx.link.failed(e),
    }),
  );
}

export async function rcpt(ctx: SessionContext, c: Command): Promise<void> {
  const { state: s, deps } = ctx;
  if (!s.helo) return ctx.queue('RCPT', R.needHelo());
  const txn = s.txn;
  if (!txn) return ctx.queue('RCPT', R.needMail());
  txn.rcptTried++;
  const p = parseRcpt(c.arg);
  if (!parsed(p)) return ctx.queue('RCPT', p);
  const to = addressOf(p.path);
  const answer = (r: Pending) => ctx.queue('RCPT', r, (x) => ctx.sessionLog.noteRcpt(txn.log, to, x.code));
  const refused = txn.rcptRefused(p, s.caps, sessionSize(ctx), deps.limits.maxRecipients);
  if (refused) return answer(refused);
  const v = await ctx.stages.run('rcpt', () => ({ stage: 'rcpt', session: s.snapshot(), recipient: p.path, params: p.params }));
  if (v.reply) return answer(v.reply);
  if (s.txn !== txn) return answer(R.needMail());
  const b = ctx.link.conn;
  if (!b?.alive) return answer(R.lostBackend(deps.hostname));
  if (txn.mailRefused) return answer(txn.mailRefused);
  ctx.sessionLog.addTags(txn.tags, v.tags);
  answer(txn.forwardRcpt(b, p, { sendMail: () => ctx.link.sendDeferredMail(b, txn), failed: (e) => ctx.link.failed(e) }));
}

export function rset(ctx: SessionContext, c: Command): void {
  if (c.arg.trim()) return ctx.queue('RSET', R.syntax('RSET'));
  ctx.state.txn = null;
  ctx.queue('RSET', reset(ctx.link.conn));
}
