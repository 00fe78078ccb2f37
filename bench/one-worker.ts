/**
 * bench/one-worker.ts — one doorman with the shipped rule files under smtp-source, for a quick
 * A/B of one change and for profiling (issue 19): msg/s, CPU per message (the process and its
 * workers; the primary apart) and peak RSS.
 *
 *   node --import tsx bench/one-worker.ts                 (a): one 4 KB message per connection
 *   BENCH_W=b node --import tsx bench/one-worker.ts       (b): many messages per session
 *
 * BENCH_MESSAGES (4000) messages after a 1000-message warm-up; 20 sessions. BENCH_WORKERS (1);
 * BENCH_NODE_OPTIONS (the shipped --max-semi-space-size=32); BENCH_CONFIG: a doorman.yaml text
 * (e.g. $'dns:\n  cacheSize: 0\n'); BENCH_PROF=DIR writes a --cpu-prof profile there. DNS: a local
 * dnsmasq answering at once with a 300 s TTL, the load's client (127.0.0.1) confirmed by fcrdns as
 * in the bench's cost rows. Run `npm run build` first. Every process is stopped by PID at the end.
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { loopbackNames, startDnsmasq } from '../test/helpers/dns.js';
import { shippedRules, startDoorman } from '../test/helpers/doorman.js';
import { freePort } from '../test/helpers/net.js';
import { sleep, spawnProc } from '../test/helpers/procs.js';
import { childrenOf, ownStat, procStat } from './proc-stat.js';

const exec = promisify(execFile);
const n = Number(process.env.BENCH_MESSAGES ?? 4000);
const workload = process.env.BENCH_W === 'b' ? 'b' : 'a';

const sinkPort = await freePort();
const sink = spawnProc('smtp-sink', 'smtp-sink', ['-u', 'nobody', '-c', `127.0.0.1:${sinkPort}`, '1024']);
await sleep(300);
const dns = await startDnsmasq({ ttl: 300, a: loopbackNames().map((name): [string, string] => [name, '127.0.0.1']) });
const rules = shippedRules();
const prof = process.env.BENCH_PROF ? ` --cpu-prof --cpu-prof-dir=${process.env.BENCH_PROF}` : '';
const d = await startDoorman({
  backendPort: sinkPort,
  rules,
  config: process.env.BENCH_CONFIG ?? '',
  env: {
    DOORMAN_LOG_LEVEL: 'info',
    DOORMAN_WORKERS: process.env.BENCH_WORKERS ?? '1',
    DOORMAN_DNS_SERVERS: dns.server,
    NODE_OPTIONS: `${process.env.BENCH_NODE_OPTIONS ?? '--max-semi-space-size=32'}${prof}`,
  },
});
const pid = d.proc.pid;
const load = async (messages: number, extra: string[]) => {
  const t = performance.now();
  await exec('smtp-source', ['-l', '4096', '-m', String(messages), '-s', '20', ...extra, '-f', 'bench@load.example', '-t', 'user@example.com', `127.0.0.1:${d.port}`], { timeout: 300_000 });
  return (performance.now() - t) / 1000;
};
try {
  await load(1000, ['-d']);
  await sleep(500);
  const c0 = procStat(pid).cpuMs;
  const p0 = ownStat(pid).cpuMs;
  let peak = 0;
  const sampler = setInterval(() => (peak = Math.max(peak, procStat(pid).rssKb / 1024)), 100);
  const secs = await load(n, workload === 'b' ? ['-d'] : []);
  clearInterval(sampler);
  const primary = childrenOf(pid).length ? `, the primary ${((ownStat(pid).cpuMs - p0) / n).toFixed(3)}` : '';
  process.stdout.write(`(${workload}): ${(n / secs).toFixed(0)} msg/s, ${((procStat(pid).cpuMs - c0) / n).toFixed(3)} ms CPU/msg${primary}, peak RSS ${peak.toFixed(0)} MB\n`);
} finally {
  await d.stop();
  await dns.stop();
  await sink.stop();
}
