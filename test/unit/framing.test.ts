import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Framing, type FramingLimits } from '../../src/smtp/framing.js';

const LIMITS: FramingLimits = {
  maxCommandLine: 512,
  extensionAllowance: 512,
  maxAuthLine: 12288,
  maxDataLine: 1000,
  bareNewline: 'normalize',
};

/** Feeds `chunks` in DATA mode; returns what would reach the backend and what is left after. */
function runData(chunks: (string | Buffer)[], limits: Partial<FramingLimits> = {}) {
  const f = new Framing({ ...LIMITS, ...limits });
  f.beginData();
  const out: Buffer[] = [];
  let ended = false;
  for (const c of chunks) {
    f.push(typeof c === 'string' ? Buffer.from(c, 'latin1') : c);
    if (ended) continue;
    for (let ev = f.nextData(); ev && !ended; ev = f.inData ? f.nextData() : null) {
      out.push(...ev.chunks);
      if (ev.end) ended = true;
    }
  }
  const rest: string[] = [];
  if (ended) for (let ev = f.nextCommand(); ev; ev = f.nextCommand()) rest.push(ev.type === 'line' ? ev.line.toString() : ev.type);
  return { out: Buffer.concat(out).toString('latin1'), ended, rest, f };
}

function bytewise(s: string): string[] {
  return [...s];
}

test('end of data is CRLF.CRLF; pipelined commands after it stay in command mode', () => {
  const r = runData(['Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n']);
  assert.equal(r.out, 'Subject: x\r\n\r\nbody\r\n');
  assert.equal(r.ended, true);
  assert.deepEqual(r.rest, ['QUIT']);
});

test('an empty message: "." right after DATA', () => {
  const r = runData(['.\r\n']);
  assert.equal(r.out, '');
  assert.equal(r.ended, true);
});

test('dot-stuffing is kept byte for byte', () => {
  const body = 'a\r\n..\r\n..x\r\n...\r\n.y\r\n';
  const r = runData([body + '.\r\n']);
  assert.equal(r.out, body);
  assert.equal(r.f.bareNewline, false);
});

test('the same output whatever the chunk boundaries', () => {
  const msg = 'H: v\r\n\r\n..a\r\nb\r\n..\r\nlast\r\n.\r\nNOOP\r\n';
  const whole = runData([msg]);
  const split = runData(bytewise(msg));
  assert.equal(split.out, whole.out);
  assert.deepEqual(split.rest, ['NOOP']);
  for (let cut = 1; cut < msg.length; cut++) {
    const r = runData([msg.slice(0, cut), msg.slice(cut)]);
    assert.equal(r.out, whole.out, `cut at ${cut}`);
    assert.equal(r.ended, true);
  }
});

// SMTP smuggling (CVE-2023-51764 class): none of these may end the data, and what reaches the
// backend may not contain a CRLF.CRLF before the real end.
const SMUGGLE = ['\n.\n', '\r.\r', '\n.\r\n', '\r\n.\n', '\r.\r\n', '\r\n.\r', '\n..\n', '\r\n.\rX'];
for (const seq of SMUGGLE) {
  test(`normalize: ${JSON.stringify(seq)} inside data is not an end of data`, () => {
    const msg = `Subject: a\r\n\r\nfirst${seq}MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\nsmuggled\r\n.\r\nQUIT\r\n`;
    for (const chunks of [[msg], bytewise(msg)]) {
      const r = runData(chunks);
      assert.equal(r.ended, true);
      assert.deepEqual(r.rest, ['QUIT'], 'only the real end of data ends it');
      assert.equal(r.out.includes('\r\n.\r\n'), false, 'no end-of-data marker forwarded');
      assert.equal(/(^|[^\r])\n/.test(r.out), false, 'no bare LF forwarded');
      assert.equal(/\r(?!\n)/.test(r.out), false, 'no bare CR forwarded');
      assert.ok(r.out.includes('MAIL FROM:<evil@x>\r\n'), 'smuggled text stays message content');
      assert.equal(r.f.bareNewline, true);
    }
  });
}

test('normalize: a line that starts with "." after a bare LF gets stuffed', () => {
  const r = runData(['a\n.b\r\n.\r\n']);
  assert.equal(r.out, 'a\r\n..b\r\n');
});

test('reject: nothing after a bare LF is forwarded, and the flag is set', () => {
  const r = runData(['ok\r\nbad\n.\nMAIL FROM:<x>\r\n.\r\n'], { bareNewline: 'reject' });
  assert.equal(r.ended, true);
  assert.equal(r.f.bareNewline, true);
  assert.equal(r.out, 'ok\r\nbad');
});

