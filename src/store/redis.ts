/**
 * redis.ts — the shared store on Redis (a server, Sentinel or Cluster) with ioredis.
 *
 * Each state change is one Lua script registered with `defineCommand` (ioredis sends EVALSHA and
 * falls back to EVAL on NOSCRIPT), one round trip per check. Scripts touch one key each, so they
 * work on any Redis Cluster slot. Failures are fast and never queue: commands fail after
 * `commandTimeout` ms, and while disconnected at once (no offline queue); reconnection is
 * automatic. Outages are logged once (down, then up again) and counted in
 * doorman_redis_errors_total{op}.
 */
import fs from 'node:fs';
import { Cluster, Redis, type RedisOptions } from 'ioredis';
import type { GreyResult, RateResult, RawState, SlotResult, Store } from './store.js';

export interface RedisStoreOptions {
  /** redis://[user:pass@]host:port/db, rediss:// for TLS. */
  url?: string;
  /** Cluster seed nodes host:port. */
  cluster?: readonly string[];
  /** Sentinel nodes host:port and the master name. */
  sentinels?: readonly string[];
  sentinelName?: string;
  /** Key prefix. */
  prefix: string;
  /** Per-command deadline, ms. */
  commandTimeout: number;
  onError?: (op: string, err: Error) => void;
  onState?: (up: boolean, err?: Error) => void;
}

const script = (name: string) => fs.readFileSync(new URL(`./scripts/${name}.lua`, import.meta.url), 'utf8');

type Client = (Redis | Cluster) & {
  doormanRate(key: string, window: number, limit: number, cost: number): Promise<number[]>;
  doormanSlots(key: string, op: string, token: string, limit: number, ttl: number): Promise<number[]>;
  doormanGrey(key: string, delay: number, window: number, lifetime: number, look?: string): Promise<number[]>;
  doormanInspect(key: string): Promise<[number, string?, number?, (string | string[])?]>;
};

function hostPort(s: string): { host: string; port: number } {
  const m = /^\[?([^\]]+?)\]?:(\d+)$/.exec(s.trim());
  return { host: m?.[1] ?? s, port: Number(m?.[2] ?? 6379) };
}

export class RedisStore implements Store {
  readonly kind = 'redis' as const;
  private readonly client: Client;
  private up = true;

  constructor(private readonly opts: RedisStoreOptions) {
    const common: RedisOptions = {
      commandTimeout: opts.commandTimeout,
      enableOfflineQueue: false,
      maxRetriesPerRequest: 0,
      // Reconnect for ever, backing off to 2 s.
      retryStrategy: (times) => Math.min(times * 100, 2000),
      lazyConnect: false,
      // ioredis sends each command at once without waiting for earlier replies, so a stage's
      // limits already share one round trip. Auto-pipelining (one write per tick) measured slower
      // here: 14.5 against 8.7 µs of CPU per call, and 2-11 % fewer messages/s with a rate limit.
      enableAutoPipelining: false,
    };
    let client: Redis | Cluster;
    if (opts.cluster?.length) {
      client = new Cluster(opts.cluster.map(hostPort), {
        redisOptions: common,
        enableOfflineQueue: false,
        enableAutoPipelining: false,
        clusterRetryStrategy: (times) => Math.min(times * 100, 2000),
      });
    } else if (opts.sentinels?.length) {
      client = new Redis({ ...common, sentinels: opts.sentinels.map(hostPort), name: opts.sentinelName ?? 'mymaster' });
    } else {
      client = new Redis(opts.url ?? 'redis://127.0.0.1:6379', common);
    }
    client.defineCommand('doormanRate', { numberOfKeys: 1, lua: script('rate-limit') });
    client.defineCommand('doormanSlots', { numberOfKeys: 1, lua: script('concurrency') });
    client.defineCommand('doormanGrey', { numberOfKeys: 1, lua: script('greylist') });
    client.defineCommand('doormanInspect', { numberOfKeys: 1, lua: script('inspect') });
    client.on('error', (err: Error) => this.state(false, err));
    client.on('ready', () => this.state(true));
    this.client = client as Client;
  }

