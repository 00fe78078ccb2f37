/**
 * rule.ts — the plug-in interface every rule implements.
 *
 * A rule declares its checks per stage and returns a Finding for an event, as a value, a Promise
 * or an Observable (the first value counts); what it keeps per session is its state, created and
 * dropped by the runner (`session`, `end`). It never writes to a socket, never decides the
 * reply on its own: the rule file's `action` does (pipeline/verdict.ts), and the runner
 * (pipeline/run.ts) owns timeouts, crashes and metrics.
 */
import type { Observable } from 'rxjs';
import { z } from 'zod';
import type { Metrics } from '../metrics/registry.js';
import type { AuthResult } from '../protocol/auth-results.js';
import type { DnsResolver } from '../net/dns.js';
import type { LimitSpec, Store } from '../store/store.js';
import type { EventOf, SessionEvent, SessionSnapshot, Stage } from './events.js';
import type { SitePolicy } from './site.js';

/** A reply a rule suggests; code and enhanced code must agree in class (5xx ↔ 5.x.x). */
export interface ReplySpec {
  readonly code: number;
  readonly enhanced: string;
  readonly text: string;
}

/**
 * What a rule authenticated (spf, dkim, dmarc, arc), whatever its finding: every variant may
 * carry it. The runner collects them into StageVerdict.results (from every rule that answered for
 * the stage, whatever its action, dry-run included), and the session into the transaction's
 * SessionSnapshot.authResults, for the Authentication-Results header (RFC 8601).
 */
interface Authenticated {
  readonly results?: readonly AuthResult[];
}

export type Finding =
  /** Nothing to report. */
  | ({ readonly kind: 'pass' } & Authenticated)
  /** A permanent problem: suggest 5xx. */
  | ({ readonly kind: 'reject'; readonly reason: string; readonly reply?: ReplySpec } & Authenticated)
  /** A temporary problem: suggest 4xx. */
  | ({ readonly kind: 'tempfail'; readonly reason: string; readonly reply?: ReplySpec } & Authenticated)
  /** Allowlisted: rules marked `bypassable` no longer refuse this session / recipient. */
  | ({ readonly kind: 'accept'; readonly reason: string } & Authenticated)
  /** Noteworthy but not refused: tagged in a header. */
  | ({ readonly kind: 'tag'; readonly reason: string } & Authenticated);

export const PASS: Finding = Object.freeze({ kind: 'pass' });

export type FindingResult = Finding | Promise<Finding> | Observable<Finding>;

/** The stages a rule can check (a session's end is the runner's business: `Rule.end`). */
export type RuleStage = Exclude<Stage, 'quit'>;

/**
 * A rule's checks, one per stage it acts on; each gets the event and the rule's state for the
 * session (`Rule.session`; undefined for a rule without one). Method syntax: a rule's own state
 * type stays assignable to `Rule` (the runner never mixes states of different rules).
 */
export interface Checks<S> {
  connect?(event: EventOf<'connect'>, state: S): FindingResult;
  helo?(event: EventOf<'helo'>, state: S): FindingResult;
  auth?(event: EventOf<'auth'>, state: S): FindingResult;
  mail?(event: EventOf<'mail'>, state: S): FindingResult;
  rcpt?(event: EventOf<'rcpt'>, state: S): FindingResult;
  data_headers?(event: EventOf<'data_headers'>, state: S): FindingResult;
  data_end?(event: EventOf<'data_end'>, state: S): FindingResult;
  etrn?(event: EventOf<'etrn'>, state: S): FindingResult;
}

/**
 * Work begun at a stage for a verdict that a check of a later stage applies: the runner calls it
 * before the stage's checks and never waits for it. A rule that starts at connect and decides at
 * MAIL or RCPT (Postfix's smtpd_delay_reject) does not hold the greeting. A throw is the rule's
 * error (`onError`) at that stage.
 */
export interface Starts<S> {
  connect?(event: EventOf<'connect'>, state: S): void;
  helo?(event: EventOf<'helo'>, state: S): void;
  auth?(event: EventOf<'auth'>, state: S): void;
  mail?(event: EventOf<'mail'>, state: S): void;
  rcpt?(event: EventOf<'rcpt'>, state: S): void;
  data_headers?(event: EventOf<'data_headers'>, state: S): void;
  etrn?(event: EventOf<'etrn'>, state: S): void;
}

/**
 * A rule that reads the message body (DKIM, a content scanner). The runner hands it the message
 * as it arrives — the unstuffed chunks, an Observable the runner drives with `concatMap`: `chunk`
 * is called for each in order, the next one only once the work it returned for the previous one
 * is done (a Promise or an Observable; nothing: done at once). Chunks a reader has not consumed yet
 * count towards the pipeline's `maxBodyLag` (bytes): past it, the session stops reading the client
 * until the reader catches up (back-pressure). At data_end, once the reader has consumed every
 * chunk, `end` gives the rule's finding for the message (within the rule's `timeout`). Sessions
 * without a body rule pay nothing: no chunk is handed to the pipeline. `begin`, if given, is called
 * once per message before its first chunk, with the session as it stands when the message's data
 * starts (the sender, every recipient): a reader that opens a connection per message opens it
 * there, and drops what an earlier message left (one refused or cut short never reaches `end`).
 */
export interface BodyReader<S> {
  begin?(snapshot: SessionSnapshot, state: S): void;
  chunk(chunk: Buffer, state: S): void | Promise<unknown> | Observable<unknown>;
  end(event: EventOf<'data_end'>, state: S): FindingResult;
}

