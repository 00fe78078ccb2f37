import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { Framing, Unstuffer } from '../../src/smtp/framing.js';

const limits = { maxCommandLine: 512, extensionAllowance: 0, maxAuthLine: 12288, maxDataLine: 0, bareNewline: 'normalize' as const };

/** Client side: dot-stuff a message of CRLF lines and add the terminator. */
function stuffed(message: string): string {
  return message.replace(/^\./gm, '..') + '.\r\n';
}

/** The DATA chunks the framing emits for `wire` cut at `cuts`, through an Unstuffer. */
function throughFraming(wire: string, cuts: number[]): string {
  const f = new Framing(limits);
  f.beginData();
  const u = new Unstuffer();
  const out: Buffer[] = [];
  let from = 0;
  for (const at of [...cuts.filter((c) => c > 0 && c < wire.length).sort((a, b) => a - b), wire.length]) {
    f.push(Buffer.from(wire.slice(from, at), 'latin1'));
    from = at;
    for (let ev = f.nextData(); ev; ev = f.nextData()) {
      out.push(...u.push(ev.chunks));
      if (ev.end) return Buffer.concat(out).toString('latin1');
    }
  }
  throw new Error('no end of data');
}

test('a stuffing dot is removed at each line start, also when a chunk ends just before it', () => {
  const u = new Unstuffer();
  const parts = [Buffer.from('a\r\n'), Buffer.from('..b\r\n.'), Buffer.from('.c\r\n'), Buffer.from('d.e\r\n')];
  assert.equal(Buffer.concat(u.push(parts)).toString(), 'a\r\n.b\r\n.c\r\nd.e\r\n');
  assert.equal(u.length, Buffer.byteLength('a\r\n.b\r\n.c\r\nd.e\r\n'));
});

test('property: framing + unstuffing gives back the message the client stuffed, however the bytes are cut', () => {
  const line = fc.stringMatching(/^[.a-z ]{0,12}$/);
  fc.assert(
    fc.property(fc.array(line, { maxLength: 12 }), fc.array(fc.nat(200), { maxLength: 6 }), (lines, cuts) => {
      const message = lines.map((l) => `${l}\r\n`).join('');
      assert.equal(throughFraming(stuffed(message), cuts), message);
    }),
    { numRuns: 500 },
  );
});
