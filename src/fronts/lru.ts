/**
 * lru.ts — a bounded map whose entries also expire: what a front remembers between its MTA's
 * calls (the policy front's transactions by Postfix `instance`).
 *
 * At most `max` entries: adding one more forgets the least recently used. An entry not touched
 * for `ttl` ms is forgotten (one unref'd timer per entry, reset at each `get`/`set`, so an idle
 * process keeps no timer alive). Each forgotten entry goes to `onForget` with why: `expired`,
 * `evicted` (the bound), `cleared` (`clear`), or `deleted` (`delete`).
 */
export type ForgetReason = 'expired' | 'evicted' | 'cleared' | 'deleted';

export class ExpiringLru<K, V> {
  private readonly entries = new Map<K, { value: V; timer: NodeJS.Timeout }>();

  constructor(
    private readonly bounds: () => { readonly max: number; readonly ttl: number },
    private readonly onForget: (key: K, value: V, why: ForgetReason) => void,
  ) {}

  get size(): number {
    return this.entries.size;
  }

  /** The value, now the most recently used, its expiry reset; undefined if unknown. */
  get(key: K): V | undefined {
    const e = this.entries.get(key);
    if (!e) return undefined;
    this.entries.delete(key);
    clearTimeout(e.timer);
    e.timer = this.timer(key);
    this.entries.set(key, e);
    return e.value;
  }

  /** Adds (or replaces) an entry; past `max`, the least recently used ones are forgotten. */
  set(key: K, value: V): void {
    const old = this.entries.get(key);
    if (old) {
      clearTimeout(old.timer);
      this.entries.delete(key);
    }
    this.entries.set(key, { value, timer: this.timer(key) });
    const max = this.bounds().max;
    while (this.entries.size > max) {
      const first = this.entries.keys().next();
      if (first.done) break;
      this.forget(first.value, 'evicted');
    }
  }

  delete(key: K): void {
    this.forget(key, 'deleted');
  }

  /** Forgets every entry (shutdown). */
  clear(): void {
    for (const k of [...this.entries.keys()]) this.forget(k, 'cleared');
  }

  private timer(key: K): NodeJS.Timeout {
    const t = setTimeout(() => this.forget(key, 'expired'), this.bounds().ttl);
    t.unref();
    return t;
  }

  private forget(key: K, why: ForgetReason): void {
    const e = this.entries.get(key);
    if (!e) return;
    clearTimeout(e.timer);
    this.entries.delete(key);
    this.onForget(key, e.value, why);
  }
}
