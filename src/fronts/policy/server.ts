/**
 * server.ts — the policy front: a Postfix SMTP access policy server
 * (`check_policy_service inet:host:port` or `unix:/path`; SMTPD_POLICY_README).
 *
 * Postfix asks at the stages where `check_policy_service` appears in its restrictions, usually
 * only at RCPT, each request carrying every fact known so far. A request's `instance` names its
 * transaction: the same across the requests of one message. For each instance the server keeps
 * a FrontSession (fronts/session.ts) and runs the pipeline stages not yet run for it, in order —
 * connect, helo (when `helo_name` is given), auth (`sasl_username`), mail (at MAIL and later),
 * then the request's own: rcpt for each `recipient`, etrn, data_end at END-OF-MESSAGE (with
 * `size`; no body: rules that read the headers or the body are skipped, policy/rules.ts). The
 * SMTP session's semantics follow: a refusal at connect, HELO, AUTH or MAIL answers every later
 * request of the instance; a recipient's answer is given again when Postfix asks twice (the
 * policy service in two restriction lists).
 *
 * Instances live in a bounded LRU with a TTL (limits.policyMaxInstances, policyInstanceTtl): a
 * transaction ends at END-OF-MESSAGE, or when forgotten; its end runs the rules' end hooks and
 * writes the session log line (`front: "policy"`). One action per answer (Postfix takes one):
 * a refusal (`<5xx> <enhanced> <text>` or `DEFER_IF_PERMIT <enhanced> <text>`), else one tag of
 * the instance not yet sent (`PREPEND X-Doorman-Tag: …`), else `DUNNO`. A rule error is the rule's
 * `onError` (pass → DUNNO, tempfail → DEFER_IF_PERMIT); an error of the server itself is logged
 * and answered DUNNO.
 *
 * Bounds: line length and attributes per request (policy/protocol.ts), connections
 * (limits.policyMaxConnections), idle time (limits.policyIdleTimeout). Malformed input closes the
 * connection (Postfix logs it and applies its default action). Requests of one connection are
 * answered in order, one at a time: reading pauses while one is evaluated.
 */
import type net from 'node:net';
import type { RuleSet } from '../../config/rules.js';
import { parseAddress, type ClientAddress } from '../../net/ip.js';
import type { SessionEvent, Stage } from '../../pipeline/events.js';
import type { StageVerdict } from '../../pipeline/verdict.js';
import { parsePath, type ParsedPath } from '../../protocol/address.js';
import { ExpiringLru, type ForgetReason } from '../lru.js';
import { FrontSession, type MtaFrontDeps } from '../session.js';
import { actionKind, DUNNO, formatAnswer, PolicyReader, refusalAction, tagAction, type PolicyRequest } from './protocol.js';
import { withoutMessage } from './rules.js';

export type PolicyDeps = MtaFrontDeps<'policy'>;

/** protocol_state values counted under their own label; anything else is "other". */
const STATES = new Set(['CONNECT', 'EHLO', 'HELO', 'MAIL', 'RCPT', 'DATA', 'END-OF-MESSAGE', 'VRFY', 'ETRN']);
/** The states at which the transaction has a sender: MAIL and after. */
const HAS_SENDER = new Set(['MAIL', 'RCPT', 'DATA', 'END-OF-MESSAGE']);

/** One transaction (Postfix `instance`) across its requests. */
interface Instance {
  readonly session: FrontSession;
  /** The once-per-instance stages already run. */
  readonly done: Set<Stage>;
  /** A refusal at connect, HELO, AUTH or MAIL: every later request's answer. */
  sticky: string | null;
  /** Each recipient's answer (a second request for the same recipient is not evaluated again). */
  readonly rcpts: Map<string, string>;
  /** Tags already sent as PREPEND. */
  readonly prepended: Set<string>;
  /** Requests of this instance are evaluated one after the other. */
  queue: Promise<unknown>;
  readonly release: () => void;
}

export class PolicyServer {
  private readonly conns = new Set<net.Socket>();
  private readonly instances: ExpiringLru<string, Instance>;
  private connCounter = 0;
  private closing = false;

  constructor(private readonly deps: PolicyDeps) {
    this.instances = new ExpiringLru(
      () => ({ max: deps.limits().policyMaxInstances, ttl: deps.limits().policyInstanceTtl }),
      (_k, inst, why) => this.endInstance(inst, why),
    );
    this.ruleSet(deps.rules());
    for (const state of [...STATES, 'other']) for (const action of ['dunno', 'reject', 'defer', 'prepend']) deps.metrics.policyRequests.inc({ listener: deps.listener.name, state, action }, 0);
  }

  /** Connections open now. */
  get connections(): number {
    return this.conns.size;
  }

  /** The rule set without the message stages; warns once per rule set about what is skipped. */
  private ruleSet(set: RuleSet): RuleSet {
    const known = warned.has(set);
    const p = withoutMessage(set);
    if (!known && p.skipped.length) {
      this.deps.log.warn({ listener: this.deps.listener.name, rules: p.skipped }, 'policy front: no message in policy requests; these rules\' header and body checks are skipped there');
    }
    warned.add(set);
    return p.set;
  }

