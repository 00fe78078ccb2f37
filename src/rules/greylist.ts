/**
 * greylist — greylisting (RFC 6647) that does not hurt big senders.
 *
 * Stage rcpt. A new triplet (client network, sender, recipient) gets 451 4.7.1 Greylisted, try
 * again later; a retry after `delay` and before `delay + retryWindow` from the first attempt (the
 * window opens when the delay ends) passes, and the
 * triplet then stays passed for `passLifetime` (refreshed by each use). The client network is
 * the client address masked to `ipv4Prefix` (/24) or `ipv6Prefix` (/64), so big senders retrying
 * from another address of the same network pass (the postgrey/rspamd complaint). The state lives
 * in the store: shared by every instance with Redis, one atomic script per decision.
 * Never greylisted: clients in `allowClients` (CIDRs), senders in `allowSenderDomains`
 * (domain or *.domain), authenticated sessions (`skipAuthenticated`), and — the rule is
 * bypassable — sessions an allowlist accepted (access allow, a DNSWL score).
 * Store failure: the rule's error (thrown to the runner), so the rule file's `onError` decides:
 * pass (default; counted in doorman_store_fail_open_total) or tempfail, 451 4.3.0 (counted in
 * doorman_store_fail_closed_total). Metric: doorman_greylist_total{result}.
 */
import { z } from 'zod';
import { inAnyCidr, parseAddress, parseCidr } from '../net/ip.js';
import { defineRuleType, PASS, type Finding } from '../pipeline/rule.js';
import { DomainList } from '../protocol/match.js';
import { cidrList, clientKey, domainList } from './shared.js';

const settings = z.strictObject({
  delay: z.number().int().nonnegative().default(300_000),
  retryWindow: z.number().int().positive().default(86_400_000),
  passLifetime: z.number().int().positive().default(3_024_000_000), // 35 days
  ipv4Prefix: z.number().int().min(1).max(32).default(24),
  ipv6Prefix: z.number().int().min(1).max(128).default(64),
  allowClients: cidrList.default([]),
  allowSenderDomains: domainList.default([]),
  skipAuthenticated: z.boolean().default(true),
});

export const greylistRule = defineRuleType({
  type: 'greylist',
  description: 'Greylisting of (client network, sender, recipient) triplets',
  settings,
  create(name, s, deps) {
    const allowClients = s.allowClients.map(parseCidr);
    const allowDomains = new DomainList(s.allowSenderDomains);
    const tripletKey = (net: string, sender: string, rcpt: string) => `grey:{${name}:${net}}:${sender}:${rcpt}`;
    if (!deps.checkOnly) {
      deps.metrics.failOpen.inc({ rule: name }, 0);
      deps.metrics.failClosed.inc({ rule: name }, 0);
    }
    return {
      name,
      type: 'greylist',
      bypassable: true,
      checks: {
        async rcpt(ev): Promise<Finding> {
          const sess = ev.session;
          const sender = sess.sender;
          if ((s.skipAuthenticated && sess.auth) || inAnyCidr(sess.client, allowClients) || (sender && !sender.isNull && allowDomains.has(sender.domain))) {
            deps.metrics.greylist.inc({ result: 'allowlisted' });
            return PASS;
          }
          const from = !sender || sender.isNull ? '<>' : `${sender.local.toLowerCase()}@${sender.domain}`;
          const to = `${ev.recipient.local.toLowerCase()}@${ev.recipient.domain}`;
          const key = tripletKey(clientKey(sess.client, s.ipv4Prefix, s.ipv6Prefix), from, to);
          try {
            deps.metrics.storeOps.inc({ op: 'greylist', store: deps.store.kind });
            const r = await deps.store.greylist(key, s.delay, s.retryWindow, s.passLifetime);
            if (r.passed) {
              deps.metrics.greylist.inc({ result: 'passed' });
              return PASS;
            }
            deps.metrics.greylist.inc({ result: 'greylisted' });
            return {
              kind: 'tempfail',
              reason: `greylisted for ${Math.ceil(r.waitMs / 1000)} s${r.firstAttempt ? ' (first attempt)' : ''}`,
              reply: { code: 451, enhanced: '4.7.1', text: 'Greylisted, try again later' },
            };
          } catch (err) {
            (deps.onError === 'tempfail' ? deps.metrics.failClosed : deps.metrics.failOpen).inc({ rule: name });
            throw new Error(`store unavailable: ${(err as Error).message}`, { cause: err });
          }
        },
      },
      admin(args) {
        const [ip, from, to] = args;
        if (!ip || !from || !to) return `usage: doorman limits show|reset ${name} <client-ip> <sender|<>> <recipient>`;
        try {
          const net = clientKey(parseAddress(ip), s.ipv4Prefix, s.ipv6Prefix);
          return {
            key: tripletKey(net, from.toLowerCase(), to.toLowerCase()),
            describe: `triplet ${net} ${from} → ${to}`,
            spec: { kind: 'greylist', delayMs: s.delay, retryWindowMs: s.retryWindow, lifetimeMs: s.passLifetime },
          };
        } catch {
          return `not an IP address: ${ip}`;
        }
      },
    };
  },
});
