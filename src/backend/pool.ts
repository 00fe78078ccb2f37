/**
 * pool.ts — several backends, chosen the way SMTP chooses MX hosts (RFC 5321 §5.1): lower
 * preference first, a random order among equal ones; a backend that fails is skipped for the
 * session and marked down for `backoff` ms (one log line and a metric per state change); when all
 * are marked down they are tried anyway, best first, so recovery needs no restart.
 *
 * Backends come from `backend.address`:
 *   "127.0.0.1:25"                              one backend
 *   "10 mx1:25, 10 mx2:25, 20 backup:25"        preferences and hosts
 *   "mx:example.com" or "mx:example.com:2525"   the domain's MX records (then A/AAAA), resolved
 *                                               with doorman's resolver and re-resolved when the
 *                                               shortest address TTL runs out (30 s … 1 h)
 *
 * Connections per backend are counted and capped (`maxConnections`: busy, idle and being opened,
 * all alike — each is an smtpd process at the backend). A session takes one at its HELO/EHLO
 * (`acquire`): an idle one (a spare, or one an earlier session left clean), else a new one while
 * under the cap; when every backend is at its cap it waits (`waitForRoom`) up to
 * `acquireTimeout`, then gets BackendBusyError (the client: 421 4.3.2). `spares` prepared
 * connections (greeted and EHLO'd, ready for XCLIENT) are refilled in the background after a
 * session takes or opens one, so the next client's EHLO does not wait for a TCP connect and a
 * greeting; an idle connection closes after `timeout`, so a quiet doorman holds nothing.
 */
import net from 'node:net';
import type { DnsResolver } from '../net/dns.js';
import type { BackendConnection } from './connection.js';

export interface BackendTarget {
  host: string;
  port: number;
  preference: number;
  /** Label in logs and metrics: host:port. */
  readonly name: string;
}

export type BackendSpec = { kind: 'static'; targets: BackendTarget[] } | { kind: 'mx'; domain: string; port: number };

/** Parses `backend.address`. Returns null when malformed. */
export function parseBackendSpec(text: string): BackendSpec | null {
  const t = text.trim();
  const mx = /^mx:([a-z0-9.-]+?)(?::(\d{1,5}))?$/i.exec(t);
  if (mx?.[1]) return { kind: 'mx', domain: mx[1].toLowerCase(), port: Number(mx[2] ?? 25) };
  const targets: BackendTarget[] = [];
  for (const part of t.split(',')) {
    const m = /^\s*(?:(\d{1,5})\s+)?(\[[^\]]+\]|[^\s:[\]]+):(\d{1,5})\s*$/.exec(part);
    if (!m || m[2] === undefined || m[3] === undefined) return null;
    const host = m[2].replace(/^\[|\]$/g, '');
    const port = Number(m[3]);
    if (port < 1 || port > 65535) return null;
    targets.push(target(host, port, Number(m[1] ?? 0)));
  }
  return targets.length ? { kind: 'static', targets } : null;
}

function target(host: string, port: number, preference: number): BackendTarget {
  return { host, port, preference, name: net.isIPv6(host) ? `[${host}]:${port}` : `${host}:${port}` };
}

export interface PoolEvents {
  onState(target: BackendTarget, up: boolean, reason: string): void;
  /** The number of idle pooled connections changed. */
  onIdle?(count: number): void;
  /** The number of connections to a backend (busy, idle, being opened) changed. */
  onConnections?(target: BackendTarget, count: number): void;
  onResolveError(err: Error): void;
}

/** Clamp for MX re-resolution, seconds. */
const MX_MIN_TTL = 30;
const MX_MAX_TTL = 3600;

export interface IdleOptions {
  /** Idle connections kept per backend for the next client sessions (0: no reuse). */
  max: number;
  /** An idle connection is closed after this long, ms (below the backend's own idle timeout). */
  timeout: number;
}

export interface ConnectionLimits {
  /** Connections per backend, busy + idle + being opened. */
  maxConnections: number;
  /** Prepared idle connections kept ready per backend while sessions come (0: none). */
  spares: number;
  /** How long a session waits for a connection when every backend is at maxConnections, ms. */
  acquireTimeout: number;
}

/** Every backend is at maxConnections and none freed up within acquireTimeout. */
export class BackendBusyError extends Error {
  constructor(readonly waited: number) {
    super(`every backend connection in use; waited ${waited} ms`);
    this.name = 'BackendBusyError';
  }
}

