import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  DOORMAN_MACROS,
  MILTER_MAX_PACKET,
  MilterFrameError,
  MilterParser,
  SMFIF,
  SMFIP,
  decodeCommand,
  encodeAccept,
  encodeAddHeader,
  encodeChgHeader,
  encodeContinue,
  encodeDiscard,
  encodeInsHeader,
  encodeOptNeg,
  encodePacket,
  encodeReject,
  encodeReplyCode,
  encodeTempfail,
  negotiate,
  type MilterCommand,
} from '../../src/fronts/milter/codec.js';

/** Bytes from a hex string with spaces, or latin1 text between quotes mixed in. */
const hex = (s: string) => Buffer.from(s.replace(/\s+/g, ''), 'hex');
const bin = (...parts: (string | Buffer)[]) => Buffer.concat(parts.map((p) => (typeof p === 'string' ? Buffer.from(p, 'latin1') : p)));

/** A packet with its length computed, for the malformed cases. */
function pkt(...parts: (string | Buffer)[]): Buffer {
  const d = bin(...parts);
  const len = Buffer.alloc(4);
  len.writeUInt32BE(d.length);
  return Buffer.concat([len, d]);
}

function decode(bytes: Buffer): MilterCommand {
  const packets = new MilterParser().push(bytes);
  assert.equal(packets.length, 1);
  return decodeCommand(packets[0]!);
}

test('parser: one packet, several in a chunk, a packet split at every byte', () => {
  const a = bin(hex('00000001'), 'N');
  const helo = bin(hex('00000005'), 'H', 'mx.\0');
  assert.deepEqual(new MilterParser().push(a), [{ command: 'N', data: Buffer.alloc(0) }]);
  const both = new MilterParser().push(Buffer.concat([a, helo]));
  assert.deepEqual(both.map((p) => [p.command, p.data.toString('latin1')]), [['N', ''], ['H', 'mx.\0']]);
  const stream = Buffer.concat([helo, a, helo]);
  const p = new MilterParser();
  const got: string[] = [];
  for (const byte of stream) for (const pk of p.push(Buffer.from([byte]))) got.push(pk.command + pk.data.toString('latin1'));
  assert.deepEqual(got, ['Hmx.\0', 'N', 'Hmx.\0']);
  assert.equal(p.buffered, 0);
  // A half packet stays buffered until its end arrives.
  const q = new MilterParser();
  assert.deepEqual(q.push(helo.subarray(0, 7)), []);
  assert.equal(q.buffered, 7);
  assert.equal(q.push(helo.subarray(7))[0]!.command, 'H');
});

test('parser: a length of 0 or over the maximum is an error', () => {
  assert.throws(() => new MilterParser().push(hex('00000000')), MilterFrameError);
  const over = Buffer.alloc(4);
  over.writeUInt32BE(MILTER_MAX_PACKET + 1);
  assert.throws(() => new MilterParser().push(over), /over/);
  assert.throws(() => new MilterParser(16).push(hex('00000011')), /17 over 16/);
  // Exactly the maximum is accepted.
  const max = Buffer.concat([hex('00000010'), Buffer.from('B'), Buffer.alloc(15, 0x61)]);
  assert.equal(new MilterParser(16).push(max)[0]!.data.length, 15);
});

test('OPTNEG as Postfix 3.7 sends it', () => {
  // version 6, actions 0x1ff, protocol 0x1fffff
  const cmd = decode(bin(hex('0000000d'), 'O', hex('00000006 000001ff 001fffff')));
  assert.deepEqual(cmd, { type: 'optneg', version: 6, actions: 0x1ff, protocol: 0x1fffff });
  assert.throws(() => decode(pkt('O', hex('00000006 000001ff'))), /OPTNEG/);
});

test('MACRO: stage code and name/value pairs, braces removed', () => {
  const cmd = decode(bin(hex('00000027'), 'D', 'C', 'j\0mx.example\0{client_addr}\x00192.0.2.1\0'));
  assert.equal(cmd.type, 'macro');
  if (cmd.type !== 'macro') return;
  assert.equal(cmd.stage, 'C');
  assert.deepEqual([...cmd.macros], [['j', 'mx.example'], ['client_addr', '192.0.2.1']]);
  assert.deepEqual(decode(bin(hex('00000002'), 'D', 'M')), { type: 'macro', stage: 'M', macros: new Map() });
  assert.throws(() => decode(pkt('D', 'C', 'j\0')), /without a value/);
  assert.throws(() => decode(pkt('D', 'C', 'jx')), /NUL/);
  assert.throws(() => decode(pkt('D')), /stage/);
});

