/**
 * The milter state machine over a real socket pair on 127.0.0.1: the MTA's side writes byte
 * sequences as Postfix sends them, and the replies are read back as packets.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { MilterParser, type MilterPacket } from '../../src/fronts/milter/codec.js';
import {
  serveMilter,
  type EomResult,
  type MilterEnd,
  type MilterHandler,
  type MilterMacros,
  type MilterServerOptions,
  type MilterVerdict,
} from '../../src/fronts/milter/server.js';

const u32 = (n: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
};
const bin = (...parts: (string | Buffer)[]) => Buffer.concat(parts.map((p) => (typeof p === 'string' ? Buffer.from(p, 'latin1') : p)));
const pkt = (cmd: string, ...parts: (string | Buffer)[]) => {
  const d = bin(...parts);
  return bin(u32(d.length + 1), cmd, d);
};

/** Postfix 3.7's offer: version 6, every action, every protocol flag it knows. */
const OPTNEG = pkt('O', u32(6), u32(0x1ff), u32(0x1fffff));
const port = Buffer.from([0x30, 0x39]); // 12345
const CONNECT = bin(
  pkt('D', 'C', '{client_addr}\0', '192.0.2.7\0', '{client_port}\0', '12345\0', 'j\0', 'mx.example\0'),
  pkt('C', 'client.example\0', '4', port, '192.0.2.7\0'),
);
const HELO = bin(pkt('D', 'H', '{tls_version}\0', 'TLSv1.3\0'), pkt('H', 'client.example\0'));
const MAIL = (sender: string) => bin(pkt('D', 'M', 'i\0', 'ABC123\0', '{auth_authen}\0', 'alice\0'), pkt('M', `<${sender}>\0`, 'SIZE=42\0'));
const RCPT = (r: string) => bin(pkt('D', 'R', '{rcpt_addr}\0', `${r}\0`), pkt('R', `<${r}>\0`));
const CONTENT = bin(
  pkt('T'),
  pkt('L', 'From\0', 'a@example.org\0'),
  pkt('L', 'Subject\0', 'hello\0'),
  pkt('N'),
  pkt('B', 'line one\r\n'),
  pkt('B', 'line two\r\n'),
  pkt('D', 'E', 'i\0', 'ABC123\0'),
  pkt('E'),
);

/** A handler recording each call; RCPT to `bad@…` refused, headers added at end of message. */
class Recorder implements MilterHandler {
  calls: string[] = [];
  bodyText = '';
  closed = 0;
  constructor(private readonly overrides: Partial<MilterHandler> = {}) {}
  private ok(what: string): Promise<MilterVerdict> {
    this.calls.push(what);
    return Promise.resolve({ kind: 'continue' });
  }
  connect(info: { hostname: string; address: string; port: number; family: string }, m: MilterMacros) {
    return this.overrides.connect?.(info as never, m) ?? this.ok(`connect ${info.hostname} ${info.family} ${info.address}:${info.port} j=${m.get('j')} client_addr=${m.get('{client_addr}')}`);
  }
  helo(name: string, m: MilterMacros) {
    return this.ok(`helo ${name} tls=${m.get('tls_version')}`);
  }
  mail(sender: string, args: readonly string[], m: MilterMacros) {
    return this.overrides.mail?.(sender, args, m) ?? this.ok(`mail ${sender} ${args.join(',')} i=${m.get('i')} auth=${m.get('auth_authen')}`);
  }
  rcpt(r: string, args: readonly string[], m: MilterMacros) {
    if (this.overrides.rcpt) return this.overrides.rcpt(r, args, m);
    if (r.startsWith('<bad@')) {
      this.calls.push(`rcpt ${r} refused`);
      return Promise.resolve<MilterVerdict>({ kind: 'reject', code: 550, enhanced: '5.7.1', text: 'Recipient refused' });
    }
    return this.ok(`rcpt ${r} rcpt_addr=${m.get('rcpt_addr')} i=${m.get('i')}`);
  }
  data() {
    return this.ok('data');
  }
  header(name: string, value: string) {
    this.calls.push(`header ${name}: ${value}`);
  }
  eoh() {
    return this.ok('eoh');
  }
  body(c: Buffer) {
    this.bodyText += c.toString('latin1');
  }
  eom(m: MilterMacros): Promise<EomResult> {
    if (this.overrides.eom) return this.overrides.eom(m);
    this.calls.push(`eom i=${m.get('i')} body=${JSON.stringify(this.bodyText)}`);
    return Promise.resolve({
      verdict: { kind: 'continue' },
      addHeaders: [
        { name: 'Authentication-Results', value: 'mx.example; spf=pass', index: 0 },
        { name: 'X-Doorman-Tag', value: 'bulk' },
      ],
    });
  }
  abort() {
    this.calls.push('abort');
    this.bodyText = '';
  }
  close() {
    this.closed++;
    this.calls.push('close');
  }
}