/** A connection for a session: a pooled one (reused) or a new one. */
export interface Acquired {
  conn: BackendConnection;
  reused: boolean;
}

export class BackendPool {
  private targets: BackendTarget[] = [];
  /** Idle backend connections by backend name, most recent last. */
  private readonly idle = new Map<string, { conn: BackendConnection; timer: NodeJS.Timeout }[]>();
  idleOptions: IdleOptions = { max: 0, timeout: 10_000 };
  limits: ConnectionLimits = { maxConnections: 50, spares: 0, acquireTimeout: 5_000 };
  /** Opens a prepared connection for the spares (no client yet); null: no spares. */
  opener: ((t: BackendTarget) => Promise<BackendConnection>) | null = null;
  /** Connections per backend counted against maxConnections: open (busy or idle) and being opened. */
  private readonly held = new Map<string, number>();
  /** Spares being opened per backend. */
  private readonly refilling = new Map<string, number>();
  /** Sessions waiting for a connection to free up. */
  private waiters: (() => void)[] = [];
  private readonly downUntil = new Map<string, number>();
  private refreshAt = 0;
  private refreshing: Promise<void> | null = null;

  constructor(
    private readonly spec: BackendSpec,
    private readonly backoff: number,
    private readonly resolver: DnsResolver,
    private readonly events: PoolEvents,
    private readonly now: () => number = Date.now,
    private readonly random: () => number = Math.random,
  ) {
    if (spec.kind === 'static') this.targets = spec.targets;
  }

  /** Backends to try for a new session, in order. */
  async candidates(): Promise<BackendTarget[]> {
    if (this.spec.kind === 'mx' && (this.targets.length === 0 || this.now() >= this.refreshAt)) await this.refresh();
    const now = this.now();
    const up = this.targets.filter((t) => (this.downUntil.get(t.name) ?? 0) <= now);
    const down = this.targets.filter((t) => (this.downUntil.get(t.name) ?? 0) > now);
    return [...this.order(up), ...this.order(down)];
  }

  /** Lower preference first; a random order among equal preferences. */
  private order(list: BackendTarget[]): BackendTarget[] {
    const shuffled = list.map((t) => ({ t, r: this.random() }));
    shuffled.sort((a, b) => a.t.preference - b.t.preference || a.r - b.r);
    return shuffled.map((x) => x.t);
  }

  failed(t: BackendTarget, reason: string): void {
    const wasUp = (this.downUntil.get(t.name) ?? 0) <= this.now();
    this.downUntil.set(t.name, this.now() + this.backoff);
    if (wasUp) this.events.onState(t, false, reason);
  }

  succeeded(t: BackendTarget): void {
    if (!this.downUntil.has(t.name)) return;
    this.downUntil.delete(t.name);
    this.events.onState(t, true, 'connected');
  }

  /**
   * A connection to `t` for a session: an idle one, else one opened with `open` when `t` is under
   * maxConnections; 'full' when it is at the cap (nothing opened). Rejects with open's error.
   */
  async acquire(t: BackendTarget, open: () => Promise<BackendConnection>): Promise<Acquired | 'full'> {
    for (;;) {
      const idle = this.takeIdle(t);
      if (!idle) break;
      if (idle.alive) {
        this.refill(t);
        return { conn: idle, reused: true };
      }
    }
    if (this.connections(t) >= this.limits.maxConnections) return 'full';
    const conn = await this.track(t, open);
    this.refill(t);
    return { conn, reused: false };
  }

