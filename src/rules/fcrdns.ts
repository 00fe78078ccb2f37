/**
 * fcrdns — forward-confirmed reverse DNS (Postfix reject_unknown_client_hostname; RFC 7372 X.7.25).
 *
 * The client's PTR names are looked up (at most `maxNames`), then each name's A/AAAA records; the
 * check passes when one of them is the client's real address. Lookups start at connect through
 * doorman's resolver (the runner's `start`, never awaited); the verdict is applied at `stage`
 * (connect; mail or rcpt do not hold the greeting while the lookups run, and the log shows the
 * envelope).
 * Results and their default actions (`results`: pass, reject, tempfail, tag):
 *   fail       no PTR, or no PTR name resolves back to the client → reject
 *              550 5.7.25 Reverse DNS validation failed for [ip]
 *   temperror  a DNS failure (timeout, SERVFAIL) and no confirmation → tempfail
 *              451 4.7.25 Reverse DNS lookup failed for [ip], try again later (421 at connect)
 * Settings: results, stage (connect | mail | rcpt; default connect), maxNames (10), timeout (per lookup, ms; 2000).
 * Bypassable. Metrics: doorman_fcrdns_checks_total{result}. Never throws: DNS errors are data.
 */
import { z } from 'zod';
import { isNoRecord, withTimeout } from '../net/dns.js';
import { defineRuleType, onStages, PASS, type Finding, type RuleDeps } from '../pipeline/rule.js';
import type { SessionEvent } from '../pipeline/events.js';

const action = z.enum(['pass', 'reject', 'tempfail', 'tag']);

const settings = z.strictObject({
  results: z.strictObject({ fail: action.default('reject'), temperror: action.default('tempfail') }).prefault({}),
  stage: z.enum(['connect', 'mail', 'rcpt']).default('connect'),
  maxNames: z.number().int().min(1).max(50).default(10),
  timeout: z.number().int().positive().max(30_000).default(2_000),
});

export type FcrdnsResult = { result: 'pass'; name: string } | { result: 'fail' | 'temperror'; detail: string };

/** The check itself, for one address. */
export async function fcrdns(ip: string, family: 4 | 6, deps: Pick<RuleDeps, 'resolver'>, maxNames: number, timeout: number): Promise<FcrdnsResult> {
  let names: string[];
  try {
    names = await withTimeout(deps.resolver.reverse(ip), timeout);
  } catch (err) {
    if (isNoRecord(err)) return { result: 'fail', detail: 'no PTR record' };
    return { result: 'temperror', detail: `PTR lookup: ${(err as Error).message}` };
  }
  if (names.length === 0) return { result: 'fail', detail: 'no PTR record' };
  let dnsError = '';
  for (const name of names.slice(0, maxNames)) {
    try {
      const addrs = await withTimeout(family === 4 ? deps.resolver.resolveA(name) : deps.resolver.resolveAAAA(name), timeout);
      if (addrs.some((a) => a.address === ip)) return { result: 'pass', name };
    } catch (err) {
      if (!isNoRecord(err)) dnsError = `${name}: ${(err as Error).message}`;
    }
  }
  if (dnsError) return { result: 'temperror', detail: dnsError };
  return { result: 'fail', detail: `${names.slice(0, maxNames).join(', ')} do not resolve to ${ip}` };
}

/** Per session (runner-owned): the check begun at connect until it is in, then its result. */
interface State {
  result: FcrdnsResult | Promise<FcrdnsResult> | null;
}

export const fcrdnsRule = defineRuleType({
  type: 'fcrdns',
  description: 'Forward-confirmed reverse DNS of the client address',
  settings,
  create(name, s, deps) {
    /** A session's verdict: the check begun at connect, then its result (so verdicts after it are synchronous). */
    const decide = (st: State, ip: string): Finding | Promise<Finding> => {
      const p = st.result;
      if (!p) return PASS;
      return p instanceof Promise ? p.then((r) => finding(r, ip)) : finding(p, ip);
    };
    const finding = (r: FcrdnsResult, ip: string): Finding => {
      if (r.result === 'pass') return PASS;
      const act = s.results[r.result];
      const reason = `${r.result}: ${r.detail}`;
      if (act === 'pass') return PASS;
      if (act === 'tag') return { kind: 'tag', reason };
      const reply =
        act === 'reject'
          ? { code: 550, enhanced: '5.7.25', text: `Reverse DNS validation failed for [${ip}]` }
          : { code: 451, enhanced: '4.7.25', text: `Reverse DNS lookup failed for [${ip}], try again later` };
      return { kind: act, reason, reply };
    };
    return {
      name,
      type: 'fcrdns',
      bypassable: true,
      session: (): State => ({ result: null }),
      starts: {
        connect(ev, st: State): void {
          const client = ev.session.client;
          const p = fcrdns(client.text, client.family, deps, s.maxNames, s.timeout).then((r) => {
            deps.metrics.fcrdnsChecks.inc({ result: r.result });
            // In: later verdicts read it synchronously.
            if (st.result === p) st.result = r;
            return r;
          });
          st.result = p;
        },
      },
      checks: onStages([s.stage], (ev: SessionEvent, st: State) => decide(st, ev.session.client.text)),
    };
  },
});
