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
 * Settings: requireFqdn (true), allowBareIp (false), allowAddressLiteral (true).
 * Bypassable: an allowlisted client (access allow) is not checked.
 * Metrics: doorman_rule_evaluations_total{rule}, doorman_rejections_total{rule}.
 * Errors: none expected (pure syntax); the runner's onError applies regardless.
 */
import net from 'node:net';
import { z } from 'zod';
import { defineRuleType, PASS, type Finding } from '../pipeline/rule.js';
import type { SessionEvent } from '../pipeline/events.js';

const settings = z.strictObject({
  requireFqdn: z.boolean().default(true),
  allowBareIp: z.boolean().default(false),
  allowAddressLiteral: z.boolean().default(true),
});

const LABEL = /^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$/;

export function isHostName(name: string): boolean {
  const n = name.endsWith('.') ? name.slice(0, -1) : name;
  if (n.length === 0 || n.length > 253) return false;
  return n.split('.').every((l) => LABEL.test(l) || /^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$/.test(l));
}

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
  create(name, s) {
    return {
      name,
      type: 'helo',
      stages: ['helo'],
      bypassable: true,
      check(ev: SessionEvent): Finding {
        if (ev.stage !== 'helo') return PASS;
        const h = ev.name;
        const bad = (text: string, code = 501) => ({ kind: 'reject', reason: text.toLowerCase(), reply: { code, enhanced: '5.5.2', text: `<${h}>: Helo command rejected: ${text}` } }) as const;
        if (h.startsWith('[')) {
          if (literalAddress(h) === null) return bad('Invalid ip address');
          return s.allowAddressLiteral ? PASS : bad('Address literal not allowed');
        }
        if (net.isIP(h)) return s.allowBareIp ? PASS : bad('Invalid name');
        if (!isHostName(h)) return bad('Invalid name');
        if (s.requireFqdn && !h.replace(/\.$/, '').includes('.')) return bad('need fully-qualified hostname', 504);
        return PASS;
      },
    };
  },
});
