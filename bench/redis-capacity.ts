/**
 * redis-capacity.ts — what one Redis, and a Redis Cluster of three masters, carry of doorman's
 * rate-limit checks (the capacity model in docs/operations.md).
 *
 *   node --import tsx bench/redis-capacity.ts
 *
 * Starts a redis-server and a 3-master cluster (redis-cli --cluster create) on free loopback ports
 * (test/helpers/redis.ts) and drives doorman's own store (src/store/redis.ts: rate-limit.lua by
 * EVALSHA, one key per call, as the ratelimit rule does) at full speed: CAP_CLIENTS processes
 * (default 2) with CAP_INFLIGHT calls in flight each (default 64; ioredis pipelines them on its
 * connection), keys spread over CAP_KEYS buckets (100000), for CAP_SECONDS per target (10), and
 * at most CAP_MAX_CALLS calls per process (5000000). Reports calls per second, Redis's own CPU per
 * call (INFO cpu: used_cpu_user + used_cpu_sys, summed over the masters) and the client's CPU per
 * call. For the single server, redis-benchmark (C, pipelined: -c 50 -P 16, CAP_BENCH_CALLS calls,
 * default 500000) runs the same script by EVALSHA as a cross-check that the Node clients are not
 * what limits the figure.
 *
 * CPU per call is the figure that carries to another machine: a Redis master runs scripts on one
 * core, so 1 s / (CPU per call) is what one master carries when it has a core to itself. Every
 * process started here is stopped by PID at the end; all traffic stays on 127.0.0.1. Results:
 * bench/results/redis-capacity.{json,md} (CAP_OUT for another folder).
 */
import { execFile, fork } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { fileURLToPath } from 'node:url';
import { RedisStore } from '../src/store/redis.js';
import { stopAll } from '../test/helpers/procs.js';
import { startRedis, startRedisCluster } from '../test/helpers/redis.js';

const run = promisify(execFile);
const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '..');
const CLIENTS = Number(process.env.CAP_CLIENTS ?? 2);
const INFLIGHT = Number(process.env.CAP_INFLIGHT ?? 64);
const KEYS = Number(process.env.CAP_KEYS ?? 100_000);
const SECONDS = Number(process.env.CAP_SECONDS ?? 10);
const MAX_CALLS = Number(process.env.CAP_MAX_CALLS ?? 5_000_000);
const BENCH_CALLS = Number(process.env.CAP_BENCH_CALLS ?? 500_000);

interface DriverResult {
  calls: number;
  errors: number;
  seconds: number;
  cpuUs: number;
}

/** One driver process: `inflight` loops of store.rate() until the deadline or the call cap. */
async function drive(target: string): Promise<DriverResult> {
  const cluster = target.startsWith('cluster:') ? target.slice(8).split(',') : null;
  const store = new RedisStore({ ...(cluster ? { cluster } : { url: target }), prefix: 'doorman:cap:', commandTimeout: 2000 });
  if (!(await store.ready(10_000))) throw new Error(`no Redis at ${target}`);
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  const end = t0 + SECONDS * 1000;
  let calls = 0;
  let errors = 0;
  const loop = async () => {
    while (performance.now() < end && calls + errors < MAX_CALLS) {
      try {
        // A limit far above the load: every call is allowed and writes its key (the costly path).
        await store.rate(`rate:conn:${Math.floor(Math.random() * KEYS)}`, 60_000, 1_000_000_000, 1);
        calls++;
      } catch {
        errors++;
      }
    }
  };
  await Promise.all(Array.from({ length: INFLIGHT }, loop));
  const seconds = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  await store.close();
  return { calls, errors, seconds, cpuUs: cpu.user + cpu.system };
}

/** Redis's own CPU seconds (user + sys), summed over `ports`. */
async function redisCpu(ports: readonly number[]): Promise<number> {
  let total = 0;
  for (const p of ports) {
    const { stdout } = await run('redis-cli', ['-p', String(p), 'INFO', 'cpu'], { timeout: 5000 });
    const get = (k: string) => Number(new RegExp(`^${k}:([\\d.]+)`, 'm').exec(stdout)?.[1] ?? 0);
    total += get('used_cpu_user') + get('used_cpu_sys');
  }
  return total;
}

interface TargetResult {
  target: string;
  callsPerSec: number;
  errors: number;
  redisCpuUsPerCall: number;
  clientCpuUsPerCall: number;
  /** 1 s / Redis CPU per call: calls per second per master core. */
  perMasterCore: number;
}