test('CONNECT: IPv4, IPv6, unix socket, unknown', () => {
  assert.deepEqual(decode(bin(hex('0000001b'), 'C', 'mail.example\0', '4', hex('04d2'), '192.0.2.1\0')), {
    type: 'connect', hostname: 'mail.example', family: '4', port: 1234, address: '192.0.2.1',
  });
  const v6 = bin('C', '[2001:db8::1]\0', '6', hex('0019'), '2001:db8::1\0');
  assert.deepEqual(decode(bin(hex(v6.length.toString(16).padStart(8, '0')), v6)), {
    type: 'connect', hostname: '[2001:db8::1]', family: '6', port: 25, address: '2001:db8::1',
  });
  const unix = bin('C', 'localhost\0', 'L', hex('0000'), '/run/s\0');
  assert.deepEqual(decode(bin(hex(unix.length.toString(16).padStart(8, '0')), unix)), {
    type: 'connect', hostname: 'localhost', family: 'L', port: 0, address: '/run/s',
  });
  assert.deepEqual(decode(bin(hex('0000000a'), 'C', 'unknown\0', 'U')), { type: 'connect', hostname: 'unknown', family: 'U', port: 0, address: '' });
  assert.throws(() => decode(pkt('C', 'unknown\0', 'X')), /family/);
  assert.throws(() => decode(pkt('C', 'unknown\0')), /no family/);
  assert.throws(() => decode(pkt('C', 'unknown\0', '4', hex('00'))), /no port/);
  assert.throws(() => decode(pkt('C', 'h\0', '4', hex('0019'), '1.2.3.4')), /NUL/);
});

test('HELO, MAIL, RCPT, HEADER, UNKNOWN strings', () => {
  assert.deepEqual(decode(bin(hex('0000000c'), 'H', 'mx.example\0')), { type: 'helo', name: 'mx.example' });
  assert.deepEqual(decode(bin(hex('00000028'), 'M', '<a@example.com>\0', 'SIZE=100\0', 'BODY=8BITMIME\0')), {
    type: 'mail', args: ['<a@example.com>', 'SIZE=100', 'BODY=8BITMIME'],
  });
  assert.deepEqual(decode(bin(hex('00000004'), 'M', '<>\0')), { type: 'mail', args: ['<>'] });
  assert.deepEqual(decode(bin(hex('00000011'), 'R', '<b@example.com>\0')), { type: 'rcpt', args: ['<b@example.com>'] });
  assert.deepEqual(decode(bin(hex('00000012'), 'L', 'Subject\0', 'hi there\0')), { type: 'header', name: 'Subject', value: 'hi there' });
  assert.deepEqual(decode(bin(hex('0000000a'), 'U', 'XFOO bar\0')), { type: 'unknown', line: 'XFOO bar' });
  assert.throws(() => decode(pkt('L', 'Subject\0')), /1 strings, expected 2/);
  assert.throws(() => decode(pkt('M')), /no sender/);
  assert.throws(() => decode(pkt('R')), /no recipient/);
  assert.throws(() => decode(pkt('H', 'a\0b')), /NUL/);
});

test('BODY, BODYEOB keep bytes; EOH, ABORT, QUIT, QUIT_NC, DATA carry none', () => {
  const body = Buffer.from([0, 1, 0xff, 13, 10]);
  assert.deepEqual(decode(bin(hex('00000006'), 'B', body)), { type: 'body', chunk: body });
  assert.deepEqual(decode(bin(hex('00000001'), 'E')), { type: 'eob', chunk: Buffer.alloc(0) });
  for (const [c, type] of [['N', 'eoh'], ['A', 'abort'], ['Q', 'quit'], ['K', 'quit_nc'], ['T', 'data']] as const) {
    assert.deepEqual(decode(bin(hex('00000001'), c)), { type });
    assert.throws(() => decode(pkt(c, 'x')), /unexpected data/);
  }
  assert.throws(() => decode(pkt('Z')), /unknown command 0x5a/);
});

test('simple replies byte for byte', () => {
  assert.deepEqual(encodeContinue(), hex('00000001 63'));
  assert.deepEqual(encodeAccept(), hex('00000001 61'));
  assert.deepEqual(encodeReject(), hex('00000001 72'));
  assert.deepEqual(encodeTempfail(), hex('00000001 74'));
  assert.deepEqual(encodeDiscard(), hex('00000001 64'));
  assert.deepEqual(encodePacket('p'), hex('00000001 70'));
});