  handle(socket: net.Socket): void {
    const limits = this.deps.limits();
    const name = this.deps.listener.name;
    socket.on('error', () => undefined);
    if (this.closing || this.conns.size >= limits.policyMaxConnections) {
      this.deps.metrics.connectionsRefused.inc({ listener: name, reason: this.closing ? 'shutdown' : 'too_many' });
      socket.destroy();
      return;
    }
    const id = ++this.connCounter;
    this.conns.add(socket);
    this.deps.metrics.connections.inc({ listener: name });
    this.deps.metrics.connectionsActive.inc({ listener: name });
    socket.once('close', () => {
      this.conns.delete(socket);
      this.deps.metrics.connectionsActive.dec({ listener: name });
    });
    socket.setNoDelay(true);
    socket.setTimeout(limits.policyIdleTimeout, () => socket.destroy());
    const reader = new PolicyReader({ maxLine: limits.policyMaxLine, maxAttributes: limits.policyMaxAttributes });
    let chain: Promise<void> = Promise.resolve();
    let queued = 0;
    socket.on('data', (chunk: Buffer) => {
      const { requests, error } = reader.push(chunk);
      for (const req of requests) {
        queued++;
        socket.pause();
        chain = chain
          .then(async () => {
            const action = await this.answer(req, id);
            if (!socket.destroyed) socket.write(formatAnswer(action));
            if (--queued === 0 && !error && !socket.destroyed) socket.resume();
          })
          // answer() never throws; anything else failing here ends this connection, not the process.
          .catch(() => void socket.destroy());
      }
      if (error) {
        socket.pause();
        this.deps.metrics.protocolViolations.inc({ kind: 'policy_malformed' });
        this.deps.log.warn({ listener: name, peer: socket.remoteAddress ?? 'unix', reason: error }, 'policy front: malformed request, closing');
        void chain.then(() => socket.destroy());
      }
    });
    socket.on('end', () => void chain.then(() => socket.end()));
  }

  /** Shutdown: no new connections; open ones closed once their answer is written; every instance ends (its log line). */
  close(): void {
    this.closing = true;
    for (const s of this.conns) s.end();
    this.instances.clear();
  }

  /** One request's action; never throws. */
  private async answer(req: PolicyRequest, conn: number): Promise<string> {
    const rawState = (req.get('protocol_state') ?? '').toUpperCase();
    const state = STATES.has(rawState) ? rawState : 'other';
    let action: string = DUNNO;
    try {
      if (req.get('request') === 'smtpd_access_policy') action = await this.evaluate(req, rawState, conn);
    } catch (err) {
      this.deps.log.error({ listener: this.deps.listener.name, err: err instanceof Error ? err.stack : String(err) }, 'policy front: request failed, answered DUNNO');
      action = DUNNO;
    }
    this.deps.metrics.policyRequests.inc({ listener: this.deps.listener.name, state, action: actionKind(action) });
    return action;
  }

  private async evaluate(req: PolicyRequest, state: string, conn: number): Promise<string> {
    // Several Postfix hosts may share doorman: their instance ids (pid, time, counter) could meet,
    // their clients with them far less.
    const key = `${req.get('instance') || `conn:${conn}`}|${req.get('client_address') ?? ''}`;
    let inst = this.instances.get(key);
    if (!inst) {
      const client = clientOf(req);
      if (!client) return DUNNO;
      const set = this.ruleSet(this.deps.rules());
      const limits = this.deps.limits();
      const session = new FrontSession(
        { front: 'policy', listener: this.deps.listener, rules: set, metrics: this.deps.metrics, log: this.deps.log, maxPendingDryRun: limits.maxPendingDryRun, recording: this.deps.recording ?? null },
        { client, clientPort: Number(req.get('client_port') ?? 0) || 0, localAddress: req.get('server_address') ?? '' },
      );
      inst = { session, done: new Set(), sticky: null, rcpts: new Map(), prepended: new Set(), queue: Promise.resolve(), release: this.deps.useRuleSet?.(set) ?? (() => undefined) };
      if (req.get('instance')) session.facts.instance = req.get('instance') ?? '';
      this.instances.set(key, inst);
    }
    const it = inst;
    const work = it.queue.then(() => this.steps(it, req, state));
    it.queue = work.catch(() => undefined);
    const action = await work;
    if (state === 'END-OF-MESSAGE') this.instances.delete(key);
    return action;
  }

