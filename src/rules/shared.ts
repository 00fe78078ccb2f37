/**
 * shared.ts — what several rules need, kept out of the rules themselves (rules never import each
 * other): settings schemas for networks, domains and reply texts, the client-network key, host-name
 * syntax, reply templates and the sanitising of client text echoed in replies.
 */
import ipaddr from 'ipaddr.js';
import { z } from 'zod';
import { parseCidr, type ClientAddress } from '../net/ip.js';
import { parseReplySpec, type ReplySpec } from '../pipeline/rule.js';
import { isDomainPattern } from '../protocol/match.js';

/** A list of addresses / CIDRs (IPv4 and IPv6), each checked with ipaddr.js. */
export const cidrList = z.array(z.string()).superRefine((list, ctx) => {
  for (const c of list) {
    try {
      parseCidr(c);
    } catch {
      ctx.addIssue({ code: 'custom', message: `not an address or CIDR: ${c}` });
    }
  }
});

/** A list of domain patterns for DomainList: example.com, *.example.com, [192.0.2.1]. */
export const domainList = z.array(z.string()).superRefine((list, ctx) => {
  for (const d of list) if (!isDomainPattern(d)) ctx.addIssue({ code: 'custom', message: `not a domain pattern: ${d}` });
});

/** Reply templates are generic rule-file vocabulary (config/ checks `reply:` too): pipeline/rule.ts. */
export { replyTemplate } from '../pipeline/rule.js';

/**
 * A reply template (checked by `replyTemplate`) with its {placeholders} filled; each value is
 * echoed (printable, at most 256 characters). Unknown placeholders stay as written.
 */
export function fillReply(template: string, values: Readonly<Record<string, string>>): ReplySpec {
  return parseReplySpec(template.replace(/\{(\w+)\}/g, (m, k: string) => (k in values ? echo(values[k] ?? '') : m))) as ReplySpec;
}

/** Client text echoed in a reply: printable and at most 256 characters. */
export function echo(raw: string): string {
  // eslint-disable-next-line no-control-regex
  return raw.replace(/[\x00-\x1f\x7f]/g, '?').slice(0, 256);
}

/** The client's network as a key: the address masked to /v4 or /v6 (IPv6 /64: one client). */
export function clientKey(client: ClientAddress, v4: number, v6: number): string {
  const isV4 = client.ip.kind() === 'ipv4';
  const bits = isV4 ? v4 : v6;
  if (bits >= (isV4 ? 32 : 128)) return client.text;
  const net = (isV4 ? ipaddr.IPv4 : ipaddr.IPv6).networkAddressFromCIDR(`${client.text}/${bits}`);
  return `${net.toString()}/${bits}`;
}

/** RFC 1123 host name (labels of letters, digits, hyphens; underscores tolerated), ≤ 253 octets. */
export function isHostName(name: string): boolean {
  const n = name.endsWith('.') ? name.slice(0, -1) : name;
  if (n.length === 0 || n.length > 253) return false;
  return n.split('.').every((l) => /^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$/.test(l));
}
