/**
 * codec.ts — the Sendmail milter protocol, version 6, as bytes: packet framing, the MTA's
 * commands decoded, the filter's replies encoded, option negotiation as a pure function.
 *
 * Wire format (sendmail libmilter/mfdef.h, Postfix src/milter/milter8.c, MILTER_README):
 *   uint32 length (network order, counts the command byte and the data) · 1 byte command · data.
 *   Strings are NUL-terminated; numbers are network-order uint32, the connect port a uint16.
 *
 * Limits (named, with their unit):
 *   MILTER_MAX_PACKET — bytes in one packet (command byte + data). Postfix sends body chunks of at
 *   most 64 KiB and one header per packet (its header_size_limit is 100 KiB), so 1 MiB leaves room;
 *   a larger length is a protocol error: the parser throws MilterFrameError and the server closes.
 *
 * Nothing here touches a socket: `MilterParser` cuts packets out of chunks, `decodeCommand` turns
 * one into a typed command, the `encode*` functions build reply packets byte for byte.
 */

/** Bytes in one packet, the command byte included; a longer declared length closes the connection. */
export const MILTER_MAX_PACKET = 1024 * 1024;

/** The protocol version doorman speaks (Postfix ≥ 2.6 and Sendmail ≥ 8.14 offer 6). */
export const MILTER_VERSION = 6;

/** Commands from the MTA (SMFIC_*). */
export const SMFIC = {
  ABORT: 'A',
  BODY: 'B',
  CONNECT: 'C',
  MACRO: 'D',
  BODYEOB: 'E',
  HELO: 'H',
  QUIT_NC: 'K',
  HEADER: 'L',
  MAIL: 'M',
  EOH: 'N',
  OPTNEG: 'O',
  QUIT: 'Q',
  RCPT: 'R',
  DATA: 'T',
  UNKNOWN: 'U',
} as const;

/** Replies from the filter (SMFIR_*); only those doorman sends. */
export const SMFIR = {
  ADDHEADER: 'h',
  INSHEADER: 'i',
  CHGHEADER: 'm',
  CONTINUE: 'c',
  ACCEPT: 'a',
  REJECT: 'r',
  TEMPFAIL: 't',
  DISCARD: 'd',
  REPLYCODE: 'y',
  SETSYMLIST: 'l',
  OPTNEG: 'O',
} as const;

/** Actions the filter may take (SMFIF_*), negotiated in OPTNEG. */
export const SMFIF = {
  ADDHDRS: 0x01,
  CHGBODY: 0x02,
  ADDRCPT: 0x04,
  DELRCPT: 0x08,
  CHGHDRS: 0x10,
  QUARANTINE: 0x20,
  CHGFROM: 0x40,
  ADDRCPT_PAR: 0x80,
  SETSYMLIST: 0x100,
} as const;

/** Protocol flags (SMFIP_*): steps the MTA skips (NO*) or sends without waiting for a reply (NR_*). */
export const SMFIP = {
  NOCONNECT: 0x1,
  NOHELO: 0x2,
  NOMAIL: 0x4,
  NORCPT: 0x8,
  NOBODY: 0x10,
  NOHDRS: 0x20,
  NOEOH: 0x40,
  NR_HDR: 0x80, // SMFIP_NOHREPL
  NOUNKNOWN: 0x100,
  NODATA: 0x200,
  SKIP: 0x400,
  RCPT_REJ: 0x800,
  NR_CONN: 0x1000,
  NR_HELO: 0x2000,
  NR_MAIL: 0x4000,
  NR_RCPT: 0x8000,
  NR_DATA: 0x10000,
  NR_UNKN: 0x20000,
  NR_EOH: 0x40000,
  NR_BODY: 0x80000,
  HDR_LEADSPC: 0x100000,
} as const;

/** Macro stages (SMFIM_*) for the symbol lists in the OPTNEG reply. */
export const SMFIM = { CONNECT: 0, HELO: 1, ENVFROM: 2, ENVRCPT: 3, DATA: 4, EOM: 5, EOH: 6 } as const;
export type MacroStage = keyof typeof SMFIM;