  /** The stages not yet run for the instance, then the request's own; the answer. */
  private async steps(inst: Instance, req: PolicyRequest, state: string): Promise<string> {
    const s = inst.session;
    noteFacts(s, req);
    if (inst.sticky) return inst.sticky;
    const once = async (stage: Stage, make: () => SessionEvent): Promise<string | null> => {
      inst.done.add(stage);
      const a = refusal(await s.run(stage, make));
      if (a) {
        inst.sticky = a;
        s.outcome = outcomeOf(a);
      }
      return a;
    };
    const snap = () => s.snapshot();
    if (!inst.done.has('connect')) {
      const a = await once('connect', () => ({ stage: 'connect', session: snap() }));
      if (a) return a;
    }
    const helo = req.get('helo_name') ?? '';
    if (helo && !inst.done.has('helo')) {
      s.helo = helo;
      s.esmtp = req.get('protocol_name') !== 'SMTP';
      const a = await once('helo', () => ({ stage: 'helo', verb: s.esmtp ? 'EHLO' : 'HELO', name: helo, session: snap() }));
      if (a) return a;
    }
    const login = req.get('sasl_username') ?? '';
    if (login && !inst.done.has('auth')) {
      const mechanism = req.get('sasl_method') ?? '';
      s.auth = { mechanism, login };
      const a = await once('auth', () => ({ stage: 'auth', mechanism, login, session: snap() }));
      if (a) return a;
    }
    if (HAS_SENDER.has(state) && !inst.done.has('mail')) {
      const sender = pathOf(req.get('sender') ?? '');
      if (sender) {
        s.transaction = 1;
        s.sender = sender;
        const a = await once('mail', () => ({ stage: 'mail', sender, params: [], session: snap() }));
        if (a) return a;
      } else inst.done.add('mail');
    }
    let action: string | null = null;
    if (state === 'RCPT') action = await this.rcpt(inst, req.get('recipient') ?? '');
    else if (state === 'ETRN') {
      const node = req.get('etrn_domain') ?? '';
      if (node) action = refusal(await s.run('etrn', () => ({ stage: 'etrn', node, session: snap() })));
    } else if (state === 'END-OF-MESSAGE' && !inst.done.has('data_end')) {
      inst.done.add('data_end');
      const size = Number(req.get('size') ?? 0) || 0;
      action = refusal(await s.run('data_end', () => ({ stage: 'data_end', size, session: snap() })));
    }
    if (action) {
      if (s.outcome !== 'rejected') s.outcome = outcomeOf(action);
      return action;
    }
    const tag = s.tags.find((t) => !inst.prepended.has(t));
    if (tag === undefined) return DUNNO;
    inst.prepended.add(tag);
    return tagAction(tag);
  }

  private async rcpt(inst: Instance, to: string): Promise<string | null> {
    const s = inst.session;
    const known = inst.rcpts.get(to.toLowerCase());
    if (known !== undefined) return known === DUNNO ? null : known;
    const recipient = pathOf(to);
    if (!recipient || recipient.isNull) return null;
    // Postfix writes "<recipient>: Recipient address rejected: " before the text at RCPT: a rule's
    // own "<recipient>: " prefix (relay's) is left off so that the client does not read it twice.
    const a = refusal(await s.run('rcpt', () => ({ stage: 'rcpt', recipient, params: [], session: s.snapshot() })), `<${to}>: `);
    // Bounded like the log: past it a repeated recipient is evaluated again (nothing is remembered).
    if (inst.rcpts.size < 1000) inst.rcpts.set(to.toLowerCase(), a ?? DUNNO);
    s.logRcpt(to, a ? Number(a.startsWith('DEFER_IF_PERMIT') ? 450 : a.slice(0, 3)) : 250);
    if (!a) s.addRecipient(recipient);
    return a;
  }

  private endInstance(inst: Instance, why: ForgetReason): void {
    const reason = why === 'deleted' ? 'end-of-message' : why === 'cleared' ? 'shutdown' : why;
    if (inst.session.outcome === 'open') inst.session.outcome = 'passed';
    inst.session.end(reason);
    inst.release();
  }
}

/** Rule sets already warned about (once each). */
const warned = new WeakSet<RuleSet>();

/** The verdict's refusal as an action; `prefix` left off the text's start (Postfix says it itself). */
function refusal(v: StageVerdict, prefix?: string): string | null {
  if (!v.reply) return null;
  const r = v.reply;
  const first = r.lines[0] ?? '';
  if (prefix && first.toLowerCase().startsWith(prefix.toLowerCase()) && first.length > prefix.length) {
    return refusalAction({ ...r, lines: [first.slice(prefix.length), ...r.lines.slice(1)] });
  }
  return refusalAction(r);
}

function outcomeOf(action: string): string {
  return actionKind(action) === 'reject' ? 'rejected' : 'tempfailed';
}

/** The client from `client_address`; null when absent or not an address. */
function clientOf(req: PolicyRequest): ClientAddress | null {
  const a = req.get('client_address') ?? '';
  try {
    return a ? parseAddress(a) : null;
  } catch {
    return null;
  }
}

/** A sender or recipient as Postfix sends it (no angle brackets; "" for the null sender). */
function pathOf(text: string): ParsedPath | null {
  const r = parsePath(text);
  return r.ok ? r.path : null;
}

/** Facts a request may add at any stage: TLS, the queue id, the size, the client's name. */
function noteFacts(s: FrontSession, req: PolicyRequest): void {
  if (req.get('encryption_protocol')) s.tls = true;
  const queueId = req.get('queue_id');
  if (queueId) s.facts.queueId = queueId;
  const size = Number(req.get('size') ?? 0);
  if (size > 0) s.facts.size = size;
  const name = req.get('client_name');
  if (name && !s.facts.clientName) s.facts.clientName = name;
}
