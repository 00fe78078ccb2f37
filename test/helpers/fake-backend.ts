/**
 * fake-backend.ts — a deliberately misbehaving SMTP backend for fault cases that a real MTA
 * will not produce on demand: greeting never sent or refused, replies that never come,
 * garbage, a connection dropped in the middle of DATA. Everything else is answered like a
 * minimal server so doorman reaches the state under test.
 */
import net from 'node:net';
import { trackCloser } from './procs.js';

export type Fault =
  | 'none'
  | 'no-greeting'
  | 'refuse-greeting'
  | 'busy-greeting'
  | 'garbage-greeting'
  | 'stall-after-data'
  | 'close-mid-data'
  | 'close-after-message'
  | 'stall-mail'
  /** Refuses DATA with 554 (e.g. all recipients turned out invalid). */
  | 'refuse-data'
  /** Answers every command 50 ms late, in order, to see whether commands come pipelined. */
  | 'slow-replies'
  /** Refuses any HELO/EHLO but its first (doorman's own) with 550, as a HELO restriction would. */
  | 'refuse-helo'
  /** Offers XCLIENT but refuses it, as Postfix does for a host not in smtpd_authorized_xclient_hosts. */
  | 'refuse-xclient'
  /** Offers XCLIENT NAME ADDR PROTO HELO and accepts it with 220, as Postfix does. */
  | 'xclient'
  /** As 'xclient', and its EHLO differs by client: SIZE 1000000 after XCLIENT ADDR=127.0.0.81 (a per-client limit). */
  | 'xclient-per-client'
  /** After its 354, stops reading (doorman's writes back up), then dies half a second later. */
  | 'stall-then-close'
  /** Offers CHUNKING and takes BDAT (messages stored unstuffed, as sent). */
  | 'chunking'
  /** Offers CHUNKING, refuses the first BDAT chunk with 552 and every later one with 503. */
  | 'chunking-refuse'
  /**
   * Offers CHUNKING, answers every command 50 ms late (so that LAST goes before the first chunk's
   * reply comes), refuses the first chunk with 452 — and then accepts LAST with 250, as it should not.
   */
  | 'chunking-refuse-late';

export interface FakeBackend {
  port: number;
  /** Complete messages received (end of data seen). */
  messages: string[];
  /** Connections accepted. */
  connections: number;
  /** Bytes of DATA received so far, over all connections. */
  dataBytes: number;
  /** Most commands received and not yet answered at one time (> 1: the client pipelines). */
  maxOutstanding: number;
  /** Command lines received, in order. */
  commands: string[];
  fault: Fault;
  close(): Promise<void>;
}

