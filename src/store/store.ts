/**
 * store.ts — shared state behind one interface: rate-limit buckets, concurrency slots,
 * greylisting triplets. `MemoryStore` (this file) is the embedded default for a single
 * instance; `RedisStore` (redis.ts) shares the state between every doorman instance, each state
 * change one atomic Lua script (scripts/*.lua, same semantics as here).
 *
 * Every method may reject (Redis down, command timeout): the rules decide fail-open or
 * fail-closed, the store never does.
 */
import { LRUCache } from 'lru-cache';

export interface RateResult {
  allowed: boolean;
  /** Tokens left after this event. */
  remaining: number;
  /** When refused: ms until the event would be allowed. */
  retryAfterMs: number;
  /** ms until the bucket is full again. */
  resetMs: number;
}

export interface SlotResult {
  ok: boolean;
  inUse: number;
}

export interface GreyResult {
  passed: boolean;
  /** ms before a retry can pass (0 when passed). */
  waitMs: number;
  firstAttempt: boolean;
}

export interface Store {
  readonly kind: 'memory' | 'redis';
  /**
   * GCRA token bucket: `limit` per `windowMs`, refilling continuously. A refused event costs
   * nothing. `cost` 0 only looks; a negative cost gives tokens back (a refund for an event that
   * was refused after it was charged), never beyond a full bucket.
   */
  rate(key: string, windowMs: number, limit: number, cost: number): Promise<RateResult>;
  acquire(key: string, token: string, limit: number, ttlMs: number): Promise<SlotResult>;
  release(key: string, token: string): Promise<void>;
  greylist(key: string, delayMs: number, retryWindowMs: number, lifetimeMs: number): Promise<GreyResult>;
  /**
   * What `acquire` would answer now, changing nothing (no slot taken, none refreshed, expired ones
   * left for the next change): `doorman explain` (look-only.ts).
   */
  peekSlots(key: string, token: string, limit: number): Promise<SlotResult>;
  /** What `greylist` would answer now, changing nothing (no triplet recorded, none passed or refreshed). */
  peekGreylist(key: string, delayMs: number): Promise<GreyResult>;
  /** Raw state of a key for `doorman limits show` (null: none). */
  inspect(key: string): Promise<{ type: string; value: string | string[]; ttlMs: number } | null>;
  /** Deletes a key (`doorman limits reset`). True when it existed. */
  reset(key: string): Promise<boolean>;
  /** Resolves true once connected, false after `timeoutMs` (the store keeps trying). */
  ready(timeoutMs: number): Promise<boolean>;
  close(): Promise<void>;
}

/** Bounds the in-memory state (keys); the oldest are dropped first. */
export const MEMORY_STORE_MAX_KEYS = 200_000;

type Entry = { kind: 'tat'; tat: number } | { kind: 'slots'; slots: Map<string, number> } | { kind: 'grey'; first: number } | { kind: 'pass' };

export class MemoryStore implements Store {
  readonly kind = 'memory' as const;
  private readonly data: LRUCache<string, Entry>;

  constructor(
    private readonly now: () => number = Date.now,
    max = MEMORY_STORE_MAX_KEYS,
  ) {
    this.data = new LRUCache({ max, ttlAutopurge: false, perf: { now } });
  }

  async rate(key: string, windowMs: number, limit: number, cost: number): Promise<RateResult> {
    const now = this.now();
    const interval = windowMs / limit;
    const e = this.data.get(key);
    const tat = Math.max(e?.kind === 'tat' ? e.tat : 0, now);
    const newTat = tat + cost * interval;
    if (newTat - windowMs > now) {
      return { allowed: false, remaining: Math.floor((windowMs - (tat - now)) / interval), retryAfterMs: Math.ceil(newTat - windowMs - now), resetMs: Math.ceil(tat - now) };
    }
    if (cost < 0 && newTat <= now) {
      // Refunded to a full bucket: nothing left to remember.
      this.data.delete(key);
      return { allowed: true, remaining: limit, retryAfterMs: 0, resetMs: 0 };
    }
    if (cost !== 0) this.data.set(key, { kind: 'tat', tat: newTat }, { ttl: Math.max(1, Math.ceil(newTat - now)) });
    return { allowed: true, remaining: Math.floor((windowMs - (newTat - now)) / interval), retryAfterMs: 0, resetMs: Math.ceil(newTat - now) };
  }