  private state(up: boolean, err?: Error): void {
    if (up === this.up) return;
    this.up = up;
    this.opts.onState?.(up, err);
  }

  private key(k: string): string {
    return `${this.opts.prefix}${k}`;
  }

  private async run<T>(op: string, f: () => Promise<T>): Promise<T> {
    try {
      return await f();
    } catch (err) {
      this.opts.onError?.(op, err as Error);
      this.state(false, err as Error);
      throw err;
    }
  }

  rate(key: string, windowMs: number, limit: number, cost: number): Promise<RateResult> {
    return this.run('rate', async () => {
      const [allowed = 0, remaining = 0, retry = 0, reset = 0] = await this.client.doormanRate(this.key(key), windowMs, limit, cost);
      return { allowed: allowed === 1, remaining, retryAfterMs: retry, resetMs: reset };
    });
  }

  acquire(key: string, token: string, limit: number, ttlMs: number): Promise<SlotResult> {
    return this.run('acquire', async () => {
      const [ok = 0, inUse = 0] = await this.client.doormanSlots(this.key(key), 'acquire', token, limit, ttlMs);
      return { ok: ok === 1, inUse };
    });
  }

  release(key: string, token: string): Promise<void> {
    return this.run('release', async () => {
      await this.client.doormanSlots(this.key(key), 'release', token, 0, 0);
    });
  }

  greylist(key: string, delayMs: number, retryWindowMs: number, lifetimeMs: number): Promise<GreyResult> {
    return this.run('greylist', async () => {
      const [passed = 0, wait = 0, first = 0] = await this.client.doormanGrey(this.key(key), delayMs, retryWindowMs, lifetimeMs);
      return { passed: passed === 1, waitMs: wait, firstAttempt: first === 1 };
    });
  }

  peekSlots(key: string, token: string, limit: number): Promise<SlotResult> {
    return this.run('peek', async () => {
      const [ok = 0, inUse = 0] = await this.client.doormanSlots(this.key(key), 'peek', token, limit, 0);
      return { ok: ok === 1, inUse };
    });
  }

  peekGreylist(key: string, delayMs: number): Promise<GreyResult> {
    return this.run('peek', async () => {
      // The window and lifetime only matter to what is written; a look writes nothing.
      const [passed = 0, wait = 0, first = 0] = await this.client.doormanGrey(this.key(key), delayMs, 0, 0, '1');
      return { passed: passed === 1, waitMs: wait, firstAttempt: first === 1 };
    });
  }

  /** One script (inspect.lua): the key's type, time to live and value with Redis's clock, atomically. */
  inspect(key: string): Promise<RawState> {
    return this.run('inspect', async () => {
      const [now, type, ttlMs = -1, value] = await this.client.doormanInspect(this.key(key));
      if (type === 'zset') return { now, state: { type: 'slots', tokens: Array.isArray(value) ? value : [], ttlMs } };
      if (type !== 'string' || typeof value !== 'string') return { now, state: null };
      // Triplets are the greylist rule's keys (grey:{…}); every other string is a bucket's TAT.
      if (key.startsWith('grey:')) return { now, state: { type: 'greylist', value, ttlMs } };
      return { now, state: { type: 'bucket', tat: Number(value), ttlMs } };
    });
  }

  reset(key: string): Promise<boolean> {
    return this.run('reset', async () => (await this.client.del(this.key(key))) > 0);
  }

  ready(timeoutMs: number): Promise<boolean> {
    if (this.client.status === 'ready') return Promise.resolve(true);
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.client.off('ready', onReady);
        resolve(false);
      }, timeoutMs);
      const onReady = () => {
        clearTimeout(t);
        resolve(true);
      };
      this.client.once('ready', onReady);
    });
  }

  async close(): Promise<void> {
    this.client.disconnect();
  }
}