interface Rig {
  /** Writes bytes (optionally one byte per write), waits for `n` reply packets. */
  send(bytes: Buffer, n: number, oneByteAtATime?: boolean): Promise<MilterPacket[]>;
  end: Promise<MilterEnd>;
  closed: Promise<void>;
  handlers: Recorder[];
  stop(): Promise<void>;
}

async function rig(opts: Partial<MilterServerOptions> = {}, make: () => Recorder = () => new Recorder()): Promise<Rig> {
  const handlers: Recorder[] = [];
  let resolveEnd!: (e: MilterEnd) => void;
  const end = new Promise<MilterEnd>((r) => (resolveEnd = r));
  const server = net.createServer((s) => {
    void serveMilter(s, () => {
      const h = make();
      handlers.push(h);
      return h;
    }, opts).done.then(resolveEnd);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const client = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
  await new Promise<void>((r) => client.once('connect', r));
  const parser = new MilterParser();
  const got: MilterPacket[] = [];
  let waiter: (() => void) | null = null;
  client.on('data', (c) => {
    got.push(...parser.push(c));
    waiter?.();
  });
  const closed = new Promise<void>((r) => client.once('close', () => r()));
  client.on('error', () => {});
  return {
    handlers,
    end,
    closed,
    async send(bytes, n, oneByte = false) {
      if (oneByte) for (const b of bytes) client.write(Buffer.from([b]));
      else client.write(bytes);
      const deadline = Date.now() + 3000;
      while (got.length < n) {
        if (Date.now() > deadline) throw new Error(`timeout: ${got.length} of ${n} replies`);
        await new Promise<void>((r) => {
          waiter = r;
          setTimeout(r, 50);
        });
      }
      // Nothing more than expected: give a stray reply the chance to show up.
      await new Promise((r) => setTimeout(r, 30));
      return got.splice(0, got.length);
    },
    async stop() {
      client.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

const show = (ps: MilterPacket[]) => ps.map((p) => p.command + p.data.toString('latin1'));

test('a Postfix session: negotiation, two messages, a refused recipient, headers at end of message', async () => {
  const r = await rig();
  try {
    const [opt] = await r.send(OPTNEG, 1);
    assert.equal(opt!.command, 'O');
    // version 6, ADDHDRS|CHGHDRS|SETSYMLIST, NOUNKNOWN|NR_HDR|NR_BODY|NR_UNKN
    assert.deepEqual(opt!.data.subarray(0, 12), bin(u32(6), u32(0x111), u32(0x20000 | 0x80000 | 0x100 | 0x80)));
    assert.deepEqual(
      opt!.data.subarray(12),
      bin(
        u32(0), '{client_addr} {client_port} {daemon_name} j\0',
        u32(1), '{tls_version} {cipher}\0',
        u32(2), '{auth_authen} {mail_addr} i\0',
        u32(3), '{rcpt_addr}\0',
        u32(6), 'i\0',
        u32(5), 'i\0',
      ),
    );
    assert.deepEqual(show(await r.send(CONNECT, 1)), ['c']);
    assert.deepEqual(show(await r.send(HELO, 1)), ['c']);
    assert.deepEqual(show(await r.send(MAIL('a@example.org'), 1)), ['c']);
    assert.deepEqual(show(await r.send(RCPT('bad@example.com'), 1)), ['y550 5.7.1 Recipient refused\0']);
    assert.deepEqual(show(await r.send(RCPT('good@example.com'), 1)), ['c']);
    // DATA, EOH, EOM answered; the two headers and two body chunks not.
    assert.deepEqual(show(await r.send(CONTENT, 5)), [
      'c',
      'c',
      'i\0\0\0\0Authentication-Results\0mx.example; spf=pass\0',
      'hX-Doorman-Tag\0bulk\0',
      'c',
    ]);
    // Postfix ends each message with ABORT (no reply); a second message follows.
    assert.deepEqual(show(await r.send(bin(pkt('A'), MAIL('b@example.org')), 1)), ['c']);
    assert.deepEqual(show(await r.send(pkt('Q'), 0)), []);
    await r.closed;
    assert.equal(await r.end, 'quit');
    assert.equal(r.handlers.length, 1);
    assert.deepEqual(r.handlers[0]!.calls, [
      'connect client.example 4 192.0.2.7:12345 j=mx.example client_addr=192.0.2.7',
      'helo client.example tls=TLSv1.3',
      'mail <a@example.org> SIZE=42 i=ABC123 auth=alice',
      'rcpt <bad@example.com> refused',
      'rcpt <good@example.com> rcpt_addr=good@example.com i=ABC123',
      'data',
      'header From: a@example.org',
      'header Subject: hello',
      'eoh',
      'eom i=ABC123 body="line one\\r\\nline two\\r\\n"',
      'abort',
      'mail <b@example.org> SIZE=42 i=ABC123 auth=alice',
      'close',
    ]);
  } finally {
    await r.stop();
  }
});

test('the same bytes written one at a time give the same replies', async () => {
  const r = await rig();
  try {
    const all = bin(OPTNEG, CONNECT, HELO, MAIL('a@example.org'), RCPT('bad@example.com'), RCPT('ok@example.com'), CONTENT);
    const replies = show(await r.send(all, 11, true));
    assert.equal(replies[0]![0], 'O');
    assert.deepEqual(replies.slice(1), ['c', 'c', 'c', 'y550 5.7.1 Recipient refused\0', 'c', 'c', 'c', 'i\0\0\0\0Authentication-Results\0mx.example; spf=pass\0', 'hX-Doorman-Tag\0bulk\0', 'c']);
  } finally {
    await r.stop();
  }
});

test('macros of an aborted message are forgotten; the connection ones stay', async () => {
  let seen: string[] = [];
  const r = await rig({}, () => new Recorder({
    mail: (s, _a, m) => {
      seen.push(`${s} i=${m.get('i')} addr=${m.get('client_addr')}`);
      return Promise.resolve({ kind: 'continue' });
    },
  }));
  try {
    await r.send(bin(OPTNEG, CONNECT, HELO, MAIL('a@example.org')), 4);
    await r.send(bin(pkt('A'), pkt('M', '<b@example.org>\0')), 1);
    assert.deepEqual(seen, ['<a@example.org> i=ABC123 addr=192.0.2.7', '<b@example.org> i=undefined addr=192.0.2.7']);
    seen = [];
  } finally {
    await r.stop();
  }
});

test('a handler that throws or hangs gets the step a tempfail; the session goes on', async () => {
  const r = await rig({ stepTimeoutMs: 100 }, () => new Recorder({
    mail: () => Promise.reject(new Error('store down')),
    rcpt: () => new Promise<MilterVerdict>(() => {}),
  }));
  try {
    await r.send(bin(OPTNEG, CONNECT, HELO), 3);
    assert.deepEqual(show(await r.send(MAIL('a@example.org'), 1)), ['t']);
    const t0 = Date.now();
    assert.deepEqual(show(await r.send(RCPT('x@example.com'), 1)), ['t']);
    assert.ok(Date.now() - t0 >= 90);
    assert.deepEqual(show(await r.send(pkt('A'), 0)), []);
    assert.deepEqual(show(await r.send(HELO, 1)), ['c']);
  } finally {
    await r.stop();
  }
});

test('tempfail with text and a verdict the protocol cannot carry', async () => {
  const r = await rig({}, () => new Recorder({
    mail: () => Promise.resolve({ kind: 'tempfail', code: 451, enhanced: '4.7.1', text: 'Rate limit, try later' }),
    rcpt: () => Promise.resolve({ kind: 'reject', code: 250, text: 'not a refusal' }),
  }));
  try {
    await r.send(bin(OPTNEG, CONNECT), 2);
    assert.deepEqual(show(await r.send(MAIL('a@example.org'), 1)), ['y451 4.7.1 Rate limit, try later\0']);
    assert.deepEqual(show(await r.send(RCPT('x@example.com'), 1)), ['t']);
  } finally {
    await r.stop();
  }
});

test('a refused message at end of message gets no header changes', async () => {
  const r = await rig({}, () => new Recorder({
    eom: () => Promise.resolve({
      verdict: { kind: 'reject', code: 554, enhanced: '5.7.1', text: 'Content refused' },
      addHeaders: [{ name: 'X-Doorman-Tag', value: 'spam' }],
    }),
  }));
  try {
    await r.send(bin(OPTNEG, CONNECT, HELO, MAIL('a@example.org'), RCPT('ok@example.com')), 5);
    assert.deepEqual(show(await r.send(CONTENT, 3)), ['c', 'c', 'y554 5.7.1 Content refused\0']);
  } finally {
    await r.stop();
  }
});

test('an MTA without the no-reply flags gets a continue per header and body chunk', async () => {
  const r = await rig();
  try {
    // Protocol flags of version 2 only (0x7f): no NR_*, no NOUNKNOWN.
    const [opt] = await r.send(pkt('O', u32(6), u32(0x1ff), u32(0x7f)), 1);
    assert.equal(opt!.data.readUInt32BE(8), 0);
    await r.send(bin(CONNECT, HELO, MAIL('a@example.org'), RCPT('ok@example.com')), 4);
    // data, 2 headers, eoh, 2 body chunks, then ins + add + continue
    assert.deepEqual(show(await r.send(CONTENT, 9)).map((s) => s[0]), ['c', 'c', 'c', 'c', 'c', 'c', 'i', 'h', 'c']);
    assert.deepEqual(show(await r.send(pkt('U', 'XFOO\0'), 1)), ['c']);
  } finally {
    await r.stop();
  }
});

test('QUIT_NC ends the session, keeps the connection, and a new handler serves the next', async () => {
  const r = await rig();
  try {
    await r.send(bin(OPTNEG, CONNECT, HELO), 3);
    assert.deepEqual(show(await r.send(bin(pkt('K'), CONNECT), 1)), ['c']);
    assert.equal(r.handlers.length, 2);
    assert.equal(r.handlers[0]!.closed, 1);
    assert.equal(r.handlers[1]!.closed, 0);
    await r.send(pkt('Q'), 0);
    assert.equal(await r.end, 'quit');
    assert.equal(r.handlers[1]!.closed, 1);
  } finally {
    await r.stop();
  }
});

test('protocol errors close the connection: oversized, malformed, out of order', async () => {
  const cases: [string, Buffer][] = [
    ['oversized', bin(OPTNEG.subarray(0, 0), u32(2 * 1024 * 1024), 'B')],
    ['malformed header', bin(OPTNEG, CONNECT, pkt('L', 'Subject\0'))],
    ['before OPTNEG', CONNECT],
    ['before CONNECT', bin(OPTNEG, pkt('H', 'x\0'))],
    ['unknown command', bin(OPTNEG, pkt('Z'))],
    ['old protocol version', pkt('O', u32(2), u32(0x1f), u32(0x7f))],
  ];
  for (const [name, bytes] of cases) {
    const r = await rig();
    try {
      await r.send(bytes, 0);
      await r.closed;
      assert.equal(await r.end, 'protocol', name);
      for (const h of r.handlers) assert.equal(h.closed, 1, name);
    } finally {
      await r.stop();
    }
  }
});

test('an idle connection is closed after idleTimeoutMs', async () => {
  const r = await rig({ idleTimeoutMs: 150 });
  try {
    await r.send(bin(OPTNEG, CONNECT), 2);
    const t0 = Date.now();
    await r.closed;
    assert.ok(Date.now() - t0 >= 100);
    assert.equal(await r.end, 'idle');
    assert.equal(r.handlers[0]!.closed, 1);
  } finally {
    await r.stop();
  }
});

test('the client closing mid-message closes the handler once', async () => {
  const r = await rig();
  try {
    await r.send(bin(OPTNEG, CONNECT, HELO, MAIL('a@example.org')), 4);
    await r.stop();
    assert.equal(await r.end, 'closed');
    assert.equal(r.handlers[0]!.closed, 1);
  } finally {
    await r.stop().catch(() => {});
  }
});

test('200 body chunks in one write (no replies): handed over one at a time, in order, with a small read-ahead', async () => {
  let inFlight = 0;
  let maxInFlight = 0;
  const r = await rig({ maxQueuedPackets: 8 }, () => {
    const h = new Recorder();
    h.body = async (c: Buffer) => {
      inFlight++;
      maxInFlight = Math.max(maxInFlight, inFlight);
      await new Promise((res) => setTimeout(res, 1));
      h.bodyText += c.toString('latin1');
      inFlight--;
    };
    return h;
  });
  try {
    await r.send(bin(OPTNEG, CONNECT, HELO, MAIL('a@example.org'), RCPT('ok@example.com')), 5);
    const chunks = Array.from({ length: 200 }, (_, i) => pkt('B', `chunk ${i}\r\n`));
    const replies = show(await r.send(bin(pkt('T'), pkt('N'), ...chunks, pkt('E')), 5));
    assert.deepEqual(replies.map((x) => x[0]), ['c', 'c', 'i', 'h', 'c']);
    const expected = Array.from({ length: 200 }, (_, i) => `chunk ${i}\r\n`).join('');
    assert.equal(r.handlers[0]!.calls.at(-1), `eom i=ABC123 body=${JSON.stringify(expected)}`);
    assert.equal(maxInFlight, 1, 'one body chunk at a time');
  } finally {
    await r.stop();
  }
});