/** A protocol violation: a packet too long, too short, or not what its command says. */
export class MilterFrameError extends Error {
  override name = 'MilterFrameError';
}

export interface MilterPacket {
  readonly command: string;
  readonly data: Buffer;
}

/**
 * Cuts packets out of a byte stream delivered in arbitrary chunks. `push` returns every packet
 * completed by the chunk; the rest stays buffered (never more than one packet's worth).
 */
export class MilterParser {
  private buf: Buffer = Buffer.alloc(0);

  constructor(private readonly maxPacket = MILTER_MAX_PACKET) {}

  /** Bytes held for an incomplete packet. */
  get buffered(): number {
    return this.buf.length;
  }

  push(chunk: Buffer): MilterPacket[] {
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
    const out: MilterPacket[] = [];
    let off = 0;
    while (this.buf.length - off >= 4) {
      const len = this.buf.readUInt32BE(off);
      if (len < 1) throw new MilterFrameError('packet length 0');
      if (len > this.maxPacket) throw new MilterFrameError(`packet length ${len} over ${this.maxPacket}`);
      if (this.buf.length - off < 4 + len) break;
      const command = String.fromCharCode(this.buf[off + 4]!);
      // Copy: the chunk's memory is not ours to keep, and a slice would pin the whole chunk.
      const data = Buffer.from(this.buf.subarray(off + 5, off + 4 + len));
      out.push({ command, data });
      off += 4 + len;
    }
    this.buf = off === 0 ? this.buf : Buffer.from(this.buf.subarray(off));
    return out;
  }
}

// ---------------------------------------------------------------- decoding

export type ConnectFamily = '4' | '6' | 'L' | 'U';

export type MilterCommand =
  | { readonly type: 'optneg'; readonly version: number; readonly actions: number; readonly protocol: number }
  | { readonly type: 'macro'; readonly stage: string; readonly macros: ReadonlyMap<string, string> }
  | {
      readonly type: 'connect';
      readonly hostname: string;
      readonly family: ConnectFamily;
      /** 0 for 'L' (unix socket) and 'U' (unknown). */
      readonly port: number;
      /** The IP address ('4', '6'), the socket path ('L'), '' for 'U'. */
      readonly address: string;
    }
  | { readonly type: 'helo'; readonly name: string }
  | { readonly type: 'mail'; readonly args: readonly string[] }
  | { readonly type: 'rcpt'; readonly args: readonly string[] }
  | { readonly type: 'header'; readonly name: string; readonly value: string }
  | { readonly type: 'eoh' }
  | { readonly type: 'body'; readonly chunk: Buffer }
  | { readonly type: 'eob'; readonly chunk: Buffer }
  | { readonly type: 'abort' }
  | { readonly type: 'quit' }
  | { readonly type: 'quit_nc' }
  | { readonly type: 'data' }
  | { readonly type: 'unknown'; readonly line: string };

/** NUL-terminated strings filling `data` exactly; a missing final NUL is an error. */
export function splitStrings(data: Buffer, what: string): string[] {
  if (data.length === 0) return [];
  if (data[data.length - 1] !== 0) throw new MilterFrameError(`${what}: missing NUL terminator`);
  const out: string[] = [];
  let start = 0;
  for (let i = 0; i < data.length; i++) {
    if (data[i] === 0) {
      out.push(data.toString('utf8', start, i));
      start = i + 1;
    }
  }
  return out;
}

function exactly(strings: string[], n: number, what: string): string[] {
  if (strings.length !== n) throw new MilterFrameError(`${what}: ${strings.length} strings, expected ${n}`);
  return strings;
}

function empty(p: MilterPacket, what: string): void {
  if (p.data.length !== 0) throw new MilterFrameError(`${what}: ${p.data.length} unexpected data bytes`);
}

