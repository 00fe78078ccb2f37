/**
 * helo — HELO/EHLO syntax check (Postfix reject_invalid_helo_hostname,
 * reject_non_fqdn_helo_hostname; Haraka helo.checks valid_hostname, bare_ip).
 *
 * Detects, at stage helo:
 *   invalid   a name that is neither a host name (RFC 1123 letters, digits, hyphens, dots; labels
 *             1–63, total ≤ 255) nor an address literal [a.b.c.d] / [IPv6:…] → 501 5.5.2
 *   non_fqdn  a host name without a dot (requireFqdn, default true)   → 504 5.5.2
 *   bare_ip   an IP address without brackets (allowBareIp, default false) → 501 5.5.2
 *   literal   an address literal when allowAddressLiteral is false (default true) → 501 5.5.2
 *   own_name  the name of doorman itself (its hostname, `ownNames`) (rejectOwnName, default true)
 *             → 550 5.7.1 <name>: Helo command rejected: You are not me
 *   own_address  an address literal (or bare IP) of doorman's own addresses, unless it is also the
 *             client's (rejectOwnName) → 550 5.7.1 … You are not me
 *   literal_mismatch  an address literal that is not the client's real address (after PROXY /
 *             XCLIENT), (literalMustMatch, default true) → 550 5.7.1 … Address literal mismatch
 * Settings: requireFqdn (true), allowBareIp (false), allowAddressLiteral (true),
 *   rejectOwnName (true), ownNames ([] — added to the greeting hostname), literalMustMatch (true).
 * Bypassable: an allowlisted client (access allow) is not checked.
 * Metrics: doorman_rule_evaluations_total{rule}, doorman_rejections_total{rule}.
 * Errors: none expected (pure syntax); the runner's onError applies regardless.
 */
import net from 'node:net';
import { z } from 'zod';
import { parseAddress } from '../net/ip.js';
import { isHostName } from './shared.js';
import { defineRuleType, onStages, PASS, type Finding } from '../pipeline/rule.js';
import type { SessionEvent } from '../pipeline/events.js';

const settings = z.strictObject({
  requireFqdn: z.boolean().default(true),
  allowBareIp: z.boolean().default(false),
  allowAddressLiteral: z.boolean().default(true),
  rejectOwnName: z.boolean().default(true),
  ownNames: z.array(z.string()).default([]),
  literalMustMatch: z.boolean().default(true),
});

export function literalAddress(name: string): string | null {
  const m = /^\[(?:IPv6:)?([^\]]+)\]$/i.exec(name);
  if (!m || m[1] === undefined) return null;
  const v6 = /^\[IPv6:/i.test(name);
  const ip = m[1];
  if (v6 ? net.isIPv6(ip) : net.isIPv4(ip)) return ip;
  return null;
}

export const heloRule = defineRuleType({
  type: 'helo',
  description: 'HELO/EHLO argument syntax: host name, FQDN, bare IP, address literal',
  settings,
  create(name, s, deps) {
    const ownNames = new Set([...deps.ownNames, ...s.ownNames].map((n) => n.toLowerCase().replace(/\.$/, '')));
    const ownAddresses = new Set(deps.ownAddresses);
    return {
      name,
      type: 'helo',
      bypassable: true,
      checks: onStages(['helo'], (ev: SessionEvent): Finding => {
        if (ev.stage !== 'helo') return PASS;
        const h = ev.name;
        const bad = (text: string, code = 501, enhanced = '5.5.2') =>
          ({ kind: 'reject', reason: text.toLowerCase(), reply: { code, enhanced, text: `<${h}>: Helo command rejected: ${text}` } }) as const;
        const client = ev.session.client.text;
        /** An IP the client claims: it must be its own, and never doorman's. */
        const claimed = (ip: string): Finding => {
          const text = parseAddress(ip).text;
          if (text === client) return PASS;
          if (s.rejectOwnName && (ownAddresses.has(text) || text === ev.session.localAddress)) return bad('You are not me', 550, '5.7.1');
          if (s.literalMustMatch) return bad('Address literal mismatch', 550, '5.7.1');
          return PASS;
        };
        if (h.startsWith('[')) {
          const ip = literalAddress(h);
          if (ip === null) return bad('Invalid ip address');
          if (!s.allowAddressLiteral) return bad('Address literal not allowed');
          return claimed(ip);
        }
        if (net.isIP(h)) return s.allowBareIp ? claimed(h) : bad('Invalid name');
        if (!isHostName(h)) return bad('Invalid name');
        if (s.rejectOwnName && ownNames.has(h.toLowerCase().replace(/\.$/, ''))) return bad('You are not me', 550, '5.7.1');
        if (s.requireFqdn && !h.replace(/\.$/, '').includes('.')) return bad('need fully-qualified hostname', 504);
        return PASS;
      }),
    };
  },
});
