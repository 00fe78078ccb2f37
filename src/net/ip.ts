/**
 * ip.ts — client addresses, parsed once with ipaddr.js.
 *
 * Rules get a typed `ClientAddress`, never a bare string. IPv4-mapped IPv6 (`::ffff:1.2.3.4`,
 * what a dual-stack socket reports for IPv4 clients) is unwrapped to IPv4 with ipaddr.js
 * `process()`, so an IPv4 ACL matches IPv4 clients on any listener.
 */
import ipaddr from 'ipaddr.js';

export type IP = ipaddr.IPv4 | ipaddr.IPv6;

export interface ClientAddress {
  /** Normalised text form (IPv4 dotted, IPv6 RFC 5952). */
  readonly text: string;
  readonly family: 4 | 6;
  readonly ip: IP;
}

/** Parses an address as given by a socket or a PROXY header; throws on a non-address. */
export function parseAddress(text: string): ClientAddress {
  const ip = ipaddr.process(text.replace(/%.*$/, ''));
  return { text: ip.toString(), family: ip.kind() === 'ipv4' ? 4 : 6, ip };
}

/** Network bytes of an address (4 or 16). */
export function addressBytes(text: string): number[] {
  return ipaddr.parse(text).toByteArray();
}

/** Address from network bytes. */
export function addressFromBytes(bytes: Uint8Array): string {
  return ipaddr.process(ipaddr.fromByteArray([...bytes]).toString()).toString();
}

export interface Cidr {
  readonly text: string;
  readonly range: [IP, number];
}

/** Parses `a.b.c.d/n`, `x::/n` or a single address (as /32 or /128). Throws when invalid. */
export function parseCidr(text: string): Cidr {
  const t = text.trim();
  if (t.includes('/')) {
    const [ip, bits] = ipaddr.parseCIDR(t);
    // An IPv4-mapped IPv6 network is matched as the IPv4 network it wraps.
    if (ip.kind() === 'ipv6' && (ip as ipaddr.IPv6).isIPv4MappedAddress() && bits >= 96) {
      return { text: t, range: [(ip as ipaddr.IPv6).toIPv4Address(), bits - 96] };
    }
    return { text: t, range: [ip, bits] };
  }
  const ip = ipaddr.process(t);
  return { text: t, range: [ip, ip.kind() === 'ipv4' ? 32 : 128] };
}

/** True when the address lies in the network; an IPv4 address never matches an IPv6 network. */
export function inCidr(addr: ClientAddress, cidr: Cidr): boolean {
  const [net, bits] = cidr.range;
  if (addr.ip.kind() !== net.kind()) return false;
  return (addr.ip as ipaddr.IPv4).match(net as ipaddr.IPv4, bits);
}

export function inAnyCidr(addr: ClientAddress, cidrs: readonly Cidr[]): boolean {
  return cidrs.some((c) => inCidr(addr, c));
}

/**
 * The key under which a client is counted for the per-client connection limit: an IPv4 address
 * (a /32), or the IPv6 network of `v6Prefix` bits around an IPv6 address (`2001:db8:1:2::/64`).
 * One IPv6 host is usually given a whole /64, so counting each IPv6 address separately would let
 * it open a limit's worth of connections per address it picks (2^64 of them).
 */
export function clientKey(addr: ClientAddress, v6Prefix: number): string {
  if (addr.family === 4 || v6Prefix >= 128) return addr.text;
  const bytes = addr.ip.toByteArray();
  for (let i = 0; i < 16; i++) {
    const keep = Math.min(8, Math.max(0, v6Prefix - i * 8));
    bytes[i] = (bytes[i] ?? 0) & ((0xff << (8 - keep)) & 0xff);
  }
  return `${ipaddr.fromByteArray(bytes).toString()}/${v6Prefix}`;
}
