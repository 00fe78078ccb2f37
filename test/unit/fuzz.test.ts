/**
 * Property-based tests and a bounded fuzzing run (fast-check) over the framing and the command
 * parsers: whatever bytes arrive, in whatever pieces, nothing throws, nothing is buffered without
 * bound, the end of data is found only at CRLF.CRLF, and what goes to the backend never holds a
 * bare CR or LF nor a CRLF.CRLF of its own.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { Framing, type FramingLimits } from '../../src/smtp/framing.js';
import { parseCommand } from '../../src/smtp/commands.js';
import { parseMailRcpt } from '../../src/protocol/params.js';
import { parsePath } from '../../src/protocol/address.js';
import { parseProxyHeader } from '../../src/backend/proxy-protocol.js';

const LIMITS: FramingLimits = { maxCommandLine: 512, extensionAllowance: 512, maxAuthLine: 12288, maxDataLine: 1000, bareNewline: 'normalize' };

/** Bytes that make SMTP framing interesting: CR, LF, dots, letters, NUL, 8-bit. */
const smtpByte = fc.constantFrom(0x0d, 0x0a, 0x2e, 0x41, 0x20, 0x00, 0xff, 0x3a, 0x3c, 0x3e, 0x40);
const smtpBytes = (max: number) => fc.array(smtpByte, { maxLength: max }).map((a) => Buffer.from(a));

/** Cuts a buffer into pieces at the given points. */
function cut(buf: Buffer, points: number[]): Buffer[] {
  const at = [...new Set(points.map((p) => p % (buf.length + 1)))].sort((a, b) => a - b);
  const out: Buffer[] = [];
  let from = 0;
  for (const p of at) {
    out.push(buf.subarray(from, p));
    from = p;
  }
  out.push(buf.subarray(from));
  return out.filter((b) => b.length);
}

function runData(pieces: Buffer[]) {
  const f = new Framing(LIMITS);
  f.beginData();
  const out: Buffer[] = [];
  let ended = false;
  for (const p of pieces) {
    f.push(p);
    if (ended) continue;
    for (let ev = f.nextData(); ev && !ended; ev = f.inData ? f.nextData() : null) {
      out.push(...ev.chunks);
      ended = ev.end;
    }
  }
  return { out: Buffer.concat(out), ended, f };
}

test('DATA: the output does not depend on how the bytes were cut', () => {
  fc.assert(
    fc.property(smtpBytes(300), fc.array(fc.nat(), { maxLength: 12 }), (body, points) => {
      const whole = runData([body]);
      const pieces = runData(cut(body, points));
      assert.equal(pieces.ended, whole.ended);
      assert.ok(pieces.out.equals(whole.out));
    }),
    { numRuns: 3000 },
  );
});

test('DATA: the backend never sees a bare CR/LF or an early CRLF.CRLF (normalize)', () => {
  fc.assert(
    fc.property(smtpBytes(400), (body) => {
      const msg = Buffer.concat([body, Buffer.from('\r\n.\r\n')]);
      const { out, ended } = runData([msg]);
      assert.equal(ended, true, 'the final CRLF.CRLF always ends the data');
      const s = out.toString('latin1');
      assert.equal(/\r(?!\n)|(?<!\r)\n/.test(s), false, 'no bare CR or LF forwarded');
      assert.equal(('\r\n' + s).includes('\r\n.\r\n'), false, 'no end-of-data marker inside');
    }),
    { numRuns: 3000 },
  );
});

test('commands: bounded buffering, never a throw, whatever the input', () => {
  fc.assert(
    fc.property(fc.array(smtpBytes(1200), { maxLength: 6 }), (pieces) => {
      const f = new Framing(LIMITS);
      for (const p of pieces) {
        f.push(p);
        for (let ev = f.nextCommand(); ev; ev = f.nextCommand()) {
          if (ev.type === 'line') {
            assert.ok(ev.line.length <= 1024);
            const c = parseCommand(ev.line);
            parseMailRcpt(c.arg, 'FROM');
            parseMailRcpt(c.arg, 'TO');
          }
        }
        assert.ok(f.buffered <= 1024 + 1200, `buffered ${f.buffered}`);
      }
    }),
    { numRuns: 2000 },
  );
});

test('fuzz: mutated SMTP transcripts through the parsers (bounded run)', () => {
  const seeds = ['MAIL FROM:<a@b.example> SIZE=10', 'RCPT TO:<"x y"@[IPv6:::1]>', 'RCPT TO:<@a,@b:c@d.example>', 'EHLO [127.0.0.1]', 'AUTH PLAIN AGEAYg=='];
  const mutated = fc.tuple(fc.constantFrom(...seeds), fc.array(fc.tuple(fc.nat(60), fc.integer({ min: 0, max: 255 })), { maxLength: 8 })).map(([seed, edits]) => {
    const b = Buffer.from(seed, 'latin1');
    for (const [pos, byte] of edits) if (b.length) b[pos % b.length] = byte;
    return b;
  });
  fc.assert(
    fc.property(mutated, (line) => {
      const c = parseCommand(line);
      const r = parseMailRcpt(c.arg, c.verb === 'RCPT' ? 'TO' : 'FROM');
      if (r.ok) assert.equal(/[\r\n\0]/.test(r.path.raw), false, 'a parsed path never carries CR, LF or NUL');
      parsePath(c.arg);
      parseProxyHeader(line);
    }),
    { numRuns: 20_000 },
  );
});
