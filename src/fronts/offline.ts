/**
 * offline.ts — one described session through the one pipeline, without a socket: the shared
 * runner of `doorman explain` (fronts/explain.ts) and `doorman replay`.
 *
 * `runOffline(input, deps)` drives a FrontSession (fronts/session.ts) through the stages in the
 * order and with the meaning of the SMTP session (smtp/greeting.ts, envelope.ts, auth.ts,
 * inbound.ts; not imported: fronts never import smtp/):
 *   connect        a 5xx answers 554 instead of the greeting (the client can only QUIT), a 4xx
 *                  421 and the connection closes: nothing else is evaluated;
 *   helo           HELO or EHLO (`esmtp`); refused, the client has no HELO: every MAIL gets 503;
 *   auth           when `login` is given: the rules before the backend sees AUTH (the session
 *                  not yet authenticated); passed, the backend is taken to say 235; refused, the
 *                  session goes on unauthenticated (as the SMTP session does);
 *   mail           per transaction: refused, the transaction stops there;
 *   rcpt           per recipient: a refused one is not in the snapshot of later stages;
 *   DATA           when some recipient passed and the header block or the message is known
 *                  (354; no rule stage);
 *   data_headers   when the header block is known (`headers`, or the message's own up to its
 *                  blank line, at most `maxHeaderBytes`); a refusal is the message's answer;
 *   body, data_end when the message is known: its bytes to the rules that read the body, then
 *                  data_end with its size; the final reply;
 *   quit           the rules' end hooks (the session's log line, `front` explain or replay).
 * A transaction after one whose recipients were all refused starts with RSET, as a client must.
 *
 * What the backend would answer (EHLO, AUTH's 235, RCPT, DATA's 354, the final 250) is assumed
 * to be a yes and marked `assumed` in the conversation: only the rules are evaluated. Dry-run
 * rules are waited for (their findings are the point of an explanation). Not modelled: the SMTP
 * session's own checks before the rules (MAIL/RCPT parameters against the backend's EHLO,
 * limits.maxRecipients, SIZE, line lengths) and STARTTLS (`tls` says whether the session is
 * encrypted). The rules keep their deps: `explain` builds them over a look-only store
 * (store/look-only.ts), so that nothing is counted.
 *
 * Input that cannot describe a session (an address that does not parse, a listener that is not
 * configured) throws an OfflineInputError naming the field.
 */
import net from 'node:net';
import type { Logger } from 'pino';
import { LIMIT_DEFAULTS } from '../config/defaults.js';
import type { RuleSet } from '../config/rules.js';
import type { Metrics } from '../metrics/registry.js';
import { parseAddress, type ClientAddress } from '../net/ip.js';
import type { SessionEvent, SessionSnapshot, Stage } from '../pipeline/events.js';
import type { LoadedRule } from '../pipeline/loaded.js';
import { inScope } from '../pipeline/scope.js';
import type { RuleOutcome, StageVerdict } from '../pipeline/verdict.js';
import { parsePath, type ParsedPath } from '../protocol/address.js';
import { formatMailRcpt, type MailParam } from '../protocol/params.js';
import { formatReply, R, reply, replyClass, type Reply } from '../protocol/reply.js';
import type { SessionRecordInput, TransactionRecord } from '../record/format.js';
import { FrontSession } from './session.js';

/** Bytes of the message handed to the body readers at a time (back-pressure between chunks). */
export const OFFLINE_CHUNK_BYTES = 65_536;

/**
 * A session as the rules see it: explain's input, and a record line's `session` (record/format.ts,
 * whose fields it is) with, for explain, the whole message of a transaction.
 */
export interface SessionInput extends Omit<SessionRecordInput, 'transactions'> {
  transactions: (TransactionRecord & {
    /** The whole message (explain --message), CRLF line ends, not dot-stuffed, when known. */
    message?: Buffer;
  })[];
}

/** A reply as data. */
export interface ReplyData {
  code: number;
  enhanced: string;
  text: string;
}

export type Result = 'accepted' | 'refused' | 'tempfailed';