  async acquire(key: string, token: string, limit: number, ttlMs: number): Promise<SlotResult> {
    const now = this.now();
    const e = this.data.get(key);
    const slots = e?.kind === 'slots' ? e.slots : new Map<string, number>();
    for (const [t, exp] of slots) if (exp <= now) slots.delete(t);
    if (!slots.has(token) && slots.size >= limit) return { ok: false, inUse: slots.size };
    slots.set(token, now + ttlMs);
    this.data.set(key, { kind: 'slots', slots }, { ttl: ttlMs });
    return { ok: true, inUse: slots.size };
  }

  async release(key: string, token: string): Promise<void> {
    const e = this.data.get(key);
    if (e?.kind === 'slots') {
      e.slots.delete(token);
      if (e.slots.size === 0) this.data.delete(key);
    }
  }

  async greylist(key: string, delayMs: number, retryWindowMs: number, lifetimeMs: number): Promise<GreyResult> {
    const now = this.now();
    const e = this.data.get(key);
    if (!e || (e.kind !== 'grey' && e.kind !== 'pass')) {
      this.data.set(key, { kind: 'grey', first: now }, { ttl: delayMs + retryWindowMs });
      return { passed: false, waitMs: delayMs, firstAttempt: true };
    }
    if (e.kind === 'pass') {
      this.data.set(key, e, { ttl: lifetimeMs });
      return { passed: true, waitMs: 0, firstAttempt: false };
    }
    if (now - e.first < delayMs) return { passed: false, waitMs: delayMs - (now - e.first), firstAttempt: false };
    this.data.set(key, { kind: 'pass' }, { ttl: lifetimeMs });
    return { passed: true, waitMs: 0, firstAttempt: false };
  }

  async peekSlots(key: string, token: string, limit: number): Promise<SlotResult> {
    const now = this.now();
    const e = this.data.peek(key);
    const live = e?.kind === 'slots' ? [...e.slots].filter(([, exp]) => exp > now).map(([t]) => t) : [];
    const held = live.includes(token);
    if (!held && live.length >= limit) return { ok: false, inUse: live.length };
    return { ok: true, inUse: live.length + (held ? 0 : 1) };
  }

  async peekGreylist(key: string, delayMs: number): Promise<GreyResult> {
    const now = this.now();
    const e = this.data.peek(key);
    if (!e || (e.kind !== 'grey' && e.kind !== 'pass')) return { passed: false, waitMs: delayMs, firstAttempt: true };
    if (e.kind === 'pass' || now - e.first >= delayMs) return { passed: true, waitMs: 0, firstAttempt: false };
    return { passed: false, waitMs: delayMs - (now - e.first), firstAttempt: false };
  }

  async inspect(key: string): Promise<{ type: string; value: string | string[]; ttlMs: number } | null> {
    const e = this.data.get(key);
    if (!e) return null;
    const ttlMs = Math.round(this.data.getRemainingTTL(key));
    switch (e.kind) {
      case 'tat':
        return { type: 'bucket', value: String(e.tat), ttlMs };
      case 'slots':
        return { type: 'slots', value: [...e.slots.keys()], ttlMs };
      case 'grey':
        return { type: 'greylist', value: String(e.first), ttlMs };
      case 'pass':
        return { type: 'greylist', value: 'P', ttlMs };
    }
  }

  async reset(key: string): Promise<boolean> {
    return this.data.delete(key);
  }

  async ready(): Promise<boolean> {
    return true;
  }

  async close(): Promise<void> {
    this.data.clear();
  }
}
