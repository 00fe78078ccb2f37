/**
 * dns.ts — doorman's own resolver, shared by every DNS rule.
 *
 * Servers come from `dns.servers` / DOORMAN_DNS_SERVERS (default: the system's), with doorman's
 * own per-query timeout and tries (never the 25 s defaults that outrun SMTP deadlines). The
 * `resolve(name, rrtype)` shape is that of dns.promises.resolve, which is what mailauth and
 * other libraries of the field take. Errors keep Node's codes: ENOTFOUND and ENODATA mean
 * "no such record", ETIMEOUT / ESERVFAIL / EREFUSED / ECONNREFUSED mean "could not tell".
 */
import dns from 'node:dns';
import ipaddr from 'ipaddr.js';

export type RecordType = 'A' | 'AAAA' | 'TXT' | 'MX' | 'PTR' | 'CNAME' | 'NS' | 'SOA' | 'SRV';

export interface DnsResolver {
  /** dns.promises.resolve semantics (TXT → string[][], A → string[], MX → {exchange, priority}[], …). */
  resolve(name: string, rrtype: string): Promise<string[] | string[][]>;
  /** A records with their TTLs (seconds). */
  resolveA(name: string): Promise<{ address: string; ttl: number }[]>;
  /** AAAA records with their TTLs (seconds). */
  resolveAAAA(name: string): Promise<{ address: string; ttl: number }[]>;
  /** PTR names of an address. */
  reverse(ip: string): Promise<string[]>;
  /** The servers in use ([] = the system's). */
  readonly servers: readonly string[];
}

export interface ResolverOptions {
  /** host or host:port ([v6]:port), in order. Empty: the system's resolver configuration. */
  servers: readonly string[];
  /** Per-try timeout, ms. */
  timeout: number;
  /** Tries per query. */
  tries: number;
}

export function createResolver(opts: ResolverOptions): DnsResolver {
  const r = new dns.promises.Resolver({ timeout: opts.timeout, tries: opts.tries });
  if (opts.servers.length) r.setServers([...opts.servers]);
  return {
    servers: r.getServers(),
    resolve: (name, rrtype) => r.resolve(name, rrtype) as Promise<string[] | string[][]>,
    resolveA: (name) => r.resolve4(name, { ttl: true }),
    resolveAAAA: (name) => r.resolve6(name, { ttl: true }),
    reverse: (ip) => r.reverse(ip),
  };
}

/** True for the errors that mean "the name or record does not exist" (not a failure). */
export function isNoRecord(err: unknown): boolean {
  const code = (err as { code?: string } | null)?.code;
  return code === 'ENOTFOUND' || code === 'ENODATA';
}

/** The DNSBL query name of an address (RFC 5782 §2.1, §2.4): reversed octets or 32 reversed nibbles. */
export function reversedName(ip: string, unwrapMapped = true): string {
  // RFC 5782 §5 tests IPv6 lists with ::FFFF:7F00:2 itself, as nibbles: no unwrapping there.
  const parsed = unwrapMapped ? ipaddr.process(ip) : ipaddr.parse(ip);
  if (parsed.kind() === 'ipv4') return parsed.toByteArray().reverse().join('.');
  const hex = parsed.toByteArray().map((b) => b.toString(16).padStart(2, '0')).join('');
  return [...hex].reverse().join('.');
}

/**
 * Rejects with an ETIMEOUT error (Node's code for a DNS timeout) when `p` takes longer than `ms`:
 * a rule's own deadline for a lookup, shorter than the resolver's timeout × tries.
 */
export function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const t = setTimeout(() => reject(Object.assign(new Error(`timeout after ${ms} ms`), { code: 'ETIMEOUT' })), ms);
    p.then(
      (v) => {
        clearTimeout(t);
        resolve(v);
      },
      (e: unknown) => {
        clearTimeout(t);
        reject(e);
      },
    );
  });
}