/** One stage's evaluation. */
export interface StageReport {
  stage: Stage;
  /** The transaction (index in SessionInput.transactions) for mail and later stages. */
  transaction?: number;
  /** The recipient, for rcpt. */
  recipient?: string;
  /** Each rule's finding, reason, action, effect (and reply) in rule order. */
  outcomes: RuleOutcome[];
  /** Rules that act on this stage but were not asked, and why. */
  skipped: { rule: string; why: string }[];
  /** The rule whose refusal is the answer. */
  decidedBy: string | null;
  /** The rule whose accept allowlisted (this stage, or earlier for the session or transaction). */
  acceptedBy: string | null;
  tags: string[];
  /** The refusal, or null: the stage let the command through. */
  reply: ReplyData | null;
}

/** One line of the conversation: what the client says and what it is answered. */
export interface ConversationLine {
  /** The client's command (absent: the greeting). */
  client?: string;
  /** The reply, its lines separated by "\n" as on the wire (without CRLF). */
  server: string;
  /** The backend's answer in a real session, assumed here (only the rules are evaluated). */
  assumed?: boolean;
}

export interface RecipientReport {
  to: string;
  /** The RCPT reply; null when RCPT was not sent (the transaction stopped before). */
  reply: ReplyData | null;
  result: Result;
  decidedBy: string | null;
}

export interface TransactionReport {
  from: string;
  /** The MAIL reply; null when MAIL was not sent (the session stopped before). */
  mail: ReplyData | null;
  rcpts: RecipientReport[];
  /** The answer to the message, when it was evaluated (header block or message known). */
  data: { reply: ReplyData; decidedBy: string | null; evaluated: 'headers' | 'message' } | null;
  tags: string[];
  /** accepted: MAIL, some recipient and (when evaluated) the message passed; else the answer that stopped it. */
  result: Result;
}

export interface SessionReport {
  client: string;
  listener: { name: string; role: SessionSnapshot['listener']['role'] };
  stages: StageReport[];
  conversation: ConversationLine[];
  /** The connect or HELO refusal that ended the session early, if any. */
  refusedAt: 'connect' | 'helo' | null;
  transactions: TransactionReport[];
  /** The worst answer of the session (connect, HELO, AUTH, MAIL, each recipient, each message): refused (any 5xx), else tempfailed (any 4xx), else accepted. */
  result: Result;
}

export interface OfflineDeps {
  /** The rule set (config/rules.ts loadRuleSet) with the resolver and store the caller chose. */
  readonly rules: RuleSet;
  readonly metrics: Metrics;
  readonly log: Logger;
  /** doorman's host name, in the greeting and the replies. */
  readonly hostname: string;
  /** The configured listeners (config/schema.ts listenerRefs): `SessionInput.listener` is one of them. */
  readonly listeners: readonly { readonly name: string; readonly role: SessionSnapshot['listener']['role'] }[];
  /** The log line's `front`; default explain. */
  readonly front?: 'explain' | 'replay';
  /** limits.maxHeaderBytes: the header block the data_headers rules get at most. */
  readonly maxHeaderBytes?: number;
}

/** Input that cannot describe a session; `field` names it (client, listener, helo, from, rcpt). */
export class OfflineInputError extends Error {
  constructor(
    readonly field: 'client' | 'listener' | 'helo' | 'from' | 'rcpt',
    message: string,
  ) {
    super(message);
    this.name = 'OfflineInputError';
  }
}

const data = (r: Reply): ReplyData => ({ code: r.code, enhanced: r.enhanced, text: r.lines.join('\n') });
/** The reply as the client reads it (protocol/reply.ts formats it), lines separated by "\n". */
const wire = (r: Reply): string => formatReply(r).toString().replace(/\r\n$/, '').replace(/\r\n/g, '\n');
const resultOf = (r: Pick<Reply, 'code'>): Result => (replyClass(r) === 5 ? 'refused' : replyClass(r) === 4 ? 'tempfailed' : 'accepted');
const worst = (a: Result, b: Result): Result => (a === 'refused' || b === 'refused' ? 'refused' : a === 'tempfailed' || b === 'tempfailed' ? 'tempfailed' : 'accepted');

/** The backend's answers, assumed (only the rules are evaluated offline). */
const ASSUMED = {
  authOk: () => reply(235, '2.7.0', 'Authentication successful'),
  rcptOk: () => reply(250, '2.1.5', 'Ok'),
  queued: () => reply(250, '2.0.0', 'Ok: queued'),
};

