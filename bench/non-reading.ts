/**
 * non-reading.ts — memory per connection under clients that never read their replies.
 *
 *   npm run build && node --import tsx bench/non-reading.ts [CLIENTS=50] [MIB=8]
 *
 * Starts smtp-sink and doorman (the junk, command and error caps lifted so that only output
 * back-pressure bounds a session; writeTimeout 60 s so no client is dropped while measured), then
 * CLIENTS sessions that say EHLO, stop reading, and write `VRFY x` lines as fast as their sockets
 * take them: at most MIB MiB each, until their socket has not drained for 2 s (doorman stopped
 * reading them). Prints doorman's RSS before, at the peak, and the growth per connection.
 * Bounded: CLIENTS × MIB MiB, 60 s.
 */
import fs from 'node:fs';
import { startDoorman } from '../test/helpers/doorman.js';
import { startSink } from '../test/helpers/sink.js';
import { SmtpClient } from '../test/helpers/smtp.js';
import { sleep, stopAll } from '../test/helpers/procs.js';

const [clients = 50, mib = 8] = process.argv.slice(2).map(Number);
const rssKb = (pid: number) => Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0);

const sink = await startSink();
const dm = await startDoorman({
  backendPort: sink.port,
  config: `limits:\n  maxClientsPerIp: ${clients + 10}\n  maxEventLoopLag: 0\n  maxJunkCommands: 1000000000\n  maxCommands: 1000000000\n  maxErrors: 1000000000\n  writeTimeout: 60000\n`,
});
try {
  const pid = dm.proc.pid;
  // Warm up: one ordinary session.
  const w = await SmtpClient.connect(dm.port);
  await w.reply();
  await w.ehlo();
  await w.cmd('QUIT');
  await sleep(500);
  const base = rssKb(pid);
  let peak = base;
  const sampler = setInterval(() => (peak = Math.max(peak, rssKb(pid))), 100);
  const chunk = Buffer.from('VRFY x\r\n'.repeat(8192), 'latin1');
  const deadline = Date.now() + 60_000;
  let total = 0;
  // Every client is greeted first; then all of them flood at once.
  const open: SmtpClient[] = [];
  for (let i = 0; i < clients; i++) {
    const c = await SmtpClient.connect(dm.port);
    await c.reply();
    await c.ehlo();
    open.push(c);
  }
  const flood = async (c: SmtpClient) => {
    c.socket.pause();
    let written = 0;
    while (written < mib * 1048576 && Date.now() < deadline) {
      written += chunk.length;
      if (c.socket.write(chunk)) continue;
      const drained = await Promise.race([new Promise<boolean>((r) => c.socket.once('drain', () => r(true))), sleep(2000).then(() => false)]);
      if (!drained) break; // doorman stopped reading this client
    }
    total += written;
  };
  await Promise.all(open.map(flood));
  await sleep(1000);
  clearInterval(sampler);
  peak = Math.max(peak, rssKb(pid));
  process.stdout.write(
    `${clients} non-reading clients, ${(total / 1048576).toFixed(1)} MiB of VRFY accepted by their sockets: ` +
      `doorman RSS ${(base / 1024).toFixed(0)} MB → ${(peak / 1024).toFixed(0)} MB, ${((peak - base) / clients).toFixed(0)} KB per connection\n`,
  );
  for (const c of open) c.close();
} finally {
  await dm.stop();
  await sink.stop();
  await stopAll();
}
