/**
 * match.ts — host, domain and address patterns: rules that list them, site policy and rule scopes.
 *
 * Address patterns: `user@example.com` (that address), `example.com` or `@example.com` (that
 * domain), `*.example.com` (any subdomain, not the domain itself), `user@` (that local part at
 * any domain), `<>` (the null sender). Host patterns: `name.example` or `*.example`. Matching
 * is case-insensitive and ignores one trailing dot.
 */
import { normaliseDomain, type ParsedPath } from './address.js';

export type AddressPattern =
  | { kind: 'null' }
  | { kind: 'address'; local: string; domain: string }
  | { kind: 'local'; local: string }
  | { kind: 'domain'; domain: string }
  | { kind: 'subdomain'; suffix: string };

export function parseAddressPattern(p: string): AddressPattern | null {
  const s = p.trim();
  if (s === '<>') return { kind: 'null' };
  if (s.startsWith('*.')) return s.length > 2 ? { kind: 'subdomain', suffix: normaliseDomain(s.slice(1)) } : null;
  const at = s.lastIndexOf('@');
  if (at < 0) return s ? { kind: 'domain', domain: normaliseDomain(s) } : null;
  const local = s.slice(0, at).toLowerCase();
  const domain = normaliseDomain(s.slice(at + 1));
  if (!local && !domain) return null;
  if (!local) return { kind: 'domain', domain };
  if (!domain) return { kind: 'local', local };
  return { kind: 'address', local, domain };
}

export function matchAddress(p: AddressPattern, path: ParsedPath): boolean {
  switch (p.kind) {
    case 'null':
      return path.isNull;
    case 'address':
      return !path.isNull && path.local.toLowerCase() === p.local && path.domain === p.domain;
    case 'local':
      return !path.isNull && path.local.toLowerCase() === p.local;
    case 'domain':
      return !path.isNull && path.domain === p.domain;
    case 'subdomain':
      return !path.isNull && path.domain.endsWith(p.suffix);
  }
}

export function matchHost(pattern: string, name: string): boolean {
  const p = normaliseDomain(pattern.trim());
  const n = normaliseDomain(name);
  if (p.startsWith('*.')) return n.endsWith(p.slice(1));
  return n === p;
}

/**
 * A list of domains: `example.com` (exactly), `*.example.com` (any subdomain, not the domain
 * itself), `[192.0.2.1]` / `[IPv6:2001:db8::1]` (an address literal). Normalised like paths.
 */
export class DomainList {
  private readonly exact = new Set<string>();
  private readonly suffixes: string[] = [];

  constructor(patterns: readonly string[]) {
    for (const p of patterns) {
      const d = normaliseDomain(p.trim());
      if (d.startsWith('*.')) this.suffixes.push(d.slice(1));
      else if (d.startsWith('[')) this.exact.add(d.replace(/^\[ipv6:/i, '[ipv6:'));
      else this.exact.add(d);
    }
  }

  /** `domain` as ParsedPath.domain gives it (lower case, literals as `[…]`). */
  has(domain: string): boolean {
    if (this.exact.has(domain)) return true;
    return this.suffixes.some((s) => domain.endsWith(s));
  }

  get size(): number {
    return this.exact.size + this.suffixes.length;
  }
}

/** Valid entries for a DomainList (used by rule schemas). */
export function isDomainPattern(p: string): boolean {
  const d = p.trim();
  if (/^\[(ipv6:)?[0-9a-f:.]+\]$/i.test(d)) return true;
  return /^(\*\.)?([a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.?$/i.test(d);
}