/** Checks the input and parses its addresses; throws OfflineInputError. */
function parseInput(input: SessionInput, deps: OfflineDeps) {
  if (!net.isIP(input.client)) throw new OfflineInputError('client', `not an IP address: ${JSON.stringify(input.client)}`);
  const client: ClientAddress = parseAddress(input.client);
  const listener = deps.listeners.find((l) => l.name === input.listener) ?? deps.listeners.find((l) => l.role === input.listener);
  if (!listener) {
    const known = deps.listeners.map((l) => `${l.name} (${l.role})`).join(', ') || 'none';
    throw new OfflineInputError('listener', `no listener named ${JSON.stringify(input.listener)} nor one of that role; the configured listeners are ${known}`);
  }
  if (input.helo !== null && !/^[\x21-\x7e]+$/.test(input.helo)) throw new OfflineInputError('helo', `not a HELO name: ${JSON.stringify(input.helo)} (printable ASCII without spaces)`);
  const path = (field: 'from' | 'rcpt', text: string): ParsedPath => {
    const bare = text.startsWith('<') && text.endsWith('>') ? text.slice(1, -1) : text;
    const r = parsePath(bare);
    if (!r.ok) throw new OfflineInputError(field, `${JSON.stringify(text)} does not parse: ${r.reason}`);
    if (field === 'rcpt' && r.path.isNull) throw new OfflineInputError('rcpt', 'a recipient cannot be the null path <>');
    return r.path;
  };
  const transactions = input.transactions.map((t) => ({
    ...t,
    sender: path('from', t.from),
    params: paramsOf(t.fromParams),
    recipients: t.rcpts.map((r) => ({ to: r.to, path: path('rcpt', r.to), params: paramsOf(r.params) })),
  }));
  return { client, listener, transactions };
}

function paramsOf(p: Record<string, string> | undefined): MailParam[] {
  return Object.entries(p ?? {}).map(([key, value]) => ({ key: key.toUpperCase(), value: value === '' ? null : value }));
}

/** The header block as the SMTP session hands it to data_headers: the fields up to the blank line (without it), at most `limit` bytes. */
export function headerBlockOf(message: Buffer, limit: number): { headers: Buffer; truncated: boolean } {
  if (message.subarray(0, 2).equals(Buffer.from('\r\n'))) return { headers: Buffer.alloc(0), truncated: false };
  const end = message.indexOf('\r\n\r\n');
  if (end >= 0 && end + 2 <= limit) return { headers: message.subarray(0, end + 2), truncated: false };
  return { headers: message.subarray(0, Math.min(message.length, limit)), truncated: true };
}

