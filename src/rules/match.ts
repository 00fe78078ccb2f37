/**
 * match.ts — patterns shared by rules that list hosts and addresses (access, later relay).
 *
 * Address patterns: `user@example.com` (that address), `example.com` or `@example.com` (that
 * domain), `*.example.com` (any subdomain, not the domain itself), `user@` (that local part at
 * any domain), `<>` (the null sender). Host patterns: `name.example` or `*.example`. Matching
 * is case-insensitive and ignores one trailing dot.
 */
import { normaliseDomain, type ParsedPath } from '../smtp/address.js';

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