  /**
   * Waits until a connection to one of `targets` is freed (closed, or left idle), at most `ms`.
   * Resolves false on timeout. Every waiter is woken by each freed connection and tries again
   * (before new sessions, which arrive with I/O, after these microtasks).
   */
  waitForRoom(ms: number): Promise<boolean> {
    if (ms <= 0) return Promise.resolve(false);
    return new Promise((resolve) => {
      const wake = () => {
        clearTimeout(timer);
        resolve(true);
      };
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w !== wake);
        resolve(false);
      }, ms);
      this.waiters.push(wake);
    });
  }

  /** Backend connections to `t` now: busy, idle and being opened. */
  connections(t: BackendTarget): number {
    return this.held.get(t.name) ?? 0;
  }

  /** Counts a connection from the start of its opening until it is gone. */
  private async track(t: BackendTarget, open: () => Promise<BackendConnection>): Promise<BackendConnection> {
    this.count(t, +1);
    let conn: BackendConnection;
    try {
      conn = await open();
    } catch (err) {
      this.count(t, -1);
      throw err;
    }
    conn.once('gone', () => this.count(t, -1));
    return conn;
  }

  private count(t: BackendTarget, d: number): void {
    const n = (this.held.get(t.name) ?? 0) + d;
    this.held.set(t.name, n);
    this.events.onConnections?.(t, n);
    if (d < 0) this.wake();
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  /** Opens spares in the background up to `spares` idle connections (within maxConnections). */
  private refill(t: BackendTarget): void {
    const open = this.opener;
    if (!open || this.idleOptions.max === 0) return;
    const want = Math.min(this.limits.spares, this.idleOptions.max);
    for (;;) {
      const busy = this.refilling.get(t.name) ?? 0;
      if ((this.idle.get(t.name)?.length ?? 0) + busy >= want || this.connections(t) >= this.limits.maxConnections) return;
      this.refilling.set(t.name, busy + 1);
      this.track(t, () => open(t)).then(
        (conn) => {
          this.refilling.set(t.name, (this.refilling.get(t.name) ?? 1) - 1);
          this.putIdle(t, conn);
        },
        (err: unknown) => {
          this.refilling.set(t.name, (this.refilling.get(t.name) ?? 1) - 1);
          this.failed(t, `spare: ${(err as Error).message}`);
        },
      );
    }
  }

  /** A connection a finished session left for reuse, or null. */
  takeIdle(t: BackendTarget): BackendConnection | null {
    const list = this.idle.get(t.name);
    const entry = list?.pop();
    if (!entry) return null;
    clearTimeout(entry.timer);
    entry.conn.removeAllListeners('close');
    this.events.onIdle?.(this.idleCount);
    return entry.conn;
  }

  /** Keeps a quiet connection for the next session (or closes it when the pool is full). */
  putIdle(t: BackendTarget, conn: BackendConnection): void {
    const list = this.idle.get(t.name) ?? [];
    if (list.length >= this.idleOptions.max || !conn.reusable) {
      conn.quit();
      return;
    }
    conn.removeAllListeners('close');
    const entry = {
      conn,
      timer: setTimeout(() => {
        this.drop(t.name, conn);
        conn.quit();
      }, this.idleOptions.timeout),
    };
    entry.timer.unref();
    conn.once('close', () => {
      clearTimeout(entry.timer);
      this.drop(t.name, conn);
    });
    list.push(entry);
    this.idle.set(t.name, list);
    this.events.onIdle?.(this.idleCount);
    this.wake();
  }

  private drop(name: string, conn: BackendConnection): void {
    const list = this.idle.get(name);
    if (!list) return;
    const i = list.findIndex((e) => e.conn === conn);
    if (i >= 0) list.splice(i, 1);
    this.events.onIdle?.(this.idleCount);
  }

  /** Idle connections now, for metrics. */
  get idleCount(): number {
    let n = 0;
    for (const l of this.idle.values()) n += l.length;
    return n;
  }

  /** Closes every idle connection (shutdown). */
  closeIdle(): void {
    for (const list of this.idle.values()) for (const e of list.splice(0)) {
      clearTimeout(e.timer);
      e.conn.quit();
    }
  }

  get all(): readonly BackendTarget[] {
    return this.targets;
  }

  private refresh(): Promise<void> {
    if (this.spec.kind !== 'mx') return Promise.resolve();
    const { domain, port } = this.spec;
    this.refreshing ??= (async () => {
      try {
        const mxs = (await this.resolver.resolve(domain, 'MX')) as unknown as { exchange: string; priority: number }[];
        const found: BackendTarget[] = [];
        let ttl = MX_MAX_TTL;
        for (const mx of mxs) {
          for (const lookup of [this.resolver.resolveA, this.resolver.resolveAAAA]) {
            try {
              const addrs = await lookup(mx.exchange);
              for (const a of addrs) {
                found.push(target(a.address, port, mx.priority));
                ttl = Math.min(ttl, a.ttl);
              }
            } catch {
              /* no such family */
            }
          }
        }
        if (found.length) {
          this.targets = found;
          this.refreshAt = this.now() + Math.max(MX_MIN_TTL, Math.min(MX_MAX_TTL, ttl)) * 1000;
        } else {
          this.refreshAt = this.now() + MX_MIN_TTL * 1000;
        }
      } catch (err) {
        // Keep the last known backends; try again soon.
        this.events.onResolveError(err as Error);
        this.refreshAt = this.now() + MX_MIN_TTL * 1000;
      } finally {
        this.refreshing = null;
      }
    })();
    return this.refreshing;
  }
}
