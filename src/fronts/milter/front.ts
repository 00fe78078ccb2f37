/**
 * front.ts — the milter front: a `MilterHandler` (milter/server.ts) backed by a FrontSession
 * (fronts/session.ts), so that a Postfix or Sendmail keeping its own SMTP runs the one pipeline.
 *
 * One handler per SMTP session of the MTA. Its steps map to the stages as the SMTP session's do:
 *   connect — the client from CONNECT (or the `{client_addr}` / `{client_port}` macros when the
 *             MTA sent no address), listener role `milter`, `{daemon_name}` for the log;
 *   helo    — the name; TLS from `{tls_version}` (asked at HELO);
 *   mail    — `{auth_authen}` (the MTA's login) runs the auth stage once, so that relay and sender
 *             use the MTA's view; then a new transaction (several per session) and the mail stage;
 *   rcpt    — each recipient; the ones let through are in later snapshots;
 *   header, eoh — the header block rebuilt (`Name: value\r\n` … `\r\n`, bounded by
 *             limits.maxHeaderBytes, `truncated` past it) to the data_headers rules, then fed as the
 *             message's first chunk to the rules reading the body (dmarc, scanners);
 *   body    — each chunk to those readers as it arrives;
 *   eom     — data_end (size: header block plus body bytes); the verdict.
 * abort ends the transaction early (the next MAIL starts another); close ends the session (its
 * one log line, `front: "milter"`); so does a refusal at connect (the MTA asks nothing more).
 *
 * Verdicts: a refusal goes out with the rule's code, enhanced code and text (a 4xx as tempfail);
 * a refusal at connect or HELO answers every later step (the MTA normally stops asking). At eom a
 * message let through gets the X-Doorman-Tag fields (the session's and the transaction's tags),
 * an Authentication-Results field with doorman's host name as authserv-id inserted above all
 * others when rules authenticated something, and the incoming Authentication-Results fields that
 * claim that name deleted (RFC 8601 §5; index among the fields of that name). Rule errors follow
 * each rule's onError and dry-run findings are only logged: the pipeline does both.
 */
import type { RuleSet } from '../../config/rules.js';
import { parseAddress, type ClientAddress } from '../../net/ip.js';
import type { Stage } from '../../pipeline/events.js';
import type { StageVerdict } from '../../pipeline/verdict.js';
import { parsePath, splitPathArg, type ParsedPath } from '../../protocol/address.js';
import { claimsAuthservId, formatAuthResults } from '../../protocol/auth-results.js';
import type { MailParam } from '../../protocol/params.js';
import { FrontSession, type MtaFrontDeps } from '../session.js';
import { DOORMAN_PROTOCOL, SMFIP } from './codec.js';
import type { ConnectInfo, EomResult, HeaderAddition, HeaderDeletion, MilterHandler, MilterMacros, MilterVerdict } from './server.js';

/** Octets of the Authentication-Results value doorman adds (as the SMTP session's, smtp/trace.ts). */
export const MAX_AUTH_RESULTS_OCTETS = 2_000;
/** X-Doorman-Tag fields added to one message. */
export const MAX_TAG_HEADERS = 10;

const AUTH_RESULTS = 'Authentication-Results';
const TAG_HEADER = 'X-Doorman-Tag';
const CONTINUE: MilterVerdict = { kind: 'continue' };

export interface MilterFrontDeps extends MtaFrontDeps<'milter'> {
  /** doorman's host name: the authserv-id of its Authentication-Results. */
  readonly hostname: string;
}

/**
 * The protocol flags doorman asks the MTA for, given the rule set the connection will use: each
 * step no rule acts on is asked without a reply (NR_CONN, NR_HELO, NR_MAIL, NR_RCPT), end of
 * header only when a rule reads the header block or the body — every reply saved is a round trip the MTA's
 * smtpd does not wait for. The steps still come (their facts feed later stages' snapshots), the
 * header fields and body chunks too (the message's size, the Authentication-Results fields to
 * delete), and end of message always has its answer.
 *
 * MAIL keeps its reply while a HELO rule exists: Postfix and Sendmail make a refusal at connect
 * final by themselves, but a HELO refusal is answered again at MAIL by the front (sticky).
 */
export function milterProtocol(set: RuleSet): number {
  let p = PROTOCOL_OF.get(set);
  if (p === undefined) PROTOCOL_OF.set(set, (p = protocolOf(set)));
  return p;
}