test('REPLYCODE: single line, multi-line, % doubled, X.0.0 when no enhanced code, bad codes refused', () => {
  assert.deepEqual(encodeReplyCode(550, '5.7.1', 'No thanks'), bin(hex('00000015'), 'y', '550 5.7.1 No thanks\0'));
  // Older Postfix checks that byte 5 repeats the class: an enhanced code is always sent.
  assert.deepEqual(encodeReplyCode(451, undefined, 'Later'), bin(hex('00000011'), 'y', '451 4.0.0 Later\0'));
  assert.deepEqual(encodeReplyCode(550, '5.7.1', 'one\ntwo'), bin(hex('0000001e'), 'y', '550-5.7.1 one\r\n550 5.7.1 two\0'));
  assert.deepEqual(encodeReplyCode(550, '5.7.1', '100% spam'), bin(hex('00000016'), 'y', '550 5.7.1 100%% spam\0'));
  assert.throws(() => encodeReplyCode(250, '2.0.0', 'ok'), /4xx and 5xx/);
  assert.throws(() => encodeReplyCode(550, '4.7.1', 'x'), /does not match/);
  assert.throws(() => encodeReplyCode(550, '5.7', 'x'), /does not match/);
  assert.throws(() => encodeReplyCode(550, '5.7.1', 'a\r\nb'), /CR/);
  assert.throws(() => encodeReplyCode(550, '5.7.1', 'a\0b'), /NUL/);
});

test('ADDHEADER, INSHEADER, CHGHEADER byte for byte', () => {
  assert.deepEqual(encodeAddHeader('X-Doorman-Tag', 'spam'), bin(hex('00000014'), 'h', 'X-Doorman-Tag\0spam\0'));
  assert.deepEqual(
    encodeInsHeader(0, 'Authentication-Results', 'mx.example; spf=pass'),
    bin(hex('00000031'), 'i', hex('00000000'), 'Authentication-Results\0mx.example; spf=pass\0'),
  );
  assert.deepEqual(encodeChgHeader(2, 'Authentication-Results', ''), bin(hex('0000001d'), 'm', hex('00000002'), 'Authentication-Results\0\0'));
  assert.throws(() => encodeAddHeader('Bad Name', 'v'), /header name/);
  assert.throws(() => encodeAddHeader('Bad:Name', 'v'), /header name/);
  assert.throws(() => encodeAddHeader('X', 'a\0b'), /NUL/);
  assert.throws(() => encodeInsHeader(-1, 'X', 'v'), /index/);
  assert.throws(() => encodeChgHeader(0, 'X', 'v'), /index/);
});

test('OPTNEG reply: version, actions, flags, then the symbol lists per stage', () => {
  const reply = encodeOptNeg({ version: 6, actions: SMFIF.ADDHDRS | SMFIF.SETSYMLIST, protocol: SMFIP.NR_HDR }, {
    CONNECT: ['{client_addr}', 'j'],
    EOM: ['i'],
  });
  assert.deepEqual(
    reply,
    bin(hex('00000027'), 'O', hex('00000006 00000101 00000080'), hex('00000000'), '{client_addr} j\0', hex('00000005'), 'i\0'),
  );
  // Without SMFIF_SETSYMLIST the lists are left out.
  assert.deepEqual(encodeOptNeg({ version: 6, actions: 1, protocol: 0 }, { CONNECT: ['j'] }), bin(hex('0000000d'), 'O', hex('00000006 00000001 00000000')));
  // doorman's lists: every stage code once, in the order given.
  const full = encodeOptNeg({ version: 6, actions: SMFIF.SETSYMLIST, protocol: 0 }, DOORMAN_MACROS);
  const text = full.subarray(17).toString('latin1');
  assert.match(text, /\{client_addr\} \{client_port\} \{daemon_name\} j\0/);
  assert.match(text, /\{tls_version\} \{cipher\}\0/);
  assert.match(text, /\{auth_authen\} \{mail_addr\} i\0/);
  assert.equal(full.readUInt32BE(0), full.length - 4);
});

test('negotiate: only what the MTA offers; refuses old versions and no ADDHDRS', () => {
  const pf = { version: 6, actions: 0x1ff, protocol: 0x1fffff };
  const r = negotiate(pf);
  assert.equal(r.version, 6);
  assert.equal(r.actions, SMFIF.ADDHDRS | SMFIF.CHGHDRS | SMFIF.SETSYMLIST);
  assert.equal(r.protocol, SMFIP.NOUNKNOWN | SMFIP.NR_HDR | SMFIP.NR_BODY | SMFIP.NR_UNKN);
  // An MTA without NR_BODY or SETSYMLIST: those bits are not asked for.
  const r2 = negotiate({ version: 6, actions: 0x1f, protocol: 0x1ff });
  assert.equal(r2.actions, SMFIF.ADDHDRS | SMFIF.CHGHDRS);
  assert.equal(r2.protocol, SMFIP.NOUNKNOWN | SMFIP.NR_HDR);
  assert.throws(() => negotiate({ version: 2, actions: 0x1f, protocol: 0x7f }), /protocol 2/);
  assert.throws(() => negotiate({ version: 6, actions: 0x10, protocol: 0x7f }), /adding header/);
});