/** CLIENTS driver processes against `target` at once; Redis CPU read around them. */
async function measure(label: string, target: string, ports: readonly number[]): Promise<TargetResult> {
  process.stdout.write(`${label}: ${CLIENTS} clients × ${INFLIGHT} in flight, ${SECONDS} s…\n`);
  const cpu0 = await redisCpu(ports);
  const results = await Promise.all(
    Array.from(
      { length: CLIENTS },
      () =>
        new Promise<DriverResult>((resolve, reject) => {
          const child = fork(fileURLToPath(import.meta.url), ['drive', target], { execArgv: ['--import', 'tsx'], cwd: ROOT, stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
          const killer = setTimeout(() => child.kill('SIGKILL'), (SECONDS + 60) * 1000);
          child.once('message', (m) => resolve(m as DriverResult));
          child.once('exit', (code) => {
            clearTimeout(killer);
            if (code !== 0) reject(new Error(`driver exited with ${code}`));
          });
        }),
    ),
  );
  const cpu1 = await redisCpu(ports);
  const calls = results.reduce((n, r) => n + r.calls, 0);
  const seconds = Math.max(...results.map((r) => r.seconds));
  const redisUs = ((cpu1 - cpu0) * 1e6) / Math.max(1, calls);
  return {
    target: label,
    callsPerSec: calls / seconds,
    errors: results.reduce((n, r) => n + r.errors, 0),
    redisCpuUsPerCall: redisUs,
    clientCpuUsPerCall: results.reduce((n, r) => n + r.cpuUs, 0) / Math.max(1, calls),
    perMasterCore: 1e6 / redisUs,
  };
}

/** redis-benchmark running rate-limit.lua by EVALSHA on random keys: calls per second. */
async function redisBenchmark(port: number): Promise<number> {
  const lua = fs.readFileSync(path.join(ROOT, 'src', 'store', 'scripts', 'rate-limit.lua'), 'utf8');
  const sha = (await run('redis-cli', ['-p', String(port), 'SCRIPT', 'LOAD', lua])).stdout.trim();
  const args = ['-p', String(port), '-n', String(BENCH_CALLS), '-c', '50', '-P', '16', '-r', String(KEYS), '-q', 'evalsha', sha, '1', 'doorman:cap:rate:bench:__rand_int__', '60000', '1000000000', '1'];
  const { stdout } = await run('redis-benchmark', args, { timeout: 300_000, maxBuffer: 16 * 1024 * 1024 });
  // -q prints "evalsha …: 123456.78 requests per second, p50=… msec" (after \r progress lines).
  const m = /([\d.]+) requests per second/.exec(stdout.split('\r').pop() ?? stdout);
  return Number(m?.[1] ?? NaN);
}

async function main(): Promise<void> {
  const single = await startRedis();
  const cluster = await startRedisCluster();
  const results: TargetResult[] = [];
  let benchmark = NaN;
  try {
    results.push(await measure('one Redis', single.url, [single.port]));
    results.push(await measure('Redis Cluster, 3 masters', `cluster:${cluster.ports.map((p) => `127.0.0.1:${p}`).join(',')}`, cluster.ports));
    process.stdout.write(`one Redis: redis-benchmark, ${BENCH_CALLS} EVALSHA…\n`);
    benchmark = await redisBenchmark(single.port);
  } finally {
    await cluster.stop();
    await single.stop();
  }
  const f = (n: number, d = 0) => (Number.isFinite(n) ? n.toFixed(d) : '—');
  const md = [
    '| target | rate-limit calls/s (doorman store, Node clients) | errors | Redis CPU µs/call | calls/s per master core (1 s ÷ CPU per call) | client CPU µs/call |',
    '|---|---|---|---|---|---|',
    ...results.map((r) => `| ${r.target} | ${f(r.callsPerSec)} | ${r.errors} | ${f(r.redisCpuUsPerCall, 2)} | ${f(r.perMasterCore)} | ${f(r.clientCpuUsPerCall, 2)} |`),
    '',
    `redis-benchmark (C client, -c 50 -P 16), the same script by EVALSHA on one Redis: ${f(benchmark)} calls/s.`,
  ].join('\n');
  const meta = { date: new Date().toISOString(), cpus: os.cpus().length, loadavg: os.loadavg().map((x) => Number(x.toFixed(2))), clients: CLIENTS, inflight: INFLIGHT, seconds: SECONDS, keys: KEYS, redis: (await run('redis-server', ['--version'])).stdout.trim() };
  const out = process.env.CAP_OUT ?? path.join(ROOT, 'bench', 'results');
  fs.mkdirSync(out, { recursive: true });
  fs.writeFileSync(path.join(out, 'redis-capacity.json'), JSON.stringify({ ...meta, results, redisBenchmark: benchmark }, null, 2));
  fs.writeFileSync(path.join(out, 'redis-capacity.md'), `${md}\n\n${JSON.stringify(meta)}\n`);
  process.stdout.write(`\n${md}\n\n${JSON.stringify(meta)}\n${path.join(out, 'redis-capacity.{json,md}')} written\n`);
}

if (process.argv[2] === 'drive') {
  const target = process.argv[3] ?? '';
  drive(target).then(
    (r) => process.send?.(r, () => process.exit(0)),
    (e: unknown) => {
      process.stderr.write(`driver failed: ${e instanceof Error ? e.message : String(e)}\n`);
      process.exit(1);
    },
  );
} else {
  main()
    .catch((e: unknown) => {
      process.stderr.write(`redis-capacity failed: ${e instanceof Error ? e.stack : String(e)}\n`);
      process.exitCode = 1;
    })
    .finally(() => void stopAll());
}