/** milterProtocol per rule set: computed once, not at every milter connection. */
const PROTOCOL_OF = new WeakMap<RuleSet, number>();

function protocolOf(set: RuleSet): number {
  const has = (s: Stage) => set.stages.has(s);
  const readsBody = set.rules.some((r) => r.rule.body !== undefined);
  let p = DOORMAN_PROTOCOL;
  if (!has('connect')) p |= SMFIP.NR_CONN;
  if (!has('helo')) p |= SMFIP.NR_HELO;
  if (!has('mail') && !has('auth') && !has('helo')) p |= SMFIP.NR_MAIL;
  if (!has('rcpt')) p |= SMFIP.NR_RCPT;
  // DATA stays, with its reply, although no rule acts on it: Postfix's smtpd sends DATA's macros
  // anyway, and a lone packet doorman does not answer is not acknowledged at once (delayed ACK),
  // so Nagle holds the cleanup server's next write — the whole header and body — for ~40 ms per
  // message. Answering DATA sends the acknowledgement with the reply.
  if (!has('data_headers') && !readsBody) p |= SMFIP.NOEOH;
  return p;
}

/** A refusal as the milter gives it. */
export type MilterRefusal = Extract<MilterVerdict, { kind: 'reject' | 'tempfail' }>;

/** A refusal as the milter's verdict (null: none). */
export function verdictOf(v: StageVerdict): MilterRefusal | null {
  const r = v.reply;
  if (!r) return null;
  const text = r.lines.join(' ');
  const enhanced = r.enhanced || undefined;
  return r.code >= 500 ? { kind: 'reject', code: r.code, enhanced, text } : { kind: 'tempfail', code: r.code, enhanced, text };
}

/** ESMTP parameters as the milter gives them (`KEY=value`, `KEY`). */
function paramsOf(args: readonly string[]): MailParam[] {
  return args.map((a) => {
    const i = a.indexOf('=');
    return i < 0 ? { key: a.toUpperCase(), value: null } : { key: a.slice(0, i).toUpperCase(), value: a.slice(i + 1) };
  });
}

/** A sender or recipient as the milter gives it ("<a@b>", "<>", sometimes bare); null when unparsable. */
function pathOf(arg: string): ParsedPath | null {
  const split = splitPathArg(arg);
  if (!split) return null;
  const r = parsePath(split.path);
  return r.ok ? r.path : null;
}

function clientOf(info: ConnectInfo, m: MilterMacros): { client: ClientAddress; port: number } {
  for (const text of [info.family === '4' || info.family === '6' ? info.address : '', m.get('client_addr') ?? '']) {
    if (!text) continue;
    try {
      return { client: parseAddress(text), port: info.port || Number(m.get('client_port') ?? 0) || 0 };
    } catch {
      // Not an address: the next source.
    }
  }
  // A local client (unix socket, or an MTA that does not say): as from the loopback.
  return { client: parseAddress('127.0.0.1'), port: 0 };
}

export class MilterFront implements MilterHandler {
  private s: FrontSession | null = null;
  private release: () => void = () => undefined;
  /** A refusal at connect or HELO: every later step's answer. */
  private sticky: MilterVerdict | null = null;
  private authDone = false;
  /** The message in progress: the header block, its size, the claimed A-R fields. */
  private headers: string[] = [];
  private headerBytes = 0;
  private truncated = false;
  private arCount = 0;
  private deletions: HeaderDeletion[] = [];
  private size = 0;
  /** The message's refusal at eoh (the MTA may still send the body): its eom answer. */
  private refused: MilterVerdict | null = null;
  private inMessage = false;
  /** Chunks of this message went to the body readers without their last one. */
  private bodyOpen = false;

  constructor(private readonly deps: MilterFrontDeps) {}

