/**
 * spf — Sender Policy Framework (RFC 7208) for the HELO and MAIL FROM identities, evaluated by
 * mailauth with doorman's resolver (dns.servers, timeout, tries) and the real client address
 * (after PROXY protocol; the same address XCLIENT gives the backend).
 *
 * Evaluated from MAIL; the verdict is applied at `stage`: `mail` (the MAIL reply waits for the
 * lookups) or `rcpt` (the evaluation begun at MAIL, the runner's `start`, is read at each RCPT of
 * the transaction, so the MAIL reply is not held: Postfix's smtpd_delay_reject). With `checkHelo` (default true) the HELO identity is checked first when the HELO name
 * is a host name with a dot (RFC 7208 §2.3); its `fail` decides. Then the MAIL FROM identity (for
 * the null sender: postmaster@<helo>, RFC 7208 §2.4). Each result maps to a finding through
 * `results` (pass, reject, tempfail, tag):
 *   fail      → reject   550 5.7.23 <addr>: Sender address rejected: SPF fail (RFC 7372)
 *   softfail  → tag      X-Doorman-Tag: <rule>; softfail …   (or pass / reject)
 *   neutral, none, pass → pass
 *   temperror → tempfail 451 4.7.24 <addr>: SPF temporary error, try again later
 *   permerror → pass     (or reject: 550 5.7.24 <addr>: SPF permanent error)
 * Not evaluated for clients in rules/site.yaml's `trustedNetworks` (a backup MX or forwarder is
 * not in the senders' SPF records). Which other clients are checked is the rule file's `scope`
 * (shipped: `clients: ["!relayNetworks"]`).
 * Settings: results, stage (mail), checkHelo (true), skipAuthenticated (true), maxLookups (10)
 *   and maxVoidLookups (2) (RFC 7208 §4.6.4); skipNetworks (deprecated: a scope's negated clients).
 * Every evaluated finding carries its Authentication-Results entry (`spf=… smtp.mailfrom=…`, or
 * `smtp.helo=…` when the HELO identity's fail decided), whatever the action: the dmarc rule reads
 * it in SessionSnapshot.authResults (no second lookup).
 * Bypassable (allowlisted clients are not checked). Metrics: doorman_rule_evaluations_total,
 * doorman_rejections_total; the SPF comment is in the session log. DNS failures become
 * temperror (never a crash); a rule timeout gets onError (set the rule's timeout above
 * dns.timeout × dns.tries).
 */
import { spf } from 'mailauth';
import { z } from 'zod';
import { inAnyCidr, parseCidr } from '../net/ip.js';
import { NO_SITE } from '../pipeline/site.js';
import { defineRuleType, PASS, type Finding, type ReplySpec } from '../pipeline/rule.js';
import type { EventOf } from '../pipeline/events.js';
import type { AuthResult } from '../protocol/auth-results.js';
import { cidrList, echo, isHostName } from './shared.js';

const action = z.enum(['pass', 'reject', 'tempfail', 'tag']);
export type SpfResult = 'pass' | 'fail' | 'softfail' | 'neutral' | 'none' | 'temperror' | 'permerror';

const settings = z.strictObject({
  results: z
    .strictObject({
      pass: action.default('pass'),
      fail: action.default('reject'),
      softfail: action.default('tag'),
      neutral: action.default('pass'),
      none: action.default('pass'),
      temperror: action.default('tempfail'),
      permerror: action.default('pass'),
    })
    .prefault({}),
  stage: z.enum(['mail', 'rcpt']).default('mail'),
  checkHelo: z.boolean().default(true),
  skipAuthenticated: z.boolean().default(true),
  /** Deprecated: `scope: { clients: ["!…"] }` says it for every rule. Still honoured. */
  skipNetworks: cidrList.default([]),
  maxLookups: z.number().int().min(1).max(50).default(10),
  maxVoidLookups: z.number().int().min(0).max(20).default(2),
});

/** The replies RFC 7208 §8 and RFC 7372 call for. */
export function spfReply(result: SpfResult, address: string, kind: 'reject' | 'tempfail'): ReplySpec {
  const a = `<${echo(address)}>`;
  if (result === 'temperror' || kind === 'tempfail') return { code: 451, enhanced: '4.7.24', text: `${a}: SPF temporary error, try again later` };
  if (result === 'permerror') return { code: 550, enhanced: '5.7.24', text: `${a}: SPF permanent error` };
  if (result === 'fail') return { code: 550, enhanced: '5.7.23', text: `${a}: Sender address rejected: SPF fail` };
  return { code: 550, enhanced: '5.7.1', text: `${a}: Sender address rejected: SPF ${result}` };
}

