/**
 * look-only.ts — a Store that answers what the store would answer and changes nothing: the store
 * of `doorman explain` (fronts/explain.ts), so that explaining a session never counts a rate, takes
 * a concurrency slot or records a greylisting triplet. The rules are unchanged: they call the
 * Store interface as always, and this wrapper turns each change into a look.
 *
 *   rate      cost 0 (the bucket as it is: rate-limit.lua's look), and the answer an event of
 *             `cost` would get computed from it (GCRA: allowed while the tokens left cover it);
 *             a refund (negative cost) only gives back what this wrapper counted
 *   acquire   peekSlots: a slot would be granted or not; none taken
 *   release   nothing (no slot was taken)
 *   greylist  peekGreylist: the answer without recording the triplet or marking it passed
 *   reset     refused (an error): a look-only store never deletes
 *   inspect, ready, close: the wrapped store's
 *
 * What one explained session spends is counted here, in memory, on top of the store's state: the
 * second recipient of a limit of one per window is refused in the explanation as it would be in
 * the session, and the store still holds nothing of it. Slots the session would hold are counted
 * the same way. Nothing of it outlives this object (one per `doorman explain` run).
 */
import type { GreyResult, RateResult, SlotResult, Store } from './store.js';

export class LookOnlyStore implements Store {
  readonly kind: Store['kind'];
  /** Tokens the explained session would have taken, per bucket key. */
  private readonly spent = new Map<string, number>();
  /** Slots the explained session would hold, per slot key (its tokens). */
  private readonly slots = new Map<string, Set<string>>();

  constructor(private readonly store: Store) {
    this.kind = store.kind;
  }

  async rate(key: string, windowMs: number, limit: number, cost: number): Promise<RateResult> {
    const look = await this.store.rate(key, windowMs, limit, 0);
    const spent = this.spent.get(key) ?? 0;
    if (cost <= 0) {
      // A refund: only of what this session was counted here.
      const left = Math.max(0, spent + cost);
      if (left) this.spent.set(key, left);
      else this.spent.delete(key);
      return { allowed: true, remaining: Math.min(limit, look.remaining - left), retryAfterMs: 0, resetMs: look.resetMs };
    }
    const interval = windowMs / limit;
    // resetMs is the bucket's TAT from now; each token this session spent moves it one interval on.
    const tat = look.resetMs + spent * interval;
    const remaining = look.remaining - spent;
    if (remaining < cost) {
      return { allowed: false, remaining: Math.max(0, remaining), retryAfterMs: Math.max(1, Math.ceil(tat + cost * interval - windowMs)), resetMs: Math.ceil(tat) };
    }
    this.spent.set(key, spent + cost);
    return { allowed: true, remaining: remaining - cost, retryAfterMs: 0, resetMs: Math.ceil(tat + cost * interval) };
  }

  async acquire(key: string, token: string, limit: number): Promise<SlotResult> {
    const mine = this.slots.get(key) ?? new Set<string>();
    // The session's own slots are not in the store: each one counts against the limit.
    const others = [...mine].filter((t) => t !== token).length;
    const r = await this.store.peekSlots(key, token, Math.max(0, limit - others));
    if (!r.ok) return { ok: false, inUse: r.inUse + others };
    mine.add(token);
    this.slots.set(key, mine);
    return { ok: true, inUse: r.inUse + others };
  }

  async release(key: string, token: string): Promise<void> {
    this.slots.get(key)?.delete(token);
  }

  greylist(key: string, delayMs: number): Promise<GreyResult> {
    return this.store.peekGreylist(key, delayMs);
  }

  peekSlots(key: string, token: string, limit: number): Promise<SlotResult> {
    return this.store.peekSlots(key, token, limit);
  }

  peekGreylist(key: string, delayMs: number): Promise<GreyResult> {
    return this.store.peekGreylist(key, delayMs);
  }

  inspect(key: string): ReturnType<Store['inspect']> {
    return this.store.inspect(key);
  }

  reset(): Promise<boolean> {
    return Promise.reject(new Error('a look-only store changes nothing'));
  }

  ready(timeoutMs: number): Promise<boolean> {
    return this.store.ready(timeoutMs);
  }

  close(): Promise<void> {
    return this.store.close();
  }
}

/** The store, looking only (see above). */
export function lookOnly(store: Store): Store {
  return new LookOnlyStore(store);
}
