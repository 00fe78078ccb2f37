/**
 * protocol/auth-results.ts — authentication results as data, and their Authentication-Results
 * header value (RFC 8601).
 *
 * Part of the protocol ground floor (src/protocol/): it imports nothing of the project.
 *
 * A rule that authenticates something (spf, dmarc) puts an `AuthResult` in its finding; the
 * pipeline collects them per stage (StageVerdict.results) and the session per transaction
 * (SessionSnapshot.authResults). The front writes them once with `formatAuthResults`, after
 * removing the incoming headers that `claimsAuthservId` says pretend to be ours (RFC 8601 §5).
 */

/** One resinfo of RFC 8601 §2.2: `method=result [reason=…] ptype.property=value…`. */
export interface AuthResult {
  /** spf, dkim, dmarc, arc, iprev (RFC 8601 §2.7; tokens). */
  readonly method: string;
  /** pass, fail, softfail, neutral, none, temperror, permerror, policy… */
  readonly result: string;
  /** Free text, written as `reason=` (a token or a quoted-string). */
  readonly reason?: string;
  /** ptype.property and value: ['smtp.mailfrom','a@b'], ['header.d','b'], ['header.from','b']. */
  readonly props: readonly (readonly [string, string])[];
}

/** RFC 2045 token: no SPACE, CTLs or tspecials. */
const TOKEN = /^[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+$/;
/** RFC 5322 dot-atom (a pvalue's local-part and domain, RFC 8601 §2.2). */
const DOT_ATOM = /^[!#$%&'*+\-/=?^_`{|}~0-9A-Za-z]+(\.[!#$%&'*+\-/=?^_`{|}~0-9A-Za-z]+)*$/;
const DOMAIN = /^[0-9A-Za-z]([0-9A-Za-z-]*[0-9A-Za-z])?(\.[0-9A-Za-z]([0-9A-Za-z-]*[0-9A-Za-z])?)*\.?$/;

/** A quoted-string: `\` and `"` escaped; CR, LF and other controls (which cannot be quoted) become spaces. */
export function quoteValue(s: string): string {
  // eslint-disable-next-line no-control-regex
  return `"${s.replace(/[\x00-\x1f\x7f]/g, ' ').replace(/[\\"]/g, (c) => `\\${c}`)}"`;
}

/** RFC 8601 `value` (reason): a token as is, else a quoted-string. */
export function formatValue(s: string): string {
  return TOKEN.test(s) ? s : quoteValue(s);
}

/**
 * RFC 8601 `pvalue`: a value, or `[local-part] "@" domain-name` unquoted when both are plain
 * (`a@b.example`, `@b.example`); anything else as a quoted-string.
 */
export function formatPvalue(s: string): string {
  const at = s.lastIndexOf('@');
  if (at >= 0) {
    const local = s.slice(0, at);
    const domain = s.slice(at + 1);
    if ((local === '' || DOT_ATOM.test(local)) && DOMAIN.test(domain)) return s;
    return quoteValue(s);
  }
  return formatValue(s);
}

/** A method, result or property name: a token of letters, digits, `-`, `_` and `.` (anything else dropped). */
function name(s: string): string {
  return s.replace(/[^0-9A-Za-z._-]/g, '') || 'unknown';
}

/** One resinfo: `dkim=pass reason="…" header.d=b header.s=sel`. */
export function formatResinfo(r: AuthResult): string {
  const parts = [`${name(r.method)}=${name(r.result)}`];
  if (r.reason !== undefined && r.reason !== '') parts.push(`reason=${formatValue(r.reason)}`);
  for (const [k, v] of r.props) parts.push(`${name(k)}=${formatPvalue(v)}`);
  return parts.join(' ');
}

/**
 * The value of an Authentication-Results header (RFC 8601 §2.2): `authserv-id; resinfo; …`, or
 * `authserv-id; none` without results. One line, unless `fold` puts each resinfo on a line of
 * its own (`;CRLF\t`), which keeps a header with many signatures under 998 bytes a line.
 * With `maxOctets`, results that would make the value longer are left out (a message with
 * hundreds of signatures gets a bounded header).
 */
export function formatAuthResults(authservId: string, results: readonly AuthResult[], opts: { fold?: boolean; maxOctets?: number } = {}): string {
  const id = formatValue(authservId);
  if (results.length === 0) return `${id}; none`;
  const sep = opts.fold ? ';\r\n\t' : '; ';
  const max = opts.maxOctets ?? Infinity;
  let out = id;
  for (const r of results) {
    const next = `${out}${sep}${formatResinfo(r)}`;
    if (next.length > max) continue;
    out = next;
  }
  return out;
}

/**
 * Does this Authentication-Results header value claim `authservId`? (RFC 8601 §5: a receiver
 * removes, or renames, the incoming ones that do, since only it may write them.) The value's
 * leading CFWS — spaces, folding, comments — is skipped; the authserv-id, a token or a
 * quoted-string, is compared case-insensitively (it is a host name).
 */
export function claimsAuthservId(headerValue: string, authservId: string): boolean {
  const s = headerValue;
  let i = skipCfws(s, 0);
  let id = '';
  if (s[i] === '"') {
    i++;
    for (; i < s.length && s[i] !== '"'; i++) {
      if (s[i] === '\\' && i + 1 < s.length) i++;
      id += s[i];
    }
    if (s[i] !== '"') return false;
  } else {
    while (i < s.length && TOKEN.test(s[i] as string)) id += s[i++];
  }
  return id !== '' && id.toLowerCase().replace(/\.$/, '') === authservId.toLowerCase().replace(/\.$/, '');
}

/** The index after CFWS (RFC 5322 §3.2.2: white space, folding, nested comments with quoted-pairs). */
function skipCfws(s: string, i: number): number {
  for (;;) {
    while (i < s.length && (s[i] === ' ' || s[i] === '\t' || s[i] === '\r' || s[i] === '\n')) i++;
    if (s[i] !== '(') return i;
    let depth = 0;
    for (; i < s.length; i++) {
      const c = s[i];
      if (c === '\\') i++;
      else if (c === '(') depth++;
      else if (c === ')' && --depth === 0) {
        i++;
        break;
      }
    }
    if (depth > 0) return s.length;
  }
}