  async connect(info: ConnectInfo, m: MilterMacros): Promise<MilterVerdict> {
    const set = this.deps.rules();
    const { client, port } = clientOf(info, m);
    const s = new FrontSession(
      { front: 'milter', listener: this.deps.listener, rules: set, metrics: this.deps.metrics, log: this.deps.log, maxPendingDryRun: this.deps.limits().maxPendingDryRun, recording: this.deps.recording ?? null },
      { client, clientPort: port, localAddress: '' },
    );
    this.s = s;
    this.release = this.deps.useRuleSet?.(set) ?? (() => undefined);
    const daemon = m.get('daemon_name');
    if (daemon) s.facts.daemon = daemon;
    if (info.hostname && !info.hostname.startsWith('[')) s.facts.clientName = info.hostname;
    const v = this.sessionStep(verdictOf(await s.run('connect', () => ({ stage: 'connect', session: s.snapshot() }))));
    // Refused at connect, the MTA asks nothing more of this session and may keep the milter
    // connection open a long time (Postfix until its smtpd process ends): the session ends now.
    if (v.kind !== 'continue') this.finish('refused');
    return v;
  }

  async helo(name: string, m: MilterMacros): Promise<MilterVerdict> {
    const s = this.session();
    if (this.sticky) return this.sticky;
    s.helo = name;
    // The milter does not say HELO or EHLO; Postfix and Sendmail clients speak EHLO today.
    s.esmtp = true;
    if (m.get('tls_version')) s.tls = true;
    return this.sessionStep(verdictOf(await s.run('helo', () => ({ stage: 'helo', verb: 'EHLO', name, session: s.snapshot() }))));
  }

  async mail(sender: string, args: readonly string[], m: MilterMacros): Promise<MilterVerdict> {
    const s = this.session();
    if (this.sticky) return this.sticky;
    if (m.get('tls_version')) s.tls = true;
    const login = m.get('auth_authen') ?? '';
    if (login && !this.authDone) {
      this.authDone = true;
      const mechanism = m.get('auth_type') ?? '';
      s.auth = { mechanism, login };
      const v = verdictOf(await s.run('auth', () => ({ stage: 'auth', mechanism, login, session: s.snapshot() })));
      if (v) return this.sessionStep(v);
    }
    const path = pathOf(sender);
    this.resetMessage();
    // An address doorman cannot parse: the MTA accepted it; no rule runs on this message.
    if (!path) return CONTINUE;
    this.inMessage = true;
    s.beginTransaction(path);
    const queueId = m.get('i');
    if (queueId) s.txnFacts.queueId = queueId;
    const params = paramsOf(args);
    return this.txnStep(verdictOf(await s.run('mail', () => ({ stage: 'mail', sender: path, params, session: s.snapshot() }))));
  }

  async rcpt(recipient: string, args: readonly string[]): Promise<MilterVerdict> {
    const s = this.session();
    if (this.sticky) return this.sticky;
    const path = pathOf(recipient);
    if (!path || path.isNull || !this.inMessage) return CONTINUE;
    const params = paramsOf(args);
    const v = verdictOf(await s.run('rcpt', () => ({ stage: 'rcpt', recipient: path, params, session: s.snapshot() })));
    s.logRcpt(path.raw, v ? (v.kind === 'reject' ? v.code : (v.code ?? 451)) : 250);
    if (v) {
      if (s.outcome !== 'rejected') s.outcome = v.kind === 'reject' ? 'rejected' : 'tempfailed';
      return v;
    }
    s.addRecipient(path);
    return CONTINUE;
  }

  async data(): Promise<MilterVerdict> {
    return this.sticky ?? CONTINUE;
  }

  header(name: string, value: string): void {
    if (!this.s || this.sticky || !this.inMessage) return;
    // Postfix sends folded values with LF alone; the rules read CRLF lines as the SMTP session's.
    const field = `${name}: ${value.replace(/\r?\n/g, '\r\n')}\r\n`;
    this.size += Buffer.byteLength(field, 'latin1');
    if (name.toLowerCase() === AUTH_RESULTS.toLowerCase()) {
      this.arCount++;
      if (claimsAuthservId(value.replace(/\r?\n/g, ''), this.deps.hostname)) this.deletions.push({ name, index: this.arCount });
    }
    if (this.truncated) return;
    if (this.headerBytes + field.length > this.deps.limits().maxHeaderBytes) {
      this.truncated = true;
      return;
    }
    this.headers.push(field);
    this.headerBytes += field.length;
  }

  async eoh(): Promise<MilterVerdict> {
    const s = this.session();
    if (this.sticky) return this.sticky;
    if (!this.inMessage) return CONTINUE;
    const block = Buffer.from(`${this.headers.join('')}\r\n`, 'latin1');
    this.size += 2;
    const truncated = this.truncated;
    const v = verdictOf(await s.run('data_headers', () => ({ stage: 'data_headers', session: s.snapshot(), headers: block, truncated })));
    this.headers = [];
    if (v) {
      this.refused = v;
      this.noteRefusal(v);
      return v;
    }
    this.bodyOpen = true;
    await s.body([block], false);
    return CONTINUE;
  }

