/**
 * listener-limits.ts — figures for docs/security.md (connection limits, TLS handshakes, cluster).
 *
 *   npm run build && node --import tsx bench/listener-limits.ts half-open [N=1000]
 *     N TCP connections to an smtps listener that never send a ClientHello (limits set high so
 *     none is refused): doorman's RSS before and while they are held, doorman_connections_pending,
 *     and how long doorman keeps them (limits.tlsHandshakeTimeout; gives up watching after 20 s).
 *
 *   npm run build && node --import tsx bench/listener-limits.ts connect-rate [WORKERS=2] [N=3000] [C=20]
 *     N connections, C at a time: connect, greeting, QUIT, close — against WORKERS workers.
 *     Prints connections/s and the median and 99th percentile time to the greeting (in cluster
 *     mode each connection takes its slot from the primary over IPC first).
 *
 *   node --import tsx bench/listener-limits.ts ipc [N=20000]
 *     The IPC round trip alone: a forked worker takes and releases N slots from a primary running
 *     serveSlots, one after the other. Prints microseconds per take.
 *
 * Bounded: N connections, every wait has a deadline. Uses the built doorman (bin/doorman.js).
 */
import cluster from 'node:cluster';
import fs from 'node:fs';
import net from 'node:net';
import { makeCert } from '../test/helpers/certs.js';
import { startDoorman } from '../test/helpers/doorman.js';
import { startFakeBackend } from '../test/helpers/fake-backend.js';
import { serveSlots, WorkerSlots } from '../src/slots.js';

const [mode = 'half-open', ...rest] = process.argv.slice(2);

function rssKb(pid: number): number {
  const m = /VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m?.[1] ?? 0);
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function halfOpen(n: number): Promise<void> {
  const fb = await startFakeBackend('none');
  const cert = makeCert();
  const dm = await startDoorman({
    backendPort: fb.port,
    listen: 'smtps://127.0.0.1:{PORT}',
    env: { DOORMAN_TLS_CERT: cert.cert, DOORMAN_TLS_KEY: cert.key },
    config: `limits:\n  maxClients: ${n + 10}\n  maxClientsPerIp: ${n + 10}\n`,
  });
  try {
    await sleep(1000);
    const before = rssKb(dm.proc.pid);
    const t0 = Date.now();
    const closedAt: number[] = [];
    const sockets: net.Socket[] = [];
    for (let i = 0; i < n; i++) {
      const s = net.connect({ port: dm.port, host: '127.0.0.1', localAddress: `127.0.1.${1 + (i % 200)}` });
      s.on('error', () => undefined);
      s.once('close', () => closedAt.push(Date.now() - t0));
      sockets.push(s);
    }
    await sleep(1500);
    const held = rssKb(dm.proc.pid);
    const pending = await dm.metric('doorman_connections_pending', { stage: 'tls_handshake' }).catch(() => -1);
    const deadline = Date.now() + 20_000;
    while (closedAt.length < n && Date.now() < deadline) await sleep(100);
    const refused = await dm.metric('doorman_connections_refused_total', { reason: 'tls_timeout' }).catch(() => -1);
    closedAt.sort((a, b) => a - b);
    process.stdout.write(
      `${n} half-open TLS handshakes: RSS ${before} kB -> ${held} kB (${(((held - before) * 1024) / n / 1024).toFixed(1)} KiB each); ` +
        `doorman_connections_pending{stage="tls_handshake"} ${pending}; ` +
        `closed by doorman within 20 s: ${closedAt.length}` +
        (closedAt.length ? ` (first after ${closedAt[0]} ms, last after ${closedAt[closedAt.length - 1]} ms)` : '') +
        `; refused{reason="tls_timeout"} ${refused}\n`,
    );
    for (const s of sockets) s.destroy();
  } finally {
    await dm.stop();
    await fb.close();
    fs.rmSync(cert.dir, { recursive: true, force: true });
  }
}

function oneConnection(port: number): Promise<number> {
  return new Promise((resolve, reject) => {
    const t0 = process.hrtime.bigint();
    let greeted = 0;
    const s = net.connect(port, '127.0.0.1');
    const timer = setTimeout(() => s.destroy(new Error('connection took over 10 s')), 10_000);
    let buf = '';
    s.on('data', (d: Buffer) => {
      buf += d.toString('latin1');
      if (!greeted && /^220 .*\r\n/m.test(buf)) {
        greeted = Number(process.hrtime.bigint() - t0) / 1e6;
        buf = '';
        s.write('QUIT\r\n');
      } else if (greeted && /^221 /m.test(buf)) s.end();
      else if (/^4\d\d /m.test(buf)) s.destroy(new Error(`refused: ${buf.trim()}`));
    });
    s.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    s.on('close', () => {
      clearTimeout(timer);
      if (greeted) resolve(greeted);
    });
  });
}

async function connectRate(workers: number, n: number, c: number): Promise<void> {
  const fb = await startFakeBackend('none');
  const dm = await startDoorman({
    backendPort: fb.port,
    env: { DOORMAN_WORKERS: String(workers) },
    config: `limits:\n  maxClients: 10000\n  maxClientsPerIp: 10000\n  maxEventLoopLag: 0\n`,
  });
  try {
    if (workers > 1) await sleep(3000); // every worker up
    const times: number[] = [];
    let next = 0;
    const t0 = Date.now();
    await Promise.all(
      Array.from({ length: c }, async () => {
        while (next < n) {
          next++;
          times.push(await oneConnection(dm.port));
        }
      }),
    );
    const secs = (Date.now() - t0) / 1000;
    times.sort((a, b) => a - b);
    const pct = (p: number) => times[Math.min(times.length - 1, Math.floor(times.length * p))]!.toFixed(2);
    process.stdout.write(`${workers} worker(s), ${n} connections, ${c} at a time: ${(n / secs).toFixed(0)} connections/s; greeting after p50 ${pct(0.5)} ms, p99 ${pct(0.99)} ms\n`);
  } finally {
    await dm.stop();
    await fb.close();
  }
}

async function ipc(n: number): Promise<void> {
  if (cluster.isPrimary) {
    serveSlots(cluster);
    const w = cluster.fork();
    await new Promise((r) => w.once('exit', r));
    return;
  }
  const slots = new WorkerSlots();
  const limits = { maxClients: 1_000_000, maxClientsPerIp: 1_000_000 };
  await slots.take(true, 'warm-up', limits);
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) {
    await slots.take(true, `192.0.2.${i % 250}`, limits);
    slots.release(true, `192.0.2.${i % 250}`);
  }
  const us = Number(process.hrtime.bigint() - t0) / 1000 / n;
  process.stdout.write(`${n} slot takes over IPC, one at a time: ${us.toFixed(1)} µs each (round trip to the primary)\n`);
  process.exit(0);
}

if (mode === 'ipc') await ipc(Number(rest[0] ?? 20000));
else if (mode === 'half-open') await halfOpen(Number(rest[0] ?? 1000));
else if (mode === 'connect-rate') await connectRate(Number(rest[0] ?? 2), Number(rest[1] ?? 3000), Number(rest[2] ?? 20));
else throw new Error('usage: listener-limits.ts half-open [N] | connect-rate [WORKERS] [N] [C]');
