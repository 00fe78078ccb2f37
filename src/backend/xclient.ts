/**
 * xclient.ts — what the backend learns of the real client: Postfix's XCLIENT command.
 *
 * Which attributes the backend takes (its EHLO XCLIENT keyword; only with ADDR is it used),
 * and the one command that carries the client's address, port, reverse name, the address it
 * connected to and — where the backend takes them (HELO, PROTO) and the line stays within 512
 * octets — its HELO name and protocol, so that no HELO/EHLO has to follow. Values are xtext.
 */
import type { ProxiedAddress } from './proxy-protocol.js';

/** What the backend should learn of the real client. */
export interface ClientIdentity extends ProxiedAddress {
  /** The client's reverse name if known (XCLIENT NAME), else undefined → [UNAVAILABLE]. */
  name?: string;
}

/** RFC 5321 §4.5.3.1.4: a command line, CRLF included. */
export const MAX_COMMAND_LINE = 512;

/** The XCLIENT attributes a backend lists in its EHLO reply; null when it cannot carry the client's address. */
export function xclientAttributes(keyword: string | undefined): Set<string> | null {
  if (keyword === undefined) return null;
  const attrs = new Set(keyword.toUpperCase().split(/\s+/));
  // An XCLIENT that cannot carry the client's address (smtp-sink lists only NAME HELO) is not used.
  return attrs.has('ADDR') ? attrs : null;
}

/**
 * The XCLIENT command for `client`, with its HELO name and protocol when `withHelo` and the
 * backend takes them (`heloSent`: no HELO/EHLO has to follow).
 */
export function xclientCommand(allowed: ReadonlySet<string>, client: ClientIdentity, helo: { verb: 'EHLO' | 'HELO'; name: string }, withHelo: boolean): { line: string; heloSent: boolean } {
  const attrs: string[] = [];
  const add = (list: string[], k: string, v: string | number | undefined) => {
    if (v !== undefined && allowed.has(k)) list.push(`${k}=${xtext(String(v))}`);
  };
  add(attrs, 'ADDR', client.family === 6 ? `IPV6:${client.address}` : client.address);
  add(attrs, 'PORT', client.port);
  add(attrs, 'NAME', client.name ?? '[UNAVAILABLE]');
  add(attrs, 'DESTADDR', client.destFamily === 6 ? `IPV6:${client.destAddress}` : client.destAddress);
  add(attrs, 'DESTPORT', client.destPort);
  // The HELO name stands for the EHLO only with the protocol (PROTO: whether it was HELO or
  // EHLO), when the operator allows it (xclientHelo), and within Postfix's limits: HELO names
  // of up to 255 characters, command lines of up to 512. Otherwise the EHLO follows.
  const hello: string[] = [];
  if (withHelo && allowed.has('HELO') && allowed.has('PROTO') && helo.name.length <= 255) {
    add(hello, 'HELO', helo.name);
    add(hello, 'PROTO', helo.verb === 'EHLO' ? 'ESMTP' : 'SMTP');
  }
  let heloSent = false;
  if (hello.length && `XCLIENT ${[...attrs, ...hello].join(' ')}`.length <= MAX_COMMAND_LINE - 2) {
    attrs.push(...hello);
    heloSent = true;
  }
  // ADDR is always among them (xclientAttributes is only set when the backend lists it).
  return { line: `XCLIENT ${attrs.join(' ')}`, heloSent };
}

/** RFC 3461 §4 xtext: "+" and characters outside "!".."~" and "=" become +HH. */
export function xtext(s: string): string {
  let out = '';
  for (const ch of Buffer.from(s, 'utf8')) {
    out += ch < 0x21 || ch > 0x7e || ch === 0x2b || ch === 0x3d ? '+' + ch.toString(16).toUpperCase().padStart(2, '0') : String.fromCharCode(ch);
  }
  return out;
}