/** A macro name as the MTA sends it (`{client_addr}` or `j`) → its bare name (`client_addr`, `j`). */
export function macroName(name: string): string {
  return name.length > 2 && name.startsWith('{') && name.endsWith('}') ? name.slice(1, -1) : name;
}

/** One packet → one typed command; throws MilterFrameError on anything malformed or unknown. */
export function decodeCommand(p: MilterPacket): MilterCommand {
  const d = p.data;
  switch (p.command) {
    case SMFIC.OPTNEG: {
      if (d.length < 12) throw new MilterFrameError(`OPTNEG: ${d.length} bytes, expected 12`);
      return { type: 'optneg', version: d.readUInt32BE(0), actions: d.readUInt32BE(4), protocol: d.readUInt32BE(8) };
    }
    case SMFIC.MACRO: {
      if (d.length < 1) throw new MilterFrameError('MACRO: no stage code');
      const stage = String.fromCharCode(d[0]!);
      const strings = splitStrings(d.subarray(1), 'MACRO');
      if (strings.length % 2 !== 0) throw new MilterFrameError('MACRO: a name without a value');
      const macros = new Map<string, string>();
      for (let i = 0; i < strings.length; i += 2) macros.set(macroName(strings[i]!), strings[i + 1]!);
      return { type: 'macro', stage, macros };
    }
    case SMFIC.CONNECT: {
      const nul = d.indexOf(0);
      if (nul < 0) throw new MilterFrameError('CONNECT: missing NUL terminator');
      const hostname = d.toString('utf8', 0, nul);
      if (d.length < nul + 2) throw new MilterFrameError('CONNECT: no family');
      const family = String.fromCharCode(d[nul + 1]!);
      if (family === 'U') {
        if (d.length !== nul + 2) throw new MilterFrameError('CONNECT: data after family U');
        return { type: 'connect', hostname, family, port: 0, address: '' };
      }
      if (family !== '4' && family !== '6' && family !== 'L') throw new MilterFrameError(`CONNECT: family ${JSON.stringify(family)}`);
      if (d.length < nul + 4) throw new MilterFrameError('CONNECT: no port');
      const port = d.readUInt16BE(nul + 2);
      const address = exactly(splitStrings(d.subarray(nul + 4), 'CONNECT'), 1, 'CONNECT address')[0]!;
      return { type: 'connect', hostname, family, port, address };
    }
    case SMFIC.HELO:
      return { type: 'helo', name: exactly(splitStrings(d, 'HELO'), 1, 'HELO')[0]! };
    case SMFIC.MAIL: {
      const args = splitStrings(d, 'MAIL');
      if (args.length < 1) throw new MilterFrameError('MAIL: no sender');
      return { type: 'mail', args };
    }
    case SMFIC.RCPT: {
      const args = splitStrings(d, 'RCPT');
      if (args.length < 1) throw new MilterFrameError('RCPT: no recipient');
      return { type: 'rcpt', args };
    }
    case SMFIC.HEADER: {
      const [name, value] = exactly(splitStrings(d, 'HEADER'), 2, 'HEADER');
      return { type: 'header', name: name!, value: value! };
    }
    case SMFIC.EOH:
      empty(p, 'EOH');
      return { type: 'eoh' };
    case SMFIC.BODY:
      return { type: 'body', chunk: d };
    case SMFIC.BODYEOB:
      return { type: 'eob', chunk: d };
    case SMFIC.ABORT:
      empty(p, 'ABORT');
      return { type: 'abort' };
    case SMFIC.QUIT:
      empty(p, 'QUIT');
      return { type: 'quit' };
    case SMFIC.QUIT_NC:
      empty(p, 'QUIT_NC');
      return { type: 'quit_nc' };
    case SMFIC.DATA:
      empty(p, 'DATA');
      return { type: 'data' };
    case SMFIC.UNKNOWN:
      return { type: 'unknown', line: exactly(splitStrings(d, 'UNKNOWN'), 1, 'UNKNOWN')[0]! };
    default:
      throw new MilterFrameError(`unknown command 0x${p.command.charCodeAt(0).toString(16)}`);
  }
}