  async body(chunk: Buffer): Promise<void> {
    if (!this.s || this.sticky || this.refused || !this.inMessage) return;
    this.size += chunk.length;
    await this.s.body([chunk], false);
  }

  async eom(m: MilterMacros): Promise<EomResult> {
    const s = this.session();
    if (this.sticky) return { verdict: this.sticky };
    if (this.refused) {
      this.countMessage(this.refused);
      return { verdict: this.refused };
    }
    // No transaction of doorman's (a sender it could not parse): nothing to say about the message.
    if (!this.inMessage) return { verdict: CONTINUE };
    const queueId = m.get('i');
    if (queueId) s.txnFacts.queueId = queueId;
    this.bodyOpen = false;
    await s.body([], true);
    const size = this.size;
    s.txnFacts.size = size;
    this.deps.metrics.messageSize.observe(size);
    const v = verdictOf(await s.run('data_end', () => ({ stage: 'data_end', session: s.snapshot(), size })));
    this.countMessage(v);
    if (v) {
      this.noteRefusal(v);
      this.inMessage = false;
      return { verdict: v };
    }
    this.inMessage = false;
    s.txnFacts.outcome = 'passed';
    const addHeaders: HeaderAddition[] = [];
    if (s.authResults.length) {
      addHeaders.push({ name: AUTH_RESULTS, value: formatAuthResults(this.deps.hostname, s.authResults, { fold: true, maxOctets: MAX_AUTH_RESULTS_OCTETS }), index: 0 });
    }
    for (const t of s.tags.slice(0, MAX_TAG_HEADERS)) addHeaders.push({ name: TAG_HEADER, value: t });
    const deleteHeaders = this.deletions;
    this.resetMessage();
    return { verdict: CONTINUE, addHeaders, deleteHeaders };
  }

  abort(): void {
    if (this.s && this.inMessage && this.s.transaction > 0 && !this.s.txnFacts.outcome) this.s.txnFacts.outcome = 'aborted';
    this.resetMessage();
  }

  close(): void {
    this.finish('quit');
  }

  /** Ends the session once: the rules' end hooks, its log line, the rule set released. */
  private finish(reason: string): void {
    const s = this.s;
    if (!s || s.ended.signal.aborted) return;
    if (s.outcome === 'open') s.outcome = 'passed';
    s.end(reason);
    this.release();
  }

  private session(): FrontSession {
    if (!this.s) throw new Error('milter front: step before connect');
    return this.s;
  }

  private resetMessage(): void {
    // A message cut short (ABORT, a refusal before its end): its readers are told it is over, so
    // that the next message's chunks begin a message of their own (pipeline/run.ts `body`).
    if (this.bodyOpen && this.s) void this.s.body([], true);
    this.bodyOpen = false;
    this.headers = [];
    this.headerBytes = 0;
    this.truncated = false;
    this.arCount = 0;
    this.deletions = [];
    this.size = 0;
    this.refused = null;
    this.inMessage = false;
  }

  /** A session-wide stage's answer: a refusal there answers every later step. */
  private sessionStep(r: MilterVerdict | null): MilterVerdict {
    if (!r) return CONTINUE;
    this.sticky = r;
    this.noteRefusal(r);
    return r;
  }

  private txnStep(r: MilterVerdict | null): MilterVerdict {
    if (!r) return CONTINUE;
    this.noteRefusal(r);
    return r;
  }

  /** doorman_messages_total: a message that reached end of message, by doorman's verdict on it. */
  private countMessage(r: MilterVerdict | null): void {
    this.deps.metrics.messages.inc({ front: 'milter', outcome: !r ? 'accepted' : r.kind === 'reject' ? 'rejected' : 'tempfailed' });
  }

  private noteRefusal(r: MilterVerdict): void {
    const s = this.session();
    const kind = r.kind === 'reject' ? 'rejected' : 'tempfailed';
    if (s.outcome !== 'rejected') s.outcome = kind;
    if (s.transaction > 0 && this.inMessage) s.txnFacts.outcome = kind;
  }
}
