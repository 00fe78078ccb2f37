/**
 * primary.ts — the in-memory store for a cluster: one `MemoryStore` in the primary process, and in
 * each worker a `WorkerStore` that asks it over the cluster's IPC channel.
 *
 * Without Redis each worker used to keep its own memory, so rate limits counted per worker and a
 * greylisted client retrying on another worker was greylisted again: doorman ran one process
 * instead (workers `auto` = 1 without Redis), and a default install used one core. With the state
 * in the primary, the limits and triplets hold for the instance whatever worker a connection
 * lands on, and `auto` is one worker per core either way. Redis is still what shares state
 * between instances (machines).
 *
 * The calls a worker makes in one turn of its event loop (a stage's limits, other sessions'
 * checks) travel to the primary in one IPC message and are answered in one: a round trip (about
 * 75 µs here, measured for the connection slots in bench/listener-limits.ts) per turn, not per
 * call. A call the primary does not answer within the deadline the worker is given (main.ts:
 * `redis.commandTimeout`, as for a Redis command) rejects: the rules apply their rule file's
 * onError (pass by default), never a crash.
 */
import type { Cluster, Worker } from 'node:cluster';
import { MemoryStore, type Store } from './store.js';

/** The Store methods that travel (the state changes and the operator's look-ups). */
const METHODS = ['rate', 'acquire', 'release', 'greylist', 'peekSlots', 'peekGreylist', 'inspect', 'reset'] as const;
type Method = (typeof METHODS)[number];

interface Call {
  id: number;
  method: Method;
  args: (string | number)[];
}
interface Answer {
  id: number;
  value?: unknown;
  error?: string;
}
/** A worker's calls of one turn of its event loop. */
interface CallMessage {
  doormanStore: 'calls';
  calls: Call[];
}
/** The primary's answers to one CallMessage. */
interface AnswerMessage {
  doormanStore: 'answers';
  answers: Answer[];
}

function isStoreMessage(m: unknown): m is CallMessage | AnswerMessage {
  return typeof m === 'object' && m !== null && 'doormanStore' in m;
}

/** A worker's store: every call goes to the primary's MemoryStore. */
export class WorkerStore implements Store {
  readonly kind = 'memory' as const;
  private nextId = 1;
  private readonly waiting = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }>();
  /** Calls of this turn of the event loop, sent together once its I/O callbacks are done. */
  private queue: Call[] = [];
  private readonly onMessage = (m: unknown) => {
    if (!isStoreMessage(m) || m.doormanStore !== 'answers') return;
    for (const a of m.answers) {
      const w = this.settle(a.id);
      if (a.error !== undefined) w?.reject(new Error(a.error));
      else w?.resolve(a.value);
    }
  };
  private readonly flush = () => {
    const calls = this.queue;
    this.queue = [];
    if (!this.proc.send || !this.proc.connected) {
      for (const c of calls) this.fail(c.id, new Error('store: no primary'));
      return;
    }
    const msg: CallMessage = { doormanStore: 'calls', calls };
    this.proc.send(msg);
  };

  constructor(
    private readonly timeoutMs: number,
    private readonly proc: NodeJS.Process = process,
  ) {
    proc.on('message', this.onMessage);
  }

  /** The call's waiter, no longer waiting (undefined when it was settled already). */
  private settle(id: number) {
    const w = this.waiting.get(id);
    if (!w) return undefined;
    this.waiting.delete(id);
    clearTimeout(w.timer);
    return w;
  }

  private fail(id: number, e: Error): void {
    this.settle(id)?.reject(e);
  }

  private call<T>(method: Method, args: (string | number)[]): Promise<T> {
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      if (!this.proc.send || !this.proc.connected) return reject(new Error('store: no primary'));
      const timer = setTimeout(() => this.fail(id, new Error('store: the primary did not answer in time')), this.timeoutMs);
      timer.unref();
      this.waiting.set(id, { resolve: resolve as (v: unknown) => void, reject, timer });
      if (this.queue.push({ id, method, args }) === 1) setImmediate(this.flush);
    });
  }

  rate(key: string, windowMs: number, limit: number, cost: number): ReturnType<Store['rate']> {
    return this.call('rate', [key, windowMs, limit, cost]);
  }
  acquire(key: string, token: string, limit: number, ttlMs: number): ReturnType<Store['acquire']> {
    return this.call('acquire', [key, token, limit, ttlMs]);
  }
  release(key: string, token: string): Promise<void> {
    return this.call('release', [key, token]);
  }
  greylist(key: string, delayMs: number, retryWindowMs: number, lifetimeMs: number): ReturnType<Store['greylist']> {
    return this.call('greylist', [key, delayMs, retryWindowMs, lifetimeMs]);
  }
  peekSlots(key: string, token: string, limit: number): ReturnType<Store['peekSlots']> {
    return this.call('peekSlots', [key, token, limit]);
  }
  peekGreylist(key: string, delayMs: number): ReturnType<Store['peekGreylist']> {
    return this.call('peekGreylist', [key, delayMs]);
  }
  inspect(key: string): ReturnType<Store['inspect']> {
    return this.call('inspect', [key]);
  }
  reset(key: string): Promise<boolean> {
    return this.call('reset', [key]);
  }
  ready(): Promise<boolean> {
    return Promise.resolve(true);
  }
  close(): Promise<void> {
    this.proc.off('message', this.onMessage);
    for (const [, w] of this.waiting) {
      clearTimeout(w.timer);
      w.reject(new Error('store closed'));
    }
    this.waiting.clear();
    return Promise.resolve();
  }
}

/** The primary's side: answers every worker's calls from one MemoryStore. */
export function serveStore(workers: Cluster, store: MemoryStore = new MemoryStore()): MemoryStore {
  const run = (m: Call): Promise<unknown> => {
    const a = m.args;
    const s = (i: number) => String(a[i]);
    const n = (i: number) => Number(a[i]);
    switch (m.method) {
      case 'rate':
        return store.rate(s(0), n(1), n(2), n(3));
      case 'acquire':
        return store.acquire(s(0), s(1), n(2), n(3));
      case 'release':
        return store.release(s(0), s(1));
      case 'greylist':
        return store.greylist(s(0), n(1), n(2), n(3));
      case 'peekSlots':
        return store.peekSlots(s(0), s(1), n(2));
      case 'peekGreylist':
        return store.peekGreylist(s(0), n(1));
      case 'inspect':
        return store.inspect(s(0));
      case 'reset':
        return store.reset(s(0));
    }
  };
  workers.on('message', (w: Worker, m: unknown) => {
    if (!isStoreMessage(m) || m.doormanStore !== 'calls' || !Array.isArray(m.calls)) return;
    const calls = m.calls.filter((c) => METHODS.includes(c.method));
    void Promise.all(
      calls.map((c) =>
        run(c).then(
          (value): Answer => ({ id: c.id, value: value ?? null }),
          (e: unknown): Answer => ({ id: c.id, error: e instanceof Error ? e.message : String(e) }),
        ),
      ),
    ).then((answers) => {
      const a: AnswerMessage = { doormanStore: 'answers', answers };
      if (w.isConnected()) w.send(a);
    });
  });
  return store;
}
