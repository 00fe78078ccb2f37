/**
 * redis.ts — real redis-server processes for tests: a single server, or a Redis Cluster of three
 * masters made with `redis-cli --cluster create`, on free loopback ports.
 */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { freePort } from './net.js';
import { eventually, spawnProc, type Proc } from './procs.js';

const run = promisify(execFile);

export interface RedisServer {
  port: number;
  url: string;
  proc: Proc;
  /** Kills the server (SIGKILL: an outage, not a shutdown). */
  kill(): Promise<void>;
  /** Starts it again on the same port. */
  restart(): Promise<void>;
  stop(): Promise<void>;
}

async function ping(port: number): Promise<boolean> {
  try {
    const { stdout } = await run('redis-cli', ['-p', String(port), 'PING'], { timeout: 2000 });
    return stdout.trim() === 'PONG';
  } catch {
    return false;
  }
}

function spawnServer(port: number, dir: string, extra: string[] = []): Proc {
  return spawnProc('redis-server', 'redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--protected-mode', 'no', '--dir', dir, ...extra]);
}

export async function startRedis(port?: number): Promise<RedisServer> {
  const p = port ?? (await freePort());
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-redis-'));
  let proc = spawnServer(p, dir);
  await eventually(() => ping(p), 5000);
  const server: RedisServer = {
    port: p,
    url: `redis://127.0.0.1:${p}`,
    get proc() {
      return proc;
    },
    async kill() {
      await proc.stop('SIGKILL');
    },
    async restart() {
      proc = spawnServer(p, dir);
      await eventually(() => ping(p), 5000);
    },
    async stop() {
      await proc.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
  return server;
}

export interface RedisCluster {
  ports: number[];
  /** DOORMAN_REDIS_URL for doorman. */
  url: string;
  stop(): Promise<void>;
}

export async function startRedisCluster(): Promise<RedisCluster> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-cluster-'));
  const ports = [await freePort(), await freePort(), await freePort()];
  const procs = ports.map((p) => spawnServer(p, dir, ['--cluster-enabled', 'yes', '--cluster-config-file', `nodes-${p}.conf`, '--cluster-node-timeout', '2000']));
  for (const p of ports) await eventually(() => ping(p), 5000);
  await run('redis-cli', ['--cluster', 'create', ...ports.map((p) => `127.0.0.1:${p}`), '--cluster-replicas', '0', '--cluster-yes'], { timeout: 20_000 });
  const ok = await eventually(async () => {
    for (const p of ports) {
      const { stdout } = await run('redis-cli', ['-p', String(p), 'CLUSTER', 'INFO']);
      if (!stdout.includes('cluster_state:ok')) return false;
    }
    return true;
  }, 20_000);
  if (!ok) throw new Error('redis cluster did not reach cluster_state:ok');
  return {
    ports,
    url: `redis+cluster://${ports.map((p) => `127.0.0.1:${p}`).join(',')}`,
    async stop() {
      await Promise.all(procs.map((p) => p.stop()));
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

export interface RedisSentinel {
  port: number;
  /** DOORMAN_REDIS_URL for doorman. */
  url: string;
  stop(): Promise<void>;
}

/** A Sentinel watching `master` under the name "doorman". */
export async function startSentinel(master: RedisServer): Promise<RedisSentinel> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'doorman-sentinel-'));
  const port = await freePort();
  const conf = path.join(dir, 'sentinel.conf');
  fs.writeFileSync(conf, `port ${port}\nbind 127.0.0.1\nprotected-mode no\ndir ${dir}\nsentinel monitor doorman 127.0.0.1 ${master.port} 1\nsentinel down-after-milliseconds doorman 2000\n`);
  const proc = spawnProc('redis-sentinel', 'redis-server', [conf, '--sentinel']);
  await eventually(async () => {
    try {
      const { stdout } = await run('redis-cli', ['-p', String(port), 'SENTINEL', 'get-master-addr-by-name', 'doorman'], { timeout: 2000 });
      return stdout.includes(String(master.port));
    } catch {
      return false;
    }
  }, 10_000);
  return {
    port,
    url: `redis+sentinel://127.0.0.1:${port}/doorman`,
    async stop() {
      await proc.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
