/**
 * relay — open-relay prevention (Postfix reject_unauth_destination + allow_untrusted_routing=no).
 *
 * Relay rights: the client is in `relayNetworks`, or authenticated at the backend (AUTH 235) when
 * `authenticatedMayRelay`. Clients with relay rights are not checked further. `localDomains` and
 * `relayNetworks` are rules/site.yaml's (RuleDeps.site) unless the rule file narrows them; the
 * site's `trustedNetworks` get no relay rights.
 * Detects, for clients without relay rights:
 *   stage mail  auth_required   the listener's role is in `requireAuthOn` (default submission,
 *                               smtps) and the client is not authenticated → 530 5.7.0
 *   stage rcpt  foreign_domain  the recipient's domain (normalised: case, trailing dot) is not in
 *                               `localDomains` → relayReply (554 5.7.1 <addr>: Relay access denied)
 *               source_route    `@a,@b:user@local` — judged on the final domain, refused anyway
 *               percent_hack    `user%other@local`
 *               bang_path       `other!user@local`, `other!user`
 *               double_at       `"user@other"@local`, a second @ in the local part
 *               address_literal `user@[192.0.2.1]`, `user@[IPv6:…]` unless listed in localDomains
 *               no_domain       `user` without a domain (only `postmaster` is accepted, RFC 5321 §4.5.1)
 *               null_sender_rcpts  more than `nullSenderMaxRecipients` recipients for `<>`, counting
 *                               every recipient let through (pipelined ones the backend has
 *                               not answered yet too)
 *   stage etrn  etrn_denied    ETRN (RFC 1985: "flush the queue of this node") from a client
 *                              without relay rights, for a node not in `etrnDomains`
 *                              → 554 5.7.1 <node>: Etrn command rejected: Access denied (as
 *                              Postfix's smtpd_etrn_restrictions answer)
 * Settings: localDomains, relayNetworks (absent: rules/site.yaml's), authenticatedMayRelay (true),
 *   requireAuthOn ([submission, smtps]), nullSenderMaxRecipients (null: no limit),
 *   relayReply ("554 5.7.1 <{address}>: Relay access denied"; {address} is replaced),
 *   etrnDomains ([]: domains whose queue anyone may ask for with ETRN).
 * Not bypassable: an allowlist never opens the relay.
 * Metrics: doorman_rejections_total{rule,stage}; the reason is in the session log.
 * Errors: none expected (pure matching); onError applies regardless.
 */
import { z } from 'zod';
import { inAnyCidr, parseCidr, type Cidr } from '../net/ip.js';
import { NO_SITE } from '../pipeline/site.js';
import { defineRuleType, onStages, PASS, type Finding } from '../pipeline/rule.js';
import type { SessionEvent, SessionSnapshot } from '../pipeline/events.js';
import { normaliseDomain, type ParsedPath } from '../protocol/address.js';
import { DomainList } from '../protocol/match.js';
import { cidrList, domainList, echo, fillReply, replyTemplate } from './shared.js';

export const DEFAULT_RELAY_REPLY = '554 5.7.1 <{address}>: Relay access denied';


const settings = z.strictObject({
  /** Absent: rules/site.yaml's; present: this rule's own (narrower) list. */
  localDomains: domainList.optional(),
  relayNetworks: cidrList.optional(),
  authenticatedMayRelay: z.boolean().default(true),
  requireAuthOn: z.array(z.enum(['smtp', 'submission', 'smtps'])).default(['submission', 'smtps']),
  nullSenderMaxRecipients: z.number().int().positive().nullable().default(null),
  relayReply: replyTemplate.default(DEFAULT_RELAY_REPLY),
  etrnDomains: domainList.default([]),
});

/** Why a recipient needs relay rights, or null when it is a plain local address. */
export function routingTrick(p: ParsedPath, local: DomainList): string | null {
  if (p.route.length) return 'source_route';
  if (!p.domain) return p.local.toLowerCase() === 'postmaster' ? null : p.local.includes('!') ? 'bang_path' : 'no_domain';
  if (p.literal !== undefined && !local.has(p.domain)) return 'address_literal';
  if (p.local.includes('@')) return 'double_at';
  if (p.local.includes('%')) return 'percent_hack';
  if (p.local.includes('!')) return 'bang_path';
  if (!local.has(p.domain)) return 'foreign_domain';
  return null;
}

export function hasRelayRights(s: SessionSnapshot, networks: readonly Cidr[], authMayRelay: boolean): boolean {
  return inAnyCidr(s.client, networks) || (authMayRelay && s.auth !== null);
}

export const relayRule = defineRuleType({
  type: 'relay',
  description: 'Open-relay prevention: local domains, relay networks, AUTH, routing tricks',
  settings,
  siteKeys: ['localDomains', 'relayNetworks'],
  create(name, s, deps) {
    const site = deps.site ?? NO_SITE;
    const local = s.localDomains ? new DomainList(s.localDomains) : site.localDomains;
    const networks = s.relayNetworks ? s.relayNetworks.map(parseCidr) : site.relayNetworks;
    const etrnDomains = new DomainList(s.etrnDomains);
    return {
      name,
      type: 'relay',
      bypassable: false,
      checks: onStages(['mail', 'rcpt', 'etrn'], (ev: SessionEvent): Finding => {
        if (ev.stage !== 'mail' && ev.stage !== 'rcpt' && ev.stage !== 'etrn') return PASS;
        if (hasRelayRights(ev.session, networks, s.authenticatedMayRelay)) return PASS;
        if (ev.stage === 'etrn') {
          // Flushing a queue is the relay's business: its clients, or the domains listed for anyone.
          if (etrnDomains.has(normaliseDomain(ev.node.replace(/^@/, '')))) return PASS;
          return { kind: 'reject', reason: 'etrn_denied', reply: { code: 554, enhanced: '5.7.1', text: `<${echo(ev.node)}>: Etrn command rejected: Access denied` } };
        }
        if (ev.stage === 'mail') {
          if (!(s.requireAuthOn as readonly string[]).includes(ev.session.listener.role)) return PASS;
          return { kind: 'reject', reason: 'auth_required', reply: { code: 530, enhanced: '5.7.0', text: 'Authentication required' } };
        }
        const p = ev.recipient;
        const trick = routingTrick(p, local);
        if (trick) return { kind: 'reject', reason: trick, reply: fillReply(s.relayReply, { address: p.raw }) };
        const max = s.nullSenderMaxRecipients;
        if (max !== null && ev.session.sender?.isNull && ev.session.recipientsForwarded >= max) {
          return { kind: 'reject', reason: 'null_sender_rcpts', reply: { code: 550, enhanced: '5.5.3', text: `<${echo(p.raw)}>: Too many recipients for the null sender` } };
        }
        return PASS;
      }),
    };
  },
});