/** The Authentication-Results entry: `spf=<result> smtp.mailfrom=<address>`, or `smtp.helo=<name>` when the HELO identity decided. */
export function spfAuthResult(result: SpfResult, identity: 'helo' | 'mailfrom', address: string): AuthResult {
  const helo = address.slice(address.lastIndexOf('@') + 1);
  return { method: 'spf', result, props: [identity === 'helo' ? ['smtp.helo', helo] : ['smtp.mailfrom', address]] };
}

/** stage rcpt — per session (runner-owned): the current transaction's evaluation, then its finding. */
interface State {
  verdict: Finding | Promise<Finding> | null;
}

export const spfRule = defineRuleType({
  type: 'spf',
  description: 'SPF (RFC 7208) for the HELO and MAIL FROM identities',
  settings,
  deprecated: {
    skipNetworks: 'write scope: { clients: ["!relayNetworks", "!<cidr>"…] } (top level; relayNetworks / trustedNetworks from rules/site.yaml) and remove skipNetworks',
  },
  create(name, s, deps) {
    const skip = [...s.skipNetworks.map(parseCidr), ...(deps.site ?? NO_SITE).trustedNetworks];
    const resolver = (domain: string, rrtype: string) => deps.resolver.resolve(domain, rrtype);
    const evaluateIdentity = async (sender: string | undefined, ip: string, helo: string | undefined) => {
      const r = await spf({
        ...(sender ? { sender } : {}),
        ip,
        ...(helo ? { helo } : {}),
        mta: deps.ownNames[0] ?? 'doorman',
        resolver,
        maxResolveCount: s.maxLookups,
        maxVoidCount: s.maxVoidLookups,
      });
      const result = (r.status.result === 'temperr' ? 'temperror' : r.status.result) as SpfResult;
      return { result, comment: typeof r.status.comment === 'string' ? r.status.comment : '' };
    };
    const decide = (result: SpfResult, identity: 'helo' | 'mailfrom', address: string, comment: string): Finding => {
      const act = (s.results as Record<string, string>)[result] ?? 'pass';
      const reason = `${identity} ${result}${comment ? `: ${comment}` : ''}`;
      // RFC 8601 §2.7.2: the identity that decided, smtp.helo or smtp.mailfrom.
      const results = [spfAuthResult(result, identity, address)];
      if (act === 'pass') return { kind: 'pass', results };
      if (act === 'tag') return { kind: 'tag', reason, results };
      return { kind: act as 'reject' | 'tempfail', reason, reply: spfReply(result, address, act as 'reject' | 'tempfail'), results };
    };
    const evaluateMail = async (ev: EventOf<'mail'>): Promise<Finding> => {
      const session = ev.session;
      if (s.skipAuthenticated && session.auth) return PASS;
      if (inAnyCidr(session.client, skip)) return PASS;
      const ip = session.client.text;
      const helo = session.helo ?? undefined;
      if (s.checkHelo && helo && isHostName(helo) && helo.includes('.')) {
        const h = await evaluateIdentity(`postmaster@${helo}`, ip, helo);
        if (h.result === 'fail') return decide('fail', 'helo', `postmaster@${helo}`, h.comment);
      }
      const sender = ev.sender.isNull ? undefined : `${ev.sender.local}@${ev.sender.domain}`;
      if (!sender && !helo) return PASS;
      const m = await evaluateIdentity(sender, ip, helo);
      return decide(m.result, 'mailfrom', sender ?? `postmaster@${helo}`, m.comment);
    };
    if (s.stage === 'mail') return { name, type: 'spf', bypassable: true, checks: { mail: evaluateMail } };
    // stage rcpt: evaluated from MAIL (never holding its reply), read at each RCPT of the transaction.
    return {
      name,
      type: 'spf',
      bypassable: true,
      session: (): State => ({ verdict: null }),
      starts: {
        mail(ev, st: State): void {
          const p = evaluateMail(ev);
          st.verdict = p;
          // In: the RCPT verdicts read it synchronously (a failure stays the Promise: the rule's error).
          p.then((f) => void (st.verdict === p && (st.verdict = f)), () => undefined);
        },
      },
      checks: {
        rcpt: (_ev, st: State) => st.verdict ?? PASS,
      },
    };
  },
});