// ---------------------------------------------------------------- encoding

/** One packet: length, command byte, data. */
export function encodePacket(command: string, data: Buffer = Buffer.alloc(0)): Buffer {
  const out = Buffer.alloc(5 + data.length);
  out.writeUInt32BE(1 + data.length, 0);
  out.write(command, 4, 'latin1');
  data.copy(out, 5);
  return out;
}

function cstring(s: string, what: string): Buffer {
  if (s.includes('\0')) throw new RangeError(`${what} contains NUL`);
  return Buffer.from(s + '\0', 'utf8');
}

function uint32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0, 0);
  return b;
}

export const encodeContinue = (): Buffer => encodePacket(SMFIR.CONTINUE);
export const encodeAccept = (): Buffer => encodePacket(SMFIR.ACCEPT);
export const encodeReject = (): Buffer => encodePacket(SMFIR.REJECT);
export const encodeTempfail = (): Buffer => encodePacket(SMFIR.TEMPFAIL);
export const encodeDiscard = (): Buffer => encodePacket(SMFIR.DISCARD);

const ENHANCED = /^([245])\.\d{1,3}\.\d{1,3}$/;

/**
 * SMFIR_REPLYCODE: "550 5.7.1 text\0". Text with several lines (split on \n) becomes a multi-line
 * reply, "550-5.7.1 one\r\n550 5.7.1 two". '%' is doubled: Sendmail uses the reply as a format
 * string and Postfix undoes the doubling (milter8.c). Without an enhanced code, X.0.0 of the
 * code's class (older Postfix refuses a reply without one). Throws RangeError for a code outside
 * 4xx/5xx, an enhanced code of another class, or CR/NUL in the text.
 */
export function encodeReplyCode(code: number, enhanced: string | undefined, text: string): Buffer {
  if (!Number.isInteger(code) || code < 400 || code > 599) throw new RangeError(`reply code ${code}: only 4xx and 5xx`);
  const klass = String(code)[0]!;
  if (enhanced !== undefined) {
    const m = ENHANCED.exec(enhanced);
    if (!m || m[1] !== klass) throw new RangeError(`enhanced code ${enhanced} does not match ${code}`);
  }
  if (/[\r\0]/.test(text)) throw new RangeError('reply text contains CR or NUL');
  // Older Postfix (milter8.c as of 2.11) refused a reply whose fifth byte is not the code's class;
  // Postfix 3.7 passes it on bare. Either way the client should get an enhanced code (RFC 3463):
  // a reply without one gets the class's generic X.0.0.
  const enh = enhanced ?? `${klass}.0.0`;
  const lines = text.split('\n');
  const body = lines
    .map((line, i) => `${code}${i === lines.length - 1 ? ' ' : '-'}${enh} ${line.replace(/%/g, '%%')}`)
    .join('\r\n');
  return encodePacket(SMFIR.REPLYCODE, cstring(body, 'reply'));
}

const HEADER_NAME = /^[\x21-\x39\x3b-\x7e]+$/;

function headerData(name: string, value: string): Buffer {
  if (!HEADER_NAME.test(name)) throw new RangeError(`header name ${JSON.stringify(name)}`);
  return Buffer.concat([cstring(name, 'header name'), cstring(value, 'header value')]);
}

/** SMFIR_ADDHEADER: name NUL value NUL — appended after the message's last header field. */
export function encodeAddHeader(name: string, value: string): Buffer {
  return encodePacket(SMFIR.ADDHEADER, headerData(name, value));
}

/** SMFIR_INSHEADER: uint32 index, name NUL, value NUL — index 0 is above the first header field. */
export function encodeInsHeader(index: number, name: string, value: string): Buffer {
  if (!Number.isInteger(index) || index < 0) throw new RangeError(`header index ${index}`);
  return encodePacket(SMFIR.INSHEADER, Buffer.concat([uint32(index), headerData(name, value)]));
}