test('data line limit: 998 octets + CRLF pass, 999 flag', () => {
  assert.equal(runData(['x'.repeat(998) + '\r\n.\r\n']).f.longLine, false);
  assert.equal(runData(['x'.repeat(999) + '\r\n.\r\n']).f.longLine, true);
  assert.equal(runData(['x'.repeat(5000) + '\r\n.\r\n'], { maxDataLine: 0 }).f.longLine, false);
});

test('dataBytes counts the client octets before the final dot', () => {
  const r = runData(['abc\r\n', '..d\r\n.', '\r\n']);
  assert.equal(r.f.dataBytes, 'abc\r\n..d\r\n'.length);
});

test('8-bit and NUL bytes pass untouched', () => {
  const body = Buffer.concat([Buffer.from('h: \xe9\r\n\r\n', 'latin1'), Buffer.from([0, 0xff, 0x80, 0x0d, 0x0a])]);
  const r = runData([body, '.\r\n']);
  assert.equal(Buffer.compare(Buffer.from(r.out, 'latin1'), body), 0);
});

function commands(input: string | string[], limits: Partial<FramingLimits> = {}) {
  const f = new Framing({ ...LIMITS, ...limits });
  const evs: string[] = [];
  for (const c of Array.isArray(input) ? input : [input]) {
    f.push(Buffer.from(c, 'latin1'));
    for (let ev = f.nextCommand(); ev; ev = f.nextCommand()) {
      evs.push(ev.type === 'line' ? `${ev.line.toString('latin1')}${ev.bareLf ? '<LF>' : ''}${ev.bareCr ? '<CR>' : ''}` : ev.type);
    }
  }
  return { evs, f };
}

test('command lines: CRLF, pipelined, bare LF and bare CR reported', () => {
  assert.deepEqual(commands('EHLO a\r\nMAIL FROM:<>\r\nNOOP\n').evs, ['EHLO a', 'MAIL FROM:<>', 'NOOP<LF>']);
  assert.deepEqual(commands('NOOP x\ry\r\n').evs, ['NOOP x\ry<CR>']);
  assert.deepEqual(commands(['EH', 'LO a\r', '\n']).evs, ['EHLO a']);
});

test('command lines: 512 octets with CRLF pass, 513 are too long, and the rest still parses', () => {
  const ok = 'NOOP ' + 'x'.repeat(505);
  assert.equal(ok.length + 2, 512);
  assert.deepEqual(commands(ok + '\r\n').evs, [ok]);
  assert.deepEqual(commands(ok + 'y\r\nQUIT\r\n').evs, ['too_long', 'QUIT']);
});

test('an endless line is never buffered: one too_long, then bytes dropped until LF', () => {
  const { evs, f } = commands(['x'.repeat(600), 'y'.repeat(100_000), 'z\r\nQUIT\r\n']);
  assert.deepEqual(evs, ['too_long', 'QUIT']);
  assert.equal(f.buffered, 0);
  const g = commands(['x'.repeat(100_000)]);
  assert.ok(g.f.buffered < 1024, `buffered ${g.f.buffered}`);
});

test('MAIL/RCPT get the extension allowance; AUTH gets the RFC 4954 limit', () => {
  const mail = 'MAIL FROM:<a@b> ' + 'X'.repeat(700);
  assert.deepEqual(commands(mail + '\r\n').evs, [mail]);
  const auth = 'AUTH PLAIN ' + 'A'.repeat(5000);
  assert.deepEqual(commands(auth + '\r\n').evs, [auth]);
  assert.deepEqual(commands('NOOP ' + 'X'.repeat(700) + '\r\n').evs, ['too_long']);
});

test('discard drops buffered plaintext (STARTTLS injection)', () => {
  const f = new Framing(LIMITS);
  f.push(Buffer.from('STARTTLS\r\nMAIL FROM:<evil>\r\n'));
  const ev = f.nextCommand();
  assert.equal(ev?.type, 'line');
  assert.equal(f.discard(), 'MAIL FROM:<evil>\r\n'.length);
  assert.equal(f.nextCommand(), null);
});

test('the stuffing dot does not count towards the 1000-octet line limit', () => {
  assert.equal(runData(['..' + 'y'.repeat(997) + '\r\n.\r\n']).f.longLine, false);
  assert.equal(runData(['..' + 'y'.repeat(998) + '\r\n.\r\n']).f.longLine, true);
});