/** Runs one described session through the rules; never touches a socket. */
export async function runOffline(input: SessionInput, deps: OfflineDeps): Promise<SessionReport> {
  const { client, listener, transactions } = parseInput(input, deps);
  const s = new FrontSession(
    // Dry-run checks are waited for: an explanation lists every finding.
    { front: deps.front ?? 'explain', listener, rules: deps.rules, metrics: deps.metrics, log: deps.log, maxPendingDryRun: 0 },
    { client, clientPort: input.clientPort ?? 0, localAddress: input.localAddress ?? '' },
  );
  s.tls = input.tls;
  const host = deps.hostname;
  const stages: StageReport[] = [];
  const conversation: ConversationLine[] = [];
  const say = (cmd: string | undefined, r: Reply, assumed = false) => conversation.push({ ...(cmd === undefined ? {} : { client: cmd }), server: wire(r), ...(assumed ? { assumed } : {}) });
  const report: SessionReport = { client: client.text, listener: { ...listener }, stages, conversation, refusedAt: null, transactions: [], result: 'accepted' };

  /** One stage: the event built once (for the report's scope check too), its verdict recorded. */
  const run = async (make: () => SessionEvent, where: { transaction?: number; recipient?: string } = {}): Promise<StageVerdict> => {
    const event = make();
    const v = await s.run(event.stage, () => event);
    // A stage no rule acts on is not reported (nothing was asked).
    if (!deps.rules.stages.has(event.stage)) return v;
    const outcomes = [...v.outcomes];
    stages.push({
      stage: event.stage,
      ...where,
      outcomes,
      skipped: skippedRules(deps.rules.rules, event, outcomes),
      decidedBy: v.decidedBy,
      acceptedBy: v.acceptedBy ?? event.session.acceptedBy,
      tags: [...v.tags],
      reply: v.reply ? data(v.reply) : null,
    });
    return v;
  };

  try {
    // connect: the greeting, or the refusal instead of it.
    const connect = await run(() => ({ stage: 'connect', session: s.snapshot() }));
    if (connect.reply) {
      report.refusedAt = 'connect';
      report.result = resultOf(connect.reply);
      s.outcome = report.result === 'refused' ? 'rejected' : 'tempfailed';
      if (connect.reply.code >= 500) {
        // RFC 5321 §3.1: only QUIT is answered (503 to the rest).
        say(undefined, connect.reply);
        say('QUIT', R.bye(host));
      } else say(undefined, connect.reply.closes ? connect.reply : R.unavailable(host));
      report.transactions = transactions.map((t) => notReached(t.from, t.recipients, report.result));
      return report;
    }
    say(undefined, R.greeting(host));

    // HELO/EHLO.
    let heloOk = false;
    if (input.helo !== null) {
      const verb = input.esmtp ? 'EHLO' : 'HELO';
      const name = input.helo;
      const v = await run(() => ({ stage: 'helo', verb, name, session: s.snapshot() }));
      if (v.reply) {
        say(`${verb} ${name}`, v.reply);
        report.refusedAt = 'helo';
        report.result = resultOf(v.reply);
      } else {
        heloOk = true;
        s.helo = name;
        s.esmtp = input.esmtp;
        // The EHLO keywords are the backend's (intersected with doorman's): not known offline.
        say(`${verb} ${name}`, reply(250, '', host), input.esmtp);
      }
    }

    // AUTH: the rules before the backend sees it; passed, the backend is taken to accept. An
    // ESMTP command: without EHLO (none, HELO, or refused) the SMTP session answers 503.
    if (input.login !== null) {
      const mechanism = (input.authMechanism ?? 'PLAIN').toUpperCase();
      const login = input.login;
      const cmd = `AUTH ${mechanism} (login ${login})`;
      const v = heloOk && input.esmtp ? await run(() => ({ stage: 'auth', mechanism, login, session: s.snapshot() })) : { reply: R.needHelo() };
      if (v.reply) {
        say(cmd, v.reply);
        report.result = worst(report.result, resultOf(v.reply));
      } else {
        s.auth = { mechanism, login };
        say(cmd, ASSUMED.authOk(), true);
      }
    }

    let openTxn = false;
    for (const [i, t] of transactions.entries()) {
      if (openTxn) {
        say('RSET', R.rsetOk());
        openTxn = false;
      }
      const mailCmd = formatMailRcpt('MAIL FROM', t.sender, t.params);
      const tr: TransactionReport = { from: t.from, mail: null, rcpts: [], data: null, tags: [], result: 'accepted' };
      report.transactions.push(tr);
      const stop = (r: Reply, decidedBy: string | null) => {
        tr.result = resultOf(r);
        for (const rc of t.recipients) tr.rcpts.push({ to: rc.to, reply: null, result: tr.result, decidedBy });
      };
      if (!heloOk) {
        // No HELO (none given, or refused): the SMTP session answers MAIL with 503.
        say(mailCmd, R.needHelo());
        tr.mail = data(R.needHelo());
        stop(R.needHelo(), null);
        continue;
      }
      s.beginTransaction(t.sender);
      const mailV = await run(() => ({ stage: 'mail', sender: t.sender, params: t.params, session: s.snapshot() }), { transaction: i });
      const mailReply = mailV.reply ?? R.mailOk();
      say(mailCmd, mailReply);
      tr.mail = data(mailReply);
      if (mailV.reply) {
        stop(mailV.reply, mailV.decidedBy);
        s.txnFacts.outcome = tr.result;
        continue;
      }
      openTxn = true;
      let passed = 0;
      let rcptWorst: Result = 'accepted';
      for (const rc of t.recipients) {
        const v = await run(() => ({ stage: 'rcpt', recipient: rc.path, params: rc.params, session: s.snapshot() }), { transaction: i, recipient: rc.to });
        const r = v.reply ?? ASSUMED.rcptOk();
        say(formatMailRcpt('RCPT TO', rc.path, rc.params), r, !v.reply);
        s.logRcpt(rc.to, r.code);
        tr.rcpts.push({ to: rc.to, reply: data(r), result: resultOf(r), decidedBy: v.decidedBy });
        if (v.reply) {
          rcptWorst = worst(rcptWorst, resultOf(r));
          continue;
        }
        passed++;
        s.addRecipient(rc.path);
      }
      tr.tags = [...s.tags];
      if (passed === 0) {
        // No recipient: the client does not send DATA (the transaction stays open until RSET).
        tr.result = t.recipients.length ? rcptWorst : 'refused';
        s.txnFacts.outcome = tr.result;
        continue;
      }
      const message = t.message;
      const known = message ? headerBlockOf(message, deps.maxHeaderBytes ?? LIMIT_DEFAULTS.maxHeaderBytes) : t.headers !== undefined ? { headers: Buffer.from(t.headers, 'latin1'), truncated: false } : null;
      if (!known) continue;
      say('DATA', R.startData(), true);
      openTxn = false;
      const described = message ? `(the message, ${message.length} bytes) .` : '(a message with this header block) .';
      const h = await run(() => ({ stage: 'data_headers', headers: known.headers, truncated: known.truncated, session: s.snapshot() }), { transaction: i });
      let final: { r: Reply; decidedBy: string | null; assumed: boolean } | null = h.reply ? { r: h.reply, decidedBy: h.decidedBy, assumed: false } : null;
      if (!final && message) {
        for (let off = 0; off < message.length; off += OFFLINE_CHUNK_BYTES) await s.body([message.subarray(off, off + OFFLINE_CHUNK_BYTES)], false);
        await s.body([], true);
        const size = message.length;
        s.txnFacts.size = size;
        const end = await run(() => ({ stage: 'data_end', size, session: s.snapshot() }), { transaction: i });
        if (end.reply) final = { r: end.reply, decidedBy: end.decidedBy, assumed: false };
      }
      final ??= { r: ASSUMED.queued(), decidedBy: null, assumed: true };
      say(described, final.r, final.assumed);
      tr.data = { reply: data(final.r), decidedBy: final.decidedBy, evaluated: message ? 'message' : 'headers' };
      tr.tags = [...s.tags];
      tr.result = resultOf(final.r);
      s.txnFacts.outcome = tr.result;
    }
    for (const tr of report.transactions) {
      report.result = worst(report.result, tr.result);
      for (const rc of tr.rcpts) report.result = worst(report.result, rc.result);
    }
    say('QUIT', R.bye(host));
    return report;
  } finally {
    if (s.outcome === 'open') s.outcome = report.result === 'accepted' ? 'passed' : report.result === 'refused' ? 'rejected' : 'tempfailed';
    s.end('quit');
  }
}

/** A transaction the session never reached: each recipient gets the session's result. */
function notReached(from: string, rcpts: readonly { to: string }[], result: Result): TransactionReport {
  return { from, mail: null, rcpts: rcpts.map((r) => ({ to: r.to, reply: null, result, decidedBy: null })), data: null, tags: [], result };
}

/** The rules that act on the event's stage but have no outcome, and why they were not asked. */
function skippedRules(rules: readonly LoadedRule[], event: SessionEvent, outcomes: readonly RuleOutcome[]): { rule: string; why: string }[] {
  const asked = new Set(outcomes.map((o) => o.rule));
  const out: { rule: string; why: string }[] = [];
  for (const lr of rules) {
    const r = lr.rule;
    const acts = event.stage in r.checks || (event.stage === 'data_end' && r.body !== undefined);
    if (!acts || asked.has(r.name)) continue;
    const accepted = event.session.acceptedBy;
    const why = accepted && r.bypassable ? `allowlisted by ${accepted}` : !inScope(lr.scope, event) ? 'out of its scope' : 'a rule that is not bypassable refused first';
    out.push({ rule: r.name, why });
  }
  return out;
}
