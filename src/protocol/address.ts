/**
 * protocol/address.ts — RFC 5321 §4.1.2 paths: `<[@route,@route:]local@domain>` and `<>`.
 *
 * Part of the protocol ground floor (src/protocol/): smtp/, backend/, pipeline/ and rules/ import
 * it; it imports none of them.
 *
 * A pure parser: it never throws on client input; it returns either a parsed path or the reason
 * it could not be parsed. The parsed form keeps the client's spelling (`raw`, forwarded to the
 * backend as given) next to the normalised parts that rules judge: the domain lower-cased
 * without a trailing dot, an address literal's IP unwrapped, and the source route kept apart.
 */

export interface ParsedPath {
  /** The text between < and >, exactly as the client sent it. */
  readonly raw: string;
  /** True for the null path `<>`. */
  readonly isNull: boolean;
  /** Source route hops (`@a,@b:`), normalised; empty when there is none. */
  readonly route: readonly string[];
  /** Local part as sent (quotes kept). */
  readonly localRaw: string;
  /** Local part with quoting removed (`"a b"` → `a b`). */
  readonly local: string;
  /** True when the local part was a quoted string. */
  readonly quoted: boolean;
  /** Domain as sent, after the last unquoted @. */
  readonly domainRaw: string;
  /** Domain lower-cased, trailing dot removed; for literals the bracketed form normalised. */
  readonly domain: string;
  /** The IP of an address literal (`[1.2.3.4]`, `[IPv6:…]`), else undefined. */
  readonly literal?: string;
  /** Any byte ≥ 0x80 in the path (needs SMTPUTF8). */
  readonly utf8: boolean;
}

export type PathResult = { ok: true; path: ParsedPath } | { ok: false; reason: string };

/** RFC 5321 §4.5.3.1: local part 64, domain 255, path 256 octets. */
export const MAX_LOCAL_PART = 64;
export const MAX_DOMAIN = 255;
export const MAX_PATH = 256;

/** Splits `<path> params…` from a MAIL/RCPT argument after `FROM:` / `TO:`. */
export function splitPathArg(arg: string): { path: string; rest: string } | null {
  const s = arg.trimStart();
  if (!s.startsWith('<')) {
    // Some clients omit the angle brackets; accept a bare address without spaces.
    const m = /^(\S+)(.*)$/.exec(s);
    if (!m || m[1] === undefined) return null;
    return { path: m[1], rest: m[2] ?? '' };
  }
  let inQuote = false;
  for (let i = 1; i < s.length; i++) {
    const c = s[i];
    if (c === '\\' && inQuote) {
      i++;
      continue;
    }
    if (c === '"') inQuote = !inQuote;
    else if (c === '>' && !inQuote) return { path: s.slice(1, i), rest: s.slice(i + 1) };
  }
  return null;
}

/** Parses the inside of a path (without the angle brackets). */
export function parsePath(raw: string): PathResult {
  // eslint-disable-next-line no-control-regex
  const utf8 = /[^\x00-\x7f]/.test(raw);
  // eslint-disable-next-line no-control-regex
  if (/[\x00-\x1f\x7f]/.test(raw)) return { ok: false, reason: 'control character in address' };
  if (raw === '') {
    return {
      ok: true,
      path: { raw, isNull: true, route: [], localRaw: '', local: '', quoted: false, domainRaw: '', domain: '', utf8 },
    };
  }
  if (Buffer.byteLength(raw) > MAX_PATH) return { ok: false, reason: 'path too long' };
  let rest = raw;
  const route: string[] = [];
  if (rest.startsWith('@')) {
    const colon = rest.indexOf(':');
    if (colon < 0) return { ok: false, reason: 'bad source route' };
    for (const hop of rest.slice(0, colon).split(',')) {
      if (!hop.startsWith('@') || hop.length < 2) return { ok: false, reason: 'bad source route' };
      route.push(normaliseDomain(hop.slice(1)));
    }
    rest = rest.slice(colon + 1);
  }
  // Find the last @ outside quotes.
  let at = -1;
  let inQuote = false;
  for (let i = 0; i < rest.length; i++) {
    const c = rest[i];
    if (c === '\\' && inQuote) {
      i++;
      continue;
    }
    if (c === '"') inQuote = !inQuote;
    else if (c === '@' && !inQuote) at = i;
  }
  if (inQuote) return { ok: false, reason: 'unterminated quoted string' };
  const localRaw = at < 0 ? rest : rest.slice(0, at);
  const domainRaw = at < 0 ? '' : rest.slice(at + 1);
  if (localRaw === '') return { ok: false, reason: 'empty local part' };
  if (at >= 0 && domainRaw === '') return { ok: false, reason: 'empty domain' };
  if (Buffer.byteLength(localRaw) > MAX_LOCAL_PART) return { ok: false, reason: 'local part too long' };
  if (Buffer.byteLength(domainRaw) > MAX_DOMAIN) return { ok: false, reason: 'domain too long' };
  const quoted = localRaw.length >= 2 && localRaw.startsWith('"') && localRaw.endsWith('"');
  const local = quoted ? localRaw.slice(1, -1).replace(/\\(.)/g, '$1') : localRaw;
  if (!quoted && /[\s"(),:;<>[\]\\]/.test(localRaw)) return { ok: false, reason: 'bad character in local part' };
  let domain = '';
  let literal: string | undefined;
  if (domainRaw.startsWith('[')) {
    if (!domainRaw.endsWith(']')) return { ok: false, reason: 'bad address literal' };
    const inner = domainRaw.slice(1, -1);
    const v6 = /^ipv6:(.+)$/i.exec(inner);
    literal = (v6?.[1] ?? inner).toLowerCase();
    domain = v6 ? `[ipv6:${literal}]` : `[${literal}]`;
  } else if (domainRaw) {
    if (!/^[^\s@<>()[\]\\,;:"]+$/.test(domainRaw)) return { ok: false, reason: 'bad domain' };
    domain = normaliseDomain(domainRaw);
    if (domain === '' || domain.includes('..') || domain.startsWith('.')) return { ok: false, reason: 'bad domain' };
  }
  const path: ParsedPath = { raw, isNull: false, route, localRaw, local, quoted, domainRaw, domain, utf8 };
  return { ok: true, path: literal === undefined ? path : { ...path, literal } };
}

/** Lower case, one trailing dot removed. */
export function normaliseDomain(d: string): string {
  const lower = d.toLowerCase();
  return lower.endsWith('.') ? lower.slice(0, -1) : lower;
}

/** The address as rules see it: `local@domain` with the normalised domain, or "" for `<>`. */
export function addressOf(p: ParsedPath): string {
  if (p.isNull) return '';
  return p.domain ? `${p.local}@${p.domain}` : p.local;
}
