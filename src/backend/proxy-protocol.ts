/**
 * proxy-protocol.ts — HAProxy PROXY protocol v1 (text) and v2 (binary), both directions.
 * Spec: https://www.haproxy.org/download/2.8/doc/proxy-protocol.txt
 *
 * `proxyHeaderV1/V2` build the header doorman sends to the backend; `parseProxyHeader` reads the
 * header a trusted load balancer sends to doorman. The parser never buffers more than
 * MAX_PROXY_HEADER bytes: a peer that withholds the end of its header is cut off.
 */
import net from 'node:net';
import { addressBytes, addressFromBytes, parseAddress } from '../net/ip.js';

export interface ProxiedAddress {
  /** Source (client) address, IPv4-mapped IPv6 already unwrapped. */
  address: string;
  port: number;
  family: 4 | 6;
  /** Destination address (the listener the client reached). */
  destAddress: string;
  destPort: number;
  destFamily: 4 | 6;
}

/** v1 headers are at most 107 bytes; v2 16 + 65535, but we accept at most this much. */
export const MAX_PROXY_HEADER = 1024;

const V2_SIG = Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a]);

export function proxyHeaderV1(a: ProxiedAddress): string {
  if (a.family !== a.destFamily) return 'PROXY UNKNOWN\r\n';
  return `PROXY TCP${a.family} ${a.address} ${a.destAddress} ${a.port} ${a.destPort}\r\n`;
}

export function proxyHeaderV2(a: ProxiedAddress): Buffer {
  if (a.family !== a.destFamily) {
    return Buffer.concat([V2_SIG, Buffer.from([0x21, 0x00, 0x00, 0x00])]);
  }
  const v4 = a.family === 4;
  const alen = v4 ? 12 : 36;
  const head = Buffer.alloc(16 + alen);
  V2_SIG.copy(head, 0);
  head[12] = 0x21; // version 2, PROXY
  head[13] = v4 ? 0x11 : 0x21; // TCP over IPv4 / IPv6
  head.writeUInt16BE(alen, 14);
  const src = ipBytes(a.address, a.family);
  const dst = ipBytes(a.destAddress, a.family);
  src.copy(head, 16);
  dst.copy(head, 16 + src.length);
  head.writeUInt16BE(a.port, 16 + 2 * src.length);
  head.writeUInt16BE(a.destPort, 18 + 2 * src.length);
  return head;
}

export type ProxyParse =
  | { state: 'incomplete' }
  | { state: 'error'; reason: string }
  /** `address` null: a LOCAL / UNKNOWN header (health check): use the real peer address. */
  | { state: 'done'; consumed: number; address: ProxiedAddress | null; version: 1 | 2 };

export function parseProxyHeader(buf: Buffer): ProxyParse {
  if (buf.length >= 1 && buf[0] === 0x0d) return parseV2(buf);
  if (buf.length >= 1 && buf[0] === 0x50) return parseV1(buf);
  return { state: 'error', reason: 'not a PROXY header' };
}

function parseV1(buf: Buffer): ProxyParse {
  const prefix = Math.min(buf.length, 6);
  if (buf.subarray(0, prefix).toString('latin1') !== 'PROXY '.slice(0, prefix)) {
    return { state: 'error', reason: 'not a PROXY header' };
  }
  const end = buf.indexOf('\r\n');
  if (end < 0) return buf.length > 107 ? { state: 'error', reason: 'v1 header too long' } : { state: 'incomplete' };
  if (end + 2 > 107) return { state: 'error', reason: 'v1 header too long' };
  const parts = buf.subarray(0, end).toString('latin1').split(' ');
  if (parts[1] === 'UNKNOWN') return { state: 'done', consumed: end + 2, address: null, version: 1 };
  if (parts.length !== 6 || (parts[1] !== 'TCP4' && parts[1] !== 'TCP6')) {
    return { state: 'error', reason: 'bad v1 header' };
  }
  const family = parts[1] === 'TCP4' ? 4 : 6;
  const [, , src, dst, sport, dport] = parts as [string, string, string, string, string, string];
  if (net.isIP(src) !== family || net.isIP(dst) !== family) return { state: 'error', reason: 'bad v1 address' };
  const sp = port(sport);
  const dp = port(dport);
  if (sp === null || dp === null) return { state: 'error', reason: 'bad v1 port' };
  return {
    state: 'done',
    consumed: end + 2,
    version: 1,
    address: { address: unmap(src), port: sp, family: fam(unmap(src)), destAddress: unmap(dst), destPort: dp, destFamily: fam(unmap(dst)) },
  };
}

function parseV2(buf: Buffer): ProxyParse {
  const n = Math.min(buf.length, 12);
  if (!buf.subarray(0, n).equals(V2_SIG.subarray(0, n))) return { state: 'error', reason: 'not a PROXY header' };
  if (buf.length < 16) return { state: 'incomplete' };
  const verCmd = buf[12] ?? 0;
  if (verCmd >> 4 !== 2) return { state: 'error', reason: 'bad v2 version' };
  const len = buf.readUInt16BE(14);
  if (16 + len > MAX_PROXY_HEADER) return { state: 'error', reason: 'v2 header too long' };
  if (buf.length < 16 + len) return { state: 'incomplete' };
  const consumed = 16 + len;
  const cmd = verCmd & 0x0f;
  if (cmd === 0x0) return { state: 'done', consumed, address: null, version: 2 };
  if (cmd !== 0x1) return { state: 'error', reason: 'bad v2 command' };
  const famProto = buf[13] ?? 0;
  const body = buf.subarray(16, consumed);
  if (famProto === 0x11 && len >= 12) {
    const src = [...body.subarray(0, 4)].join('.');
    const dst = [...body.subarray(4, 8)].join('.');
    return {
      state: 'done', consumed, version: 2,
      address: { address: src, port: body.readUInt16BE(8), family: 4, destAddress: dst, destPort: body.readUInt16BE(10), destFamily: 4 },
    };
  }
  if (famProto === 0x21 && len >= 36) {
    const src = unmap(v6String(body.subarray(0, 16)));
    const dst = unmap(v6String(body.subarray(16, 32)));
    return {
      state: 'done', consumed, version: 2,
      address: { address: src, port: body.readUInt16BE(32), family: fam(src), destAddress: dst, destPort: body.readUInt16BE(34), destFamily: fam(dst) },
    };
  }
  // UNSPEC or a transport we do not relay (UDP, UNIX): treat like LOCAL.
  return { state: 'done', consumed, address: null, version: 2 };
}

function port(s: string): number | null {
  if (!/^\d{1,5}$/.test(s)) return null;
  const n = Number(s);
  return n <= 65535 ? n : null;
}

function fam(ip: string): 4 | 6 {
  return net.isIPv4(ip) ? 4 : 6;
}

/** `::ffff:1.2.3.4` → `1.2.3.4`; IPv6 in RFC 5952 form. */
export function unmap(ip: string): string {
  return parseAddress(ip).text;
}

function v6String(b: Buffer): string {
  return addressFromBytes(b);
}

function ipBytes(ip: string, family: 4 | 6): Buffer {
  const bytes = addressBytes(ip);
  if (family === 4 && bytes.length === 16) return Buffer.from(bytes.slice(12));
  return Buffer.from(bytes);
}