export interface Rule<S = unknown> {
  /** Instance name from the rule file (unique), used in logs and metric labels. */
  readonly name: string;
  /** Rule type (the file name under src/rules/). */
  readonly type: string;
  /** What the rule checks, per stage. */
  readonly checks: Checks<S>;
  /** Work started early for a later stage's check (see Starts). */
  readonly starts?: Starts<S>;
  /** The rule reads the message body; its finding counts at data_end (see BodyReader). */
  readonly body?: BodyReader<S>;
  /** An `accept` finding from another rule overrides this rule's refusals. */
  readonly bypassable: boolean;
  /**
   * Per-session state, owned by the runner: created at the first start or check of a session
   * that needs it, handed to every call of that session, dropped when the session ends. No rule
   * keeps maps keyed by session id.
   */
  session?(snapshot: SessionSnapshot): S;
  /**
   * The session ended: give back what the state holds (a concurrency slot). Called once, only
   * for a state that was created, after the rule's checks of the session are done or cancelled,
   * with the session's last snapshot. It must not throw (ignored).
   */
  end?(state: S, snapshot: SessionSnapshot): void;
  /**
   * Called by the runner when the stage's verdict refused `event` — by this rule or another
   * (greylisting, a DNSBL, an access deny). A rule that spent something on the event (a rate-limit
   * token) gives it back: only events let through are counted. Called once per refused event, for
   * every rule of the stage (whether or not it answered in time); it must not throw (ignored).
   */
  refused?(event: SessionEvent, state: S): void;
  /** Releases timers or connections on reload/shutdown. */
  close?(): void;
  /**
   * For `doorman limits show|reset <rule> args…`: the store key the arguments name, with a
   * description and what the key holds (read with `limitView`), or an error message.
   */
  admin?(args: readonly string[]): { key: string; describe: string; spec: LimitSpec } | string;
}

/** The stages a rule acts on: its checks, its early starts, data_end for a body reader, and quit when it has an end hook. */
export function stagesOf(rule: Rule): Stage[] {
  const out = new Set<Stage>([...(Object.keys(rule.checks) as Stage[]), ...(Object.keys(rule.starts ?? {}) as Stage[])]);
  if (rule.body) out.add('data_end');
  if (rule.end) out.add('quit');
  return [...out];
}

/** Services passed to rule factories: nothing a rule needs from outside is imported directly. */
export interface RuleDeps {
  /** doorman's own names (greeting hostname) and addresses (listeners, local interfaces). */
  readonly ownNames: readonly string[];
  readonly ownAddresses: readonly string[];
  /** doorman's resolver (dns.servers, timeout, tries), shared by all DNS rules. */
  readonly resolver: DnsResolver;
  /** Shared state: the in-memory store, or Redis shared by every instance. */
  readonly store: Store;
  /** doorman's metrics registry (rules with their own metrics: DNSBL zones). */
  readonly metrics: Metrics;
  /** Logger for state changes a rule must report (a zone disabled, …). */
  readonly log: { warn(obj: object, msg: string): void; info(obj: object, msg: string): void };
  readonly now: () => number;
  /** `doorman check`: build and validate only; start no timers or lookups. */
  readonly checkOnly?: boolean;
  /**
   * What is ours (rules/site.yaml): local domains, relay and trusted networks. Always set by the
   * rule loader; absent (a rule's unit test) means NO_SITE (pipeline/site.ts).
   */
  readonly site?: SitePolicy;
  /**
   * The rule file's `onError`, for a rule that counts its own failures before it throws them to
   * the runner (a store failure: doorman_store_fail_open_total or _closed_total). Default pass.
   */
  readonly onError?: 'pass' | 'tempfail';
  /**
   * The rule file's `timeout` (ms), for a rule that also bounds its own I/O with it (a content
   * scanner's writes while the message streams, before the runner's deadline at data_end).
   */
  readonly timeout?: number;
}

/** A rule type: its settings schema and a constructor. */
export interface RuleType<S extends z.ZodType = z.ZodType> {
  readonly type: string;
  readonly description: string;
  readonly settings: S;
  create(name: string, settings: z.output<S>, deps: RuleDeps): Rule;
  /**
   * Settings keys that narrow a list of rules/site.yaml for this rule only (absent: the site's
   * list). The loader warns when such a key widens the site's list, or when there is no site.yaml.
   */
  readonly siteKeys?: readonly ('localDomains' | 'relayNetworks' | 'trustedNetworks')[];
  /** Settings keys kept for old rule files → what to write instead (warned with file:line). */
  readonly deprecated?: Readonly<Record<string, string>>;
}

export function defineRuleType<S extends z.ZodType>(t: RuleType<S>): RuleType<S> {
  return t;
}

/** Parses "550 5.7.1 text" into a ReplySpec (used by rule settings). */
export function parseReplySpec(s: string): ReplySpec | null {
  const m = /^([45]\d\d) ([45]\.\d{1,3}\.\d{1,3}) (.+)$/.exec(s.trim());
  if (!m || m[1] === undefined || m[2] === undefined || m[3] === undefined) return null;
  if (m[1][0] !== m[2][0]) return null;
  return { code: Number(m[1]), enhanced: m[2], text: m[3] };
}

/**
 * A reply "<code> <x.y.z> text" whose classes agree; {placeholders} allowed in the text. Used by
 * rule settings (via rules/shared.ts) and by a rule file's own `reply:` key (config/rules.ts).
 */
export const replyTemplate = z
  .string()
  .refine((s) => parseReplySpec(s.replace(/\{\w+\}/g, 'x')) !== null, 'expected "<4xx|5xx> <x.y.z> text" with matching classes');

/** The same check at each of `stages` (a rule that matches several stages in one function). */
export function onStages<S = unknown>(stages: readonly RuleStage[], check: (event: SessionEvent, state: S) => FindingResult): Checks<S> {
  const out: Partial<Record<RuleStage, typeof check>> = {};
  for (const s of stages) out[s] = check;
  return out as Checks<S>;
}