/** SMFIR_CHGHEADER: uint32 index (1 = first field of that name), name, value; '' deletes it. */
export function encodeChgHeader(index: number, name: string, value: string): Buffer {
  if (!Number.isInteger(index) || index < 1) throw new RangeError(`header index ${index}`);
  return encodePacket(SMFIR.CHGHEADER, Buffer.concat([uint32(index), headerData(name, value)]));
}

/** Macros requested per stage, as names ("{client_addr}", "j"). */
export type MacroRequest = Partial<Record<MacroStage, readonly string[]>>;

/**
 * The macros doorman asks for: who the client is at connect, TLS at HELO, the login and queue id
 * at MAIL, the resolved recipient at RCPT, the queue id at end of header and of message.
 */
export const DOORMAN_MACROS: MacroRequest = {
  CONNECT: ['{client_addr}', '{client_port}', '{daemon_name}', 'j'],
  HELO: ['{tls_version}', '{cipher}'],
  ENVFROM: ['{auth_authen}', '{mail_addr}', 'i'],
  ENVRCPT: ['{rcpt_addr}'],
  EOH: ['i'],
  EOM: ['i'],
};

export interface OptNeg {
  readonly version: number;
  readonly actions: number;
  readonly protocol: number;
}

/**
 * SMFIR_OPTNEG: version, actions, protocol flags, then (SMFIF_SETSYMLIST, protocol 6) one
 * SETSYMLIST entry per stage: uint32 stage, space-separated macro names, NUL. libmilter and
 * Postfix carry the symbol lists in this reply, not in a packet of their own: the 'l' code names
 * the action, and this is its only place on the wire.
 */
export function encodeOptNeg(reply: OptNeg, macros: MacroRequest = {}): Buffer {
  const parts = [uint32(reply.version), uint32(reply.actions), uint32(reply.protocol)];
  if (reply.actions & SMFIF.SETSYMLIST) {
    for (const [stage, names] of Object.entries(macros) as [MacroStage, readonly string[]][]) {
      if (!names || names.length === 0) continue;
      for (const n of names) if (/[\s\0]/.test(n)) throw new RangeError(`macro name ${JSON.stringify(n)}`);
      parts.push(uint32(SMFIM[stage]), cstring(names.join(' '), 'macro list'));
    }
  }
  return encodePacket(SMFIR.OPTNEG, Buffer.concat(parts));
}

/** What doorman asks for: header additions and changes; the macro lists when the MTA allows them. */
export const DOORMAN_ACTIONS = SMFIF.ADDHDRS | SMFIF.CHGHDRS | SMFIF.SETSYMLIST;

/**
 * Steps doorman never wants (unknown SMTP commands) and steps it reads without answering
 * (each header field, each body chunk, unknown commands): the rules decide at end of header and
 * end of message, so a reply per header or chunk would only cost round trips.
 */
export const DOORMAN_PROTOCOL = SMFIP.NOUNKNOWN | SMFIP.NR_HDR | SMFIP.NR_BODY | SMFIP.NR_UNKN;

/**
 * The reply to the MTA's offer: version 6 (refused below 6: without it neither the NR_* flags
 * nor the symbol lists exist), the wanted actions and flags the MTA offers. Throws
 * MilterFrameError when the MTA cannot give what doorman needs (ADDHDRS).
 */
export function negotiate(offer: OptNeg, want: { actions: number; protocol: number } = { actions: DOORMAN_ACTIONS, protocol: DOORMAN_PROTOCOL }): OptNeg {
  if (offer.version < MILTER_VERSION) throw new MilterFrameError(`MTA offers milter protocol ${offer.version}, doorman needs ${MILTER_VERSION}`);
  if ((offer.actions & SMFIF.ADDHDRS) === 0) throw new MilterFrameError('MTA does not allow adding header fields');
  return { version: MILTER_VERSION, actions: want.actions & offer.actions, protocol: want.protocol & offer.protocol };
}
