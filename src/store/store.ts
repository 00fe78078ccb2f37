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

/**
 * A key's stored state as `inspect` reads it, with the store's own clock at the read (Redis's
 * TIME, so the times agree with its scripts): `state` null when there is no key; for a bucket its
 * TAT (ms since the epoch), for slots the sessions holding one (expired ones left out), for a
 * greylist triplet its first-seen time, or 'P' once passed.
 */
export interface RawState {
  /** The store's clock, ms since the epoch. */
  now: number;
  state: { type: 'bucket'; tat: number; ttlMs: number } | { type: 'slots'; tokens: string[]; ttlMs: number } | { type: 'greylist'; value: string; ttlMs: number } | null;
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
  /** Raw state of a key for `doorman limits show` (read only; see `limitView` for its meaning). */
  inspect(key: string): Promise<RawState>;
  /** Deletes a key (`doorman limits reset`). True when it existed. */
  reset(key: string): Promise<boolean>;
  /** Resolves true once connected, false after `timeoutMs` (the store keeps trying). */
  ready(timeoutMs: number): Promise<boolean>;
  close(): Promise<void>;
}

/**
 * One GCRA step, the arithmetic of scripts/rate-limit.lua: a bucket of `limit` tokens per
 * `windowMs` stored as its theoretical arrival time `storedTat` (0: no key), an event of `cost`
 * tokens at `now`. Returns the result and the TAT to store when the event is allowed (null: the
 * bucket is full again, nothing to remember). The memory store charges with it, and `limitView`
 * reads a stored bucket with it (cost 0: what is left; cost 1: when the next event passes).
 */
export function gcra(storedTat: number, now: number, windowMs: number, limit: number, cost: number): RateResult & { tat: number | null } {
  const interval = windowMs / limit;
  const tat = Math.max(storedTat, now);
  const newTat = tat + cost * interval;
  if (newTat - windowMs > now) {
    return { allowed: false, remaining: Math.floor((windowMs - (tat - now)) / interval), retryAfterMs: Math.ceil(newTat - windowMs - now), resetMs: Math.ceil(tat - now), tat: storedTat };
  }
  if (cost < 0 && newTat <= now) return { allowed: true, remaining: limit, retryAfterMs: 0, resetMs: 0, tat: null };
  return { allowed: true, remaining: Math.floor((windowMs - (newTat - now)) / interval), retryAfterMs: 0, resetMs: Math.ceil(newTat - now), tat: newTat };
}

/** What a limit rule's key holds, as its rule's `admin` says (for `doorman limits show`). */
export type LimitSpec =
  | { kind: 'rate'; limit: number; windowMs: number }
  | { kind: 'concurrency'; limit: number }
  | { kind: 'greylist'; delayMs: number; retryWindowMs: number; lifetimeMs: number };

/**
 * A key's state as an operator asks for it. Times are ms since the epoch on the store's clock
 * (`now`); `expiresAt` null when no key is stored.
 */
export type LimitView =
  | {
      kind: 'rate';
      now: number;
      limit: number;
      windowMs: number;
      /** Tokens taken and not yet refilled (limit − remaining). */
      used: number;
      remaining: number;
      /** 0: the next event is allowed now; else in this many ms, at `nextAllowedAt`. */
      nextAllowedInMs: number;
      nextAllowedAt: number;
      /** When the bucket is full again (the TAT). */
      fullAt: number;
      expiresAt: number | null;
    }
  | { kind: 'concurrency'; now: number; limit: number; inUse: number; expiresAt: number | null }
  | {
      kind: 'greylist';
      now: number;
      /**
       * unknown: a first attempt is greylisted for the delay; waiting: seen, a retry passes from
       * `passesAt` (now, when that is past) until `expiresAt`; passed: let through until `expiresAt`
       * (refreshed by each use).
       */
      state: 'unknown' | 'waiting' | 'passed';
      delayMs: number;
      firstSeenAt: number | null;
      passesAt: number | null;
      expiresAt: number | null;
    };

/** Reads a key's raw state (Store.inspect) with the meaning its rule gives it. */
export function limitView(spec: LimitSpec, raw: RawState): LimitView {
  const { now, state } = raw;
  const expiresAt = state && state.ttlMs >= 0 ? now + state.ttlMs : null;
  switch (spec.kind) {
    case 'rate': {
      const tat = state?.type === 'bucket' ? state.tat : 0;
      const left = gcra(tat, now, spec.windowMs, spec.limit, 0);
      const next = gcra(tat, now, spec.windowMs, spec.limit, 1);
      const wait = next.allowed ? 0 : next.retryAfterMs;
      return {
        kind: 'rate',
        now,
        limit: spec.limit,
        windowMs: spec.windowMs,
        used: spec.limit - left.remaining,
        remaining: left.remaining,
        nextAllowedInMs: wait,
        nextAllowedAt: now + wait,
        fullAt: now + left.resetMs,
        expiresAt,
      };
    }
    case 'concurrency':
      return { kind: 'concurrency', now, limit: spec.limit, inUse: state?.type === 'slots' ? state.tokens.length : 0, expiresAt };
    case 'greylist': {
      const grey = (s: 'unknown' | 'waiting' | 'passed', firstSeenAt: number | null, passesAt: number | null) =>
        ({ kind: 'greylist', now, state: s, delayMs: spec.delayMs, firstSeenAt, passesAt, expiresAt: s === 'unknown' ? null : expiresAt }) as const;
      if (state?.type !== 'greylist') return grey('unknown', null, null);
      if (state.value === 'P') return grey('passed', null, null);
      const first = Number(state.value);
      return grey('waiting', first, first + spec.delayMs);
    }
  }
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
    // ttlResolution 0: every TTL read asks `now` (lru-cache otherwise reuses a cached time, reset by
    // a timer per call: times of the injected clock went stale, and `limits show` read TTLs off).
    this.data = new LRUCache({ max, ttlAutopurge: false, ttlResolution: 0, perf: { now } });
  }

  async rate(key: string, windowMs: number, limit: number, cost: number): Promise<RateResult> {
    const now = this.now();
    const e = this.data.get(key);
    const { tat, ...result } = gcra(e?.kind === 'tat' ? e.tat : 0, now, windowMs, limit, cost);
    // Refunded to a full bucket: nothing left to remember.
    if (tat === null) this.data.delete(key);
    else if (result.allowed && cost !== 0) this.data.set(key, { kind: 'tat', tat }, { ttl: Math.max(1, Math.ceil(tat - now)) });
    return result;
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

  async inspect(key: string): Promise<RawState> {
    const now = this.now();
    const e = this.data.get(key);
    if (!e) return { now, state: null };
    const ttlMs = Math.round(this.data.getRemainingTTL(key));
    switch (e.kind) {
      case 'tat':
        return { now, state: { type: 'bucket', tat: e.tat, ttlMs } };
      case 'slots':
        return { now, state: { type: 'slots', tokens: [...e.slots].filter(([, exp]) => exp > now).map(([t]) => t), ttlMs } };
      case 'grey':
        return { now, state: { type: 'greylist', value: String(e.first), ttlMs } };
      case 'pass':
        return { now, state: { type: 'greylist', value: 'P', ttlMs } };
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
