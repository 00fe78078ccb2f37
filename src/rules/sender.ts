/**
 * sender — forged-sender checks (Postfix reject_sender_login_mismatch and the "local sender from
 * outside" check).
 *
 * Detects at stage mail (the null sender `<>` is never forged):
 *   not_owned      a sender in `localDomains` from a client neither in `relayNetworks` nor
 *                  authenticated (nor in the site's `trustedNetworks`: a backup MX or forwarder
 *                  passes on mail from our domains it did not originate)
 *                  → 553 5.7.1 <addr>: Sender address rejected: not owned by you
 *   login_mismatch an authenticated client using a sender that `senderLogins` gives to other
 *                  logins (or, with `requireOwnedSender`, one it gives to nobody)
 *                  → 553 5.7.1 <addr>: Sender address rejected: not owned by user <login>
 * Settings: localDomains, relayNetworks (absent: rules/site.yaml's; present: this rule's own),
 *   senderLogins ({} — address, @domain or domain
 *   → logins that own it), requireOwnedSender (false), notOwnedReply, mismatchReply ({address},
 *   {login} are replaced).
 * Not bypassable. Metrics: doorman_rejections_total{rule}. Errors: none expected.
 */
import { z } from 'zod';
import { inAnyCidr, parseCidr } from '../net/ip.js';
import { NO_SITE } from '../pipeline/site.js';
import { defineRuleType, onStages, PASS, type Finding } from '../pipeline/rule.js';
import type { SessionEvent } from '../pipeline/events.js';
import { DomainList } from '../protocol/match.js';
import { cidrList, domainList, fillReply, replyTemplate } from './shared.js';


const settings = z.strictObject({
  /** Absent: rules/site.yaml's; present: this rule's own (narrower) list. */
  localDomains: domainList.optional(),
  relayNetworks: cidrList.optional(),
  senderLogins: z.record(z.string(), z.union([z.string(), z.array(z.string())])).default({}),
  requireOwnedSender: z.boolean().default(false),
  notOwnedReply: replyTemplate.default('553 5.7.1 <{address}>: Sender address rejected: not owned by you'),
  mismatchReply: replyTemplate.default('553 5.7.1 <{address}>: Sender address rejected: not owned by user {login}'),
});

export const senderRule = defineRuleType({
  type: 'sender',
  description: 'Forged senders: local-domain senders from outside, sender/login mismatch',
  settings,
  siteKeys: ['localDomains', 'relayNetworks'],
  create(name, s, deps) {
    const site = deps.site ?? NO_SITE;
    const local = s.localDomains ? new DomainList(s.localDomains) : site.localDomains;
    const networks = s.relayNetworks ? s.relayNetworks.map(parseCidr) : site.relayNetworks;
    const owners = new Map<string, string[]>();
    for (const [k, v] of Object.entries(s.senderLogins)) {
      // One trailing dot is ignored, as everywhere a domain is matched (match.ts).
      const key = k.trim().toLowerCase().replace(/^@/, '').replace(/\.$/, '');
      owners.set(key, (Array.isArray(v) ? v : [v]).map((x) => x.toLowerCase()));
    }
    return {
      name,
      type: 'sender',
      bypassable: false,
      checks: onStages(['mail'], (ev: SessionEvent): Finding => {
        if (ev.stage !== 'mail' || ev.sender.isNull) return PASS;
        const p = ev.sender;
        const auth = ev.session.auth;
        if (auth) {
          if (owners.size === 0) return PASS;
          const login = (auth.login ?? '').toLowerCase();
          const found = owners.get(`${p.local.toLowerCase()}@${p.domain}`) ?? owners.get(p.domain);
          if (found ? found.includes(login) : !s.requireOwnedSender) return PASS;
          return { kind: 'reject', reason: 'login_mismatch', reply: fillReply(s.mismatchReply, { address: p.raw, login: auth.login ?? '' }) };
        }
        if (inAnyCidr(ev.session.client, networks) || inAnyCidr(ev.session.client, site.trustedNetworks)) return PASS;
        if (p.domain && local.has(p.domain)) return { kind: 'reject', reason: 'not_owned', reply: fillReply(s.notOwnedReply, { address: p.raw }) };
        return PASS;
      }),
    };
  },
});
