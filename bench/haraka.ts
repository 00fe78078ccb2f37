/**
 * haraka.ts — Haraka 3.3.4 as a peer in the benchmark (BENCH_HARAKA=1).
 *
 * Installed on demand into bench/haraka/node_modules from bench/haraka/package.json (pinned
 * versions; the `overrides` entry pins libmime to 5.4.8, without which Haraka 3.3.4 does not
 * install from the registry). Configured as a forwarder with its own checks, as the issue asks:
 *   - `dns-list` with the bench's DNSBL zone (Haraka takes its DNS servers from the system's
 *     resolver configuration only, and skips private clients such as 127.0.0.1 — so the lookup
 *     itself is skipped here, as it would be for doorman's allowlisted clients);
 *   - `limit` with connection and recipient rates and a concurrency limit, on the bench's Redis
 *     (limits far above the load, as for doorman, so nothing is refused);
 *   - `rcpt_to.in_host_list` (example.com) and `queue/smtp_forward` to the same smtp-sink;
 *   - `nodes` processes (2: one per core, like doorman's cluster mode), log level NOTICE.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { freePort } from '../test/helpers/net.js';
import { spawnProc, sleep, type Proc } from '../test/helpers/procs.js';

const run = promisify(execFile);

export interface Haraka {
  proc: Proc;
  port: number;
  stop(): Promise<void>;
}

/** npm install in bench/haraka (once); returns the path of the `haraka` command. */
async function ensureInstalled(root: string): Promise<string> {
  const dir = path.join(root, 'bench', 'haraka');
  const bin = path.join(dir, 'node_modules', 'Haraka', 'bin', 'haraka');
  if (!fs.existsSync(bin)) {
    process.stdout.write('installing Haraka 3.3.4 into bench/haraka (npm ci)…\n');
    await run('npm', ['ci', '--no-audit', '--no-fund'], { cwd: dir, timeout: 600_000, maxBuffer: 16 * 1024 * 1024 });
  }
  return bin;
}

export async function startHaraka(opts: { root: string; sinkPort: number; redisPort: number; zone: string; nodes: number }): Promise<Haraka> {
  const bin = await ensureInstalled(opts.root);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-bench-haraka-'));
  const svc = path.join(dir, 'svc');
  await run(process.execPath, [bin, '-i', svc], { timeout: 60_000 });
  const port = await freePort();
  const cfg = (name: string, text: string) => fs.writeFileSync(path.join(svc, 'config', name), text);
  cfg('smtp.ini', `[main]\nlisten=127.0.0.1:${port}\nnodes=${opts.nodes}\n`);
  cfg('log.ini', `[main]\nlevel=${process.env.HARAKA_LOG ?? 'notice'}\ntimestamps=false\nformat=default\n`);
  cfg('me', 'haraka.bench.test\n');
  cfg('host_list', 'example.com\n');
  cfg('plugins', ['dns-list', 'limit', 'rcpt_to.in_host_list', 'queue/smtp_forward'].join('\n') + '\n');
  cfg('smtp_forward.ini', `host=127.0.0.1\nport=${opts.sinkPort}\nenable_tls=false\n`);
  cfg('dns-list.ini', `[main]\nperiodic_checks=0\nzones=${opts.zone}\nsearch=first\n`);
  cfg('redis.ini', `[server]\nhost=127.0.0.1\nport=${opts.redisPort}\ndb=0\n`);
  cfg(
    'limit.ini',
    [
      '[main]',
      'tarpit_delay=0',
      '[redis]',
      'host=127.0.0.1',
      `port=${opts.redisPort}`,
      'db=4',
      '[concurrency]',
      'enabled=true',
      'max=100000',
      '[rate_conn]',
      'enabled=true',
      'default=10000000/1m',
      '[rate_rcpt_host]',
      'enabled=true',
      'default=10000000/1m',
      '[rate_rcpt]',
      'enabled=true',
      'default=10000000/1m',
      '',
    ].join('\n'),
  );
  const proc = spawnProc('haraka', process.execPath, [bin, '-c', svc], { cwd: dir });
  // Ready when the port accepts (each node listens on the shared port).
  for (let i = 0; i < 100; i++) {
    const ok = await new Promise<boolean>((resolve) => {
      import('node:net').then(({ default: net }) => {
        const s = net.connect(port, '127.0.0.1');
        s.once('data', () => {
          s.destroy();
          resolve(true);
        });
        s.once('error', () => resolve(false));
      }, () => resolve(false));
    });
    if (ok) break;
    await sleep(200);
  }
  // Each process connects its Redis client after it listens; the first sessions would find none.
  await sleep(2000);
  return {
    proc,
    port,
    stop: async () => {
      await proc.stop('SIGTERM', 5000);
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