export async function startFakeBackend(fault: Fault): Promise<FakeBackend> {
  const sockets = new Set<net.Socket>();
  const state: FakeBackend = {
    port: 0,
    messages: [],
    connections: 0,
    dataBytes: 0,
    maxOutstanding: 0,
    commands: [],
    fault,
    // Once, whoever asks first: the test, or the file's cleanup (trackCloser) after a failure.
    close: () =>
      (closing ??= new Promise((r) => {
        for (const s of sockets) s.destroy();
        server.close(() => r());
      })),
  };
  let closing: Promise<void> | null = null;
  trackCloser(state.close);
  const server = net.createServer((s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => undefined);
    state.connections++;
    const f = state.fault;
    if (f === 'no-greeting') return;
    if (f === 'refuse-greeting') return void s.write('554 5.7.1 go away\r\n');
    if (f === 'busy-greeting') return void s.end('421 4.3.2 Service busy, closing transmission channel\r\n');
    if (f === 'garbage-greeting') return void s.write('HTTP/1.1 400 Bad Request\r\n\r\n');
    s.write('220 fake.backend ESMTP\r\n');
    let buf = '';
    let inData = false;
    let msg = '';
    /** BDAT: octets of the current chunk still to read, whether it is the last, chunks so far. */
    let bdatLeft = -1;
    let bdatLast = false;
    let bdatChunks = 0;
    let outstanding = 0;
    /** The client named by the last XCLIENT on this connection. */
    let xclientAddr = '';
    let chain = Promise.resolve();
    /** chunking-refuse-late: chunk replies held until the LAST chunk has arrived. */
    const heldBdat: string[] = [];
    const reply = (text: string) => {
      if (f !== 'slow-replies' && f !== 'chunking-refuse-late') return void s.write(text);
      outstanding++;
      state.maxOutstanding = Math.max(state.maxOutstanding, outstanding);
      chain = chain.then(() => new Promise((r) => setTimeout(r, 50))).then(() => {
        outstanding--;
        s.write(text);
      });
    };
    s.on('data', (d: Buffer) => {
      buf += d.toString('latin1');
      for (;;) {
        if (bdatLeft >= 0) {
          const take = Math.min(bdatLeft, buf.length);
          msg += buf.slice(0, take);
          state.dataBytes += take;
          buf = buf.slice(take);
          bdatLeft -= take;
          if (bdatLeft > 0) return;
          bdatLeft = -1;
          bdatChunks++;
          if (f === 'chunking-refuse') reply(bdatChunks === 1 ? '552 5.3.4 Error: message file too big\r\n' : '503 5.5.1 Error: no transaction in progress\r\n');
          else if (f === 'chunking-refuse-late' && !bdatLast) {
            // Every chunk's reply is held until LAST has arrived, so the refusal of the first
            // comes back only after LAST went, however fast or slow the client's side is.
            heldBdat.push(bdatChunks === 1 ? '452 4.3.1 Error: insufficient system storage\r\n' : '250 2.0.0 Ok\r\n');
          } else if (bdatLast) {
            state.messages.push(msg);
            for (const h of heldBdat.splice(0)) reply(h);
            reply('250 2.0.0 Ok: queued as FAKE\r\n');
          } else reply('250 2.0.0 Ok\r\n');
          if (bdatLast) {
            msg = '';
            bdatChunks = 0;
          }
          continue;
        }
        if (inData) {
          // The end marker may straddle TCP segments: look for it in everything received.
          const before = msg.length;
          msg += buf;
          state.dataBytes += buf.length;
          buf = '';
          if (f === 'close-mid-data' && state.dataBytes > 2000) return void s.destroy();
          const end = ('\r\n' + msg).indexOf('\r\n.\r\n', Math.max(0, before - 3));
          if (end < 0) return;
          buf = msg.slice(end + 3);
          state.messages.push(msg.slice(0, Math.max(0, end - 2)));
          msg = '';
          inData = false;
          if (f === 'stall-after-data') continue;
          reply('250 2.0.0 Ok: queued as FAKE\r\n');
          if (f === 'close-after-message') return void s.end();
          continue;
        }
        const nl = buf.indexOf('\r\n');
        if (nl < 0) return;
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 2);
        const verb = line.split(' ')[0]?.toUpperCase();
        state.commands.push(line);
        if ((verb === 'EHLO' || verb === 'HELO') && f === 'refuse-helo' && state.commands.filter((c) => /^(EHLO|HELO) /i.test(c)).length > 1) {
          reply(`550 5.7.1 <${line.slice(5)}>: Helo command rejected: Host not found\r\n`);
        } else if (verb === 'BDAT') {
          const m = /^BDAT (\d+)( LAST)?$/i.exec(line);
          bdatLeft = Number(m?.[1] ?? 0);
          bdatLast = Boolean(m?.[2]);
        } else if (verb === 'EHLO' && (f === 'chunking' || f === 'chunking-refuse' || f === 'chunking-refuse-late')) {
          reply('250-fake.backend\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-SIZE 100000000\r\n250 8BITMIME\r\n');
        } else if (verb === 'EHLO' && f === 'xclient-per-client') {
          reply(`250-fake.backend\r\n250-PIPELINING\r\n250-SIZE ${xclientAddr === '127.0.0.81' ? 1000000 : 100000000}\r\n250-XCLIENT NAME ADDR PROTO HELO\r\n250 8BITMIME\r\n`);
        } else if (verb === 'EHLO' && (f === 'refuse-xclient' || f === 'xclient')) {
          reply('250-fake.backend\r\n250-PIPELINING\r\n250-XCLIENT NAME ADDR PROTO HELO\r\n250 8BITMIME\r\n');
        } else if (verb === 'XCLIENT' && (f === 'xclient' || f === 'xclient-per-client') && xclientAddr !== '' && xclientAddr !== '127.0.0.1') {
          // As Postfix: a second XCLIENT is judged by the client the first one named.
          reply('550 5.7.0 Error: insufficient authorization\r\n');
        } else if (verb === 'XCLIENT' && (f === 'xclient' || f === 'xclient-per-client')) {
          xclientAddr = /ADDR=(\S+)/.exec(line)?.[1] ?? '';
          reply('220 fake.backend ESMTP\r\n');
        } else if (verb === 'XCLIENT') {
          reply('550 5.7.0 Error: insufficient authorization\r\n');
        } else if (verb === 'EHLO') reply('250-fake.backend\r\n250-PIPELINING\r\n250-SIZE 100000000\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n');
        else if (verb === 'AUTH') reply('535 5.7.8 Error: authentication failed\r\n');
        else if (verb === 'HELO') reply('250 fake.backend\r\n');
        else if (verb === 'MAIL' && f === 'stall-mail') continue;
        else if (verb === 'DATA' && f === 'refuse-data') reply('554 5.5.1 Error: no valid recipients\r\n');
        else if (verb === 'DATA') {
          reply('354 go ahead\r\n');
          inData = true;
          if (f === 'stall-then-close') {
            s.pause();
            setTimeout(() => s.destroy(), 500);
            return;
          }
        } else if (verb === 'QUIT') {
          s.write('221 bye\r\n');
          s.end();
        } else reply('250 2.0.0 Ok\r\n');
      }
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  state.port = (server.address() as net.AddressInfo).port;
  return state;
}
