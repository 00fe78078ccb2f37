/**
 * backend-connections.ts — what idle and active clients cost the backend: a stock Postfix
 * (default_process_limit = 100) behind doorman with its default backend settings. N clients
 * connect and say nothing; then one real client sends a message; then M clients say EHLO and hold
 * their sessions. Backend connections are counted with ss(8) (established TCP connections to
 * Postfix's port) and doorman_backend_connections.
 *
 *   npm run build && node --import tsx bench/backend-connections.ts [N=100] [M=70]
 */
import { execFileSync } from 'node:child_process';
import { startDoorman } from '../test/helpers/doorman.js';
import { startPostfix } from '../test/helpers/postfix.js';
import { startSink } from '../test/helpers/sink.js';
import { SmtpClient } from '../test/helpers/smtp.js';
import { sleep, stopAll } from '../test/helpers/procs.js';

const N = Number(process.argv[2] ?? 100);
const M = Number(process.argv[3] ?? 70);
const connectionsTo = (port: number) =>
  execFileSync('ss', ['-Htn', 'state', 'established', `( dport = :${port} )`], { encoding: 'utf8' }).split('\n').filter((l) => l.trim()).length;
/** Clients spread over 127.0.1.x so that maxClientsPerIp (20) is not what limits them. */
const addr = (i: number) => `127.0.1.${1 + (i % 200)}`;

const sink = await startSink();
const postfix = await startPostfix({ relayPort: sink.port });
// A short greeting deadline, so that a Postfix out of processes shows as a refusal within seconds.
const d = await startDoorman({ backendPort: postfix.port, config: 'backend:\n  greetingTimeout: 3000\n' });
try {
  const idle: SmtpClient[] = [];
  for (let i = 0; i < N; i++) {
    const c = await SmtpClient.connect(d.port, { localAddress: addr(i) });
    await c.reply();
    idle.push(c);
  }
  await sleep(1000);
  console.log(`${N} idle clients: ${connectionsTo(postfix.port)} backend connections (ss), doorman_backend_connections ${await d.metric('doorman_backend_connections')}`);
  const c = await SmtpClient.connect(d.port, { localAddress: '127.0.2.1' });
  await c.reply();
  const e = await c.cmd('EHLO real.example.net', 10_000);
  const r = e.code === 250 ? (await c.transaction({ from: 'real@example.org', to: ['bob@example.com'], body: 'Subject: real\r\n\r\nhi\r\n' })).last : e;
  console.log(`then a real client: EHLO ${e.code}, message ${r.code} ${r.text}`);
  c.close();
  for (const x of idle) x.close();
  await sleep(500);
  const active: SmtpClient[] = [];
  const codes = new Map<number, number>();
  await Promise.all(
    Array.from({ length: M }, async (_, i) => {
      const a = await SmtpClient.connect(d.port, { localAddress: addr(i) });
      active.push(a);
      await a.reply();
      const h = await a.cmd('EHLO active.example.net', 15_000).catch(() => ({ code: 0 }));
      codes.set(h.code, (codes.get(h.code) ?? 0) + 1);
    }),
  );
  console.log(`${M} active clients (EHLO, then holding): EHLO replies ${JSON.stringify(Object.fromEntries(codes))}; ${connectionsTo(postfix.port)} backend connections (ss); doorman_backend_busy_total ${await d.metric('doorman_backend_busy_total')}`);
  for (const a of active) a.close();
} finally {
  await d.stop();
  await postfix.stop();
  await sink.stop();
  await stopAll();
}
