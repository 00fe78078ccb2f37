/**
 * ehlo-load.ts — a load that smtp-source cannot make: SESSIONS parallel ESMTP sessions (EHLO), each
 * sending MESSAGES 4 KB messages and waiting for every reply, as an MTA without pipelining on its
 * side does. Shows doorman's deferred MAIL (backend.deferMail), which HELO sessions do not allow.
 *
 *   node --import tsx bench/ehlo-load.ts PORT [SESSIONS=20] [MESSAGES=200]
 *
 * Prints messages/s. Bounded: SESSIONS × MESSAGES messages, and each session gives up after 60 s.
 */
import net from 'node:net';

const [port = 0, sessions = 20, messages = 200] = process.argv.slice(2).map(Number);
const BODY = 'Subject: ehlo-load\r\n\r\n' + ('x'.repeat(78) + '\r\n').repeat(51) + '.\r\n';
const STEPS = ['EHLO load.example\r\n', 'MAIL FROM:<a@load.example>\r\n', 'RCPT TO:<user@example.com>\r\n', 'DATA\r\n', BODY];

function session(): Promise<void> {
  return new Promise((resolve, reject) => {
    const s = net.connect(port, '127.0.0.1');
    s.setNoDelay(true);
    const deadline = setTimeout(() => s.destroy(new Error('session took over 60 s')), 60_000);
    let buf = '';
    let step = -1; // -1: greeting; 0..4: STEPS; 5: QUIT sent
    let sent = 0;
    s.on('data', (d: Buffer) => {
      buf += d.toString('latin1');
      for (;;) {
        const m = /(?:^|\n)(\d{3}) [^\n]*\n/.exec(buf);
        if (!m) return;
        buf = buf.slice(m.index + m[0].length);
        if (Number(m[1]) >= 400) return void s.destroy(new Error(`refused: ${m[0].trim()}`));
        if (step === 5) {
          clearTimeout(deadline);
          s.end();
          return resolve();
        }
        if (step === 4 && ++sent >= messages) {
          s.write('QUIT\r\n');
          step = 5;
          continue;
        }
        step = step === 4 ? 1 : step + 1;
        s.write(STEPS[step] ?? '');
      }
    });
    s.on('error', (e) => {
      clearTimeout(deadline);
      reject(e);
    });
  });
}

const t0 = performance.now();
await Promise.all(Array.from({ length: sessions }, session));
process.stdout.write(`msg/s ${Math.round((sessions * messages) / ((performance.now() - t0) / 1000))}\n`);
